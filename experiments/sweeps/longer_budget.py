"""TRAPO against GRPO at 2.5x the paper-table budget: does the gap at 40 steps close, hold or turn?

Same task, base policy and settings as experiments/sweeps/paper_table.py, but 100 steps × 8 prompts; 3 seeds each.

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
      {"name": "GRPO", "config": c + "grpo.py"},
  ]
