"""The paper's comparison on the default synthetic task, at equal budget: every method trains on the same prompts
(8 per step, same order) for the same number of steps with 8 samples per prompt (SFT: the prompt's 2 demos), from
the same shipped base policy; 3 seeds each (the seed drives sampling).

  python launch/sweep.py --sweep=experiments/sweeps/paper_table.py --results_md=docs/results.md
"""

SEEDS = (0, 1, 2)
COMMON = {
    "train.steps": 40,
    "eval.at_start": False,
    "eval.samples.synthetic": 2,
}


def get_sweep():
  c = "experiments/configs/"
  return [
      {"name": "base_policy", "train.steps": 0},
      {"name": "TRAPO", "config": c + "default.py"},
      {"name": "GRPO", "config": c + "grpo.py"},
      {"name": "SFT", "config": c + "sft.py"},
      {"name": "SFT_then_RL", "config": c + "sft_then_rl.py"},
      {"name": "LUFFY", "config": c + "luffy.py"},
      {"name": "TRAPO_sft_on_prefix", "config": c + "trapo_sft_prefix.py"},
      {"name": "TRAPO_fixed_50pct_prefix", "config": c + "trapo_fixed_prefix.py"},
      {"name": "TRAPO_alpha0.02", "config": c + "default.py", "loss.alpha": 0.02},
      {"name": "TRAPO_alpha0.3", "config": c + "default.py", "loss.alpha": 0.3},
      {"name": "TRAPO_alpha1.0", "config": c + "default.py", "loss.alpha": 1.0},
  ]
