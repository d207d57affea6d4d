"""The paper's comparison on the default synthetic task, at equal budget: every method trains on the same prompts
(8 per step, same order) for the same number of steps with 8 samples per prompt (SFT: one demo per prompt), from
the same shipped base policy; 3 seeds each (the seed drives sampling).

Fixed before any method was compared: the task (trapo_jax/data/synthetic.py, multi-step arithmetic, levels 1-6,
training prompts from all levels, held-out test split graded by the math-verify grader), the base policy
(trapo_jax/assets/synthetic_base: Qwen2 architecture, 1M parameters, made by experiments/configs/synthetic_base.py;
docs/results_v1.md was made with its predecessor, SFT on levels 1-3 only), and the budget (40 steps × 8 prompts, lr
1e-4, 96 new tokens; evaluation on the whole test split at temperature 0.6, 2 samples per problem).

  python launch/sweep.py --sweep=experiments/sweeps/paper_table.py --results_md=docs/results_v1.md
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
      {"name": "GRPO", "config": c + "default.py", "algo": "grpo"},
      {"name": "SFT", "config": c + "default.py", "algo": "sft"},
      {"name": "SFT_then_RL", "config": c + "default.py", "algo": "sft_then_rl"},
      {"name": "LUFFY", "config": c + "default.py", "algo": "luffy"},
      {"name": "TRAPO_sft_on_prefix", "config": c + "trapo_sft_prefix.py"},
      {"name": "TRAPO_fixed_50pct_prefix", "config": c + "trapo_fixed_prefix.py"},
      {"name": "TRAPO_alpha0.02", "config": c + "default.py", "trapo.alpha": 0.02},
      {"name": "TRAPO_alpha0.3", "config": c + "default.py", "trapo.alpha": 0.3},
      {"name": "TRAPO_alpha1.0", "config": c + "default.py", "trapo.alpha": 1.0},
  ]
