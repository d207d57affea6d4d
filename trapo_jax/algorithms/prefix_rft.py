"""Prefix-RFT (docs/algorithm.md#prefix-rft): per prompt, some groups of rollouts are the model's own and the others
continue a prefix of a demonstration, its ratio r = low + (high - low) Beta(1, 1) with bounds scheduled over
training; prefix tokens share their row's advantage under the PPO-clip surrogate, but only the highest-entropy
20 % of a micro-batch's prefix tokens keep it; Dr.GRPO advantages (no std); a token mean over the micro-batch's
response tokens (the shipped YAML's `loss_agg_mode: token-mean`; `aggregation`).

Official code: ZeroYuHuang/prefix_rft, `recipe/prefix_rft/rl_dataset.py:PrefixRFTDataset` (`num_prefix` groups of
which `num_empty_prefix` unguided, a random demonstration per group, `_get_prefix`: int(r x length) tokens, at least
`min_prefix_len`, at most length - 1), `scheduler/global_step.py` (`BetaSampler`, `CosineDecayController`),
`dp_actor.py:reshape_func` ("entropy": the lowest-entropy `mask_ratio` share of the micro-batch's prefix tokens get
advantage 0), `core_algos.py:compute_policy_loss` (dual clip, c = 3) and `agg_loss` (`loss_agg_mode`: the YAML's
token-mean; "dr_grpo", sum / max tokens, is `aggregation="seq_sum_over_max_len"`),
`compute_dr_grpo_outcome_advantage` (mean-centred, no std).

The repository ships no run script (it imports a `recipe.prefix_rft_v2` it does not contain), so the layout and the
schedule are guesses from the paper's description: 2 groups of 4 rollouts, 1 unguided; the upper bound decays by a
cosine from 0.95 to 0.05 over the run, the lower bound stays 0.05; `min_prefix_len` 1; the entropy term over every
response token; the controllers' step is the 0-based optimizer step.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.algorithms import schedules
from trapo_jax.errors import require
from trapo_jax.sampling import microgroup


@base.register
@dataclasses.dataclass(frozen=True)
class PrefixRft(base.Method):
  name: ClassVar[str] = "prefix_rft"
  stages: tuple[int, ...] = (4, 4)  # guess: groups of rollouts per prompt, summing to rollout.n
  unguided: int = 1  # guess: the first groups are the model's own (official num_empty_prefix)
  high: tuple[float, float] = (0.95, 0.05)  # guess: the upper bound's cosine, from -> to
  low: tuple[float, float] = (0.05, 0.05)  # guess: the lower bound's (constant)
  schedule_steps: float = 1.0  # guess: the cosines' length as a fraction of train.steps
  min_prefix: int = 1  # guess: official min_prefix_len
  entropy_drop: float = 0.8  # the lowest-entropy share of prefix tokens whose advantage is 0
  clip_eps: float = 0.2
  clip_c: float = 3.0  # dual clip for A < 0
  aggregation: str = "token_mean"  # the shipped YAML's loss_agg_mode; "seq_sum_over_max_len": agg_loss("dr_grpo")

  def demo_form(self, cfg) -> str:
    return base.whole_response(cfg)

  def bounds(self, cfg, step: int) -> tuple[float, float]:
    """(low, high) of the prefix ratio at optimizer step `step`."""
    steps = max(1, round(self.schedule_steps * cfg.train.steps))
    return (schedules.cosine_bound(step, *self.low, steps), schedules.cosine_bound(step, *self.high, steps))

  def plan(self, cfg, step: int) -> microgroup.Plan:
    return microgroup.Plan(stages=self.stages, mode="random", unguided_stages=self.unguided,
                           ratio_bounds=self.bounds(cfg, step), min_prefix=self.min_prefix, imitate="all")

  def phase_at(self, cfg, step: int) -> base.Phase:
    """Only the rows change with the step (the bounds): one objective, compiled once."""
    clip = dict(clip_eps=float(self.clip_eps), dual_clip=float(self.clip_c))
    own = base.policy_gradient(cfg, aggregation=self.aggregation, **clip)
    prefix = losses.Term("prefix", tokens="imitated", loss="prefix_rft_surrogate", aggregation=self.aggregation,
                         params=tuple(clip.items()) + (("entropy_drop", float(self.entropy_drop)),))
    return base.Phase("rl", self.plan(cfg, step), base.objective(cfg, own, prefix, base.entropy_bonus(cfg)),
                      temperature=float(cfg.rollout.temperature))

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    return (self.phase_at(cfg, 0),)

  def check(self, cfg) -> None:
    require(len(self.stages) >= 1 and all(s >= 1 for s in self.stages), "prefix_rft.stages", "must be positive sizes")
    require(sum(self.stages) == cfg.rollout.n, "prefix_rft.stages",
            f"sizes {self.stages} must sum to rollout.n={cfg.rollout.n}")
    require(0 <= self.unguided < len(self.stages), "prefix_rft.unguided",
            f"must leave at least one of the {len(self.stages)} groups guided")
    require(all(0 <= r <= 1 for r in self.high + self.low) and len(self.high) == len(self.low) == 2,
            "prefix_rft.high", "bounds are (from, to) pairs in [0, 1]")
    require(self.schedule_steps > 0, "prefix_rft.schedule_steps", "must be > 0")
    require(self.min_prefix >= 1, "prefix_rft.min_prefix", "must be >= 1")
    require(0 <= self.entropy_drop < 1, "prefix_rft.entropy_drop", "must lie in [0, 1)")
    require(self.clip_eps > 0 and self.clip_c > 1, "prefix_rft.clip_c", "needs clip_eps > 0 and clip_c > 1")
    require(self.aggregation in losses.AGGREGATIONS, "prefix_rft.aggregation",
            f"must be one of {losses.AGGREGATIONS}")
