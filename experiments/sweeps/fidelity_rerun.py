"""The paper-table rows that the baselines' fidelity fixes change, rerun at the paper table's budget and seeds.

LUFFY's demonstration row became the whole response and SFT's target one whole response per problem (it was the
thoughts of both demonstrations); SFT->RL's first half is that SFT. On the synthetic task a demonstration has no
<think> tags, so its thought, its whole response and the SFT target are the same text: LUFFY's rows do not change,
and SFT's change from two demonstrations per prompt to one. Same points, seeds and overrides as
experiments/sweeps/paper_table.py.

  python launch/sweep.py --sweep=experiments/sweeps/fidelity_rerun.py --results_md=docs/results_fidelity_rerun.md
"""

from experiments.sweeps.paper_table import COMMON, SEEDS  # noqa: F401  (the budget and seeds of the table rerun)


def get_sweep():
  return [
      {"name": "SFT", "algo": "sft"},
      {"name": "SFT_then_RL", "algo": "sft_then_rl"},
      {"name": "LUFFY", "algo": "luffy"},
  ]
