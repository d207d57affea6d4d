"""TRAPO against GRPO, LUFFY and its own weakest trust region at 2.5x the paper-table budget: does the order at
40 steps hold?

Same task, base policy and settings as experiments/sweeps/paper_table.py, but 100 steps × 8 prompts; 3 seeds each.
At 40 steps GRPO, LUFFY and TRAPO with alpha = 1.0 were all above TRAPO with the official alpha = 0.1.

  python launch/sweep.py --sweep=experiments/sweeps/longer_budget.py --results_md=docs/results_longer_budget.md
"""

SEEDS = (0, 1, 2)
COMMON = {
    "train.steps": 100,
    "train.ckpt_every": 50,
    "eval.at_start": False,
    "eval.samples.synthetic": 2,
}


def get_sweep():
  c = "experiments/configs/"
  return [
      {"name": "TRAPO", "config": c + "default.py"},
      {"name": "GRPO", "config": c + "default.py", "algo": "grpo"},
      {"name": "LUFFY", "config": c + "default.py", "algo": "luffy"},
      {"name": "TRAPO_alpha1.0", "config": c + "default.py", "trapo.alpha": 1.0},
  ]
