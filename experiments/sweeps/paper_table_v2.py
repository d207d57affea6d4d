"""Every registered method on the default synthetic task at the longer budget: the v2 comparison table.

Same task and settings as experiments/sweeps/paper_table.py, but 100 steps × 8 prompts (the budget of
experiments/sweeps/longer_budget.py); 3 seeds each. The base policy is the one shipped for this table, SFT on every
level (experiments/configs/synthetic_base.py), which solves the hard levels 4-6 15-28 % of the time where its
predecessor solved them 3-4 %: guidance has something to teach there. Each method is the default config with its
`algo`; its module (trapo_jax/algorithms/) says how its batch-sized constants (ReLIFT's buffer, CHORD's expert
share) scale to 8 prompts. 3-11 minutes per run on 2 CPU cores (SFT the shortest, the methods that sample 8
rollouts per prompt the longest; about 2 h per seed), 42 runs and the base policy's evaluation at each seed: the
sweep is meant to be completed over several sittings (runs go seed by seed, a finished run is skipped; rerun the
same command).

  python launch/sweep.py --sweep=experiments/sweeps/paper_table_v2.py --results_md=docs/results.md
"""

SEEDS = (0, 1, 2)
COMMON = {
    "train.steps": 100,
    "train.ckpt_every": 50,
    "eval.at_start": False,
    "eval.samples.synthetic": 2,
}

METHODS = ("grpo", "luffy", "sft", "sft_then_rl", "relift", "hpt", "chord_mu", "chord_phi", "srft", "prefix_rft",
           "uft")


def get_sweep():
  c = "experiments/configs/"
  return ([{"name": "base_policy", "train.steps": 0}, {"name": "TRAPO", "config": c + "default.py"}]
          + [{"name": m, "config": c + "default.py", "algo": m} for m in METHODS]
          + [{"name": "TRAPO_sft_on_prefix", "config": c + "trapo_sft_prefix.py"},
             {"name": "TRAPO_fixed_50pct_prefix", "config": c + "trapo_fixed_prefix.py"}])
