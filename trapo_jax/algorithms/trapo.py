"""TRAPO (docs/algorithm.md#trapo): TrSFT on imitated expert-prefix tokens, policy gradient on the model's own
tokens, an entropy bonus, over micro-group rollouts with adaptive prefixes (4, 2, 1, 1 per prompt).

Official code: Su-my/TRAPO, `trapo_src/mix_core_alg.py:compute_token_on_off_policy_loss` (off_policy_reshape
"clip_low") and `mix_trainer.py:fit` / `mix_vllm_rollout.py:generate_sequences` (the schedule). The paper writes a
generic alpha; the code hard-codes 0.1, the default here.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.errors import require
from trapo_jax.sampling import microgroup

PREFIX_LOSSES = ("trsft", "sft")


@base.register
@dataclasses.dataclass(frozen=True)
class Trapo(base.Method):
  name: ClassVar[str] = "trapo"
  alpha: float = 0.1  # TrSFT's trust region: the SFT gradient where p >= alpha, attenuated by p / alpha below
  prefix_loss: str = "trsft"  # ablation "sft": plain NLL on the imitated prefix tokens
  stages: tuple[int, ...] = (4, 2, 1, 1)  # micro-group sizes, summing to rollout.n
  thresholds: tuple[int, ...] = (2, 4, 7)  # after stage s the level rises if the cumulative reward < thresholds[s]
  prefix_ratios: tuple[float, ...] = (0.25, 0.5, 1.0)  # prefix share of the demonstration at levels 1, 2, 3
  cut_window: float = 0.3  # a prefix ends on the first "\n\n" token within (ratio, ratio + window) of the demo
  fixed_prefix_ratio: float = -1.0  # ablation: >= 0 guides every prompt after stage 1 at this ratio

  def plan(self) -> microgroup.Plan:
    if self.fixed_prefix_ratio >= 0:
      guidance = microgroup.FixedRatio(ratio=self.fixed_prefix_ratio, window=self.cut_window)
    else:
      guidance = microgroup.AdaptiveLevels(thresholds=self.thresholds, prefix_ratios=self.prefix_ratios,
                                           window=self.cut_window)
    return microgroup.Plan(stages=self.stages, guidance=guidance)

  def prefix_term(self, cfg) -> losses.Term:
    """The loss on imitated expert tokens: weight +1 whatever the sample's reward (the official advantages_of_hint
    are ones)."""
    if self.prefix_loss == "sft":
      return losses.Term("sft", tokens="imitated", loss="nll", aggregation=cfg.loss.aggregation)
    return losses.Term("trsft", tokens="imitated", loss="trsft", aggregation=cfg.loss.aggregation,
                       params=(("alpha", float(self.alpha)),))

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    return (base.Phase("rl", self.plan(), base.objective(cfg, self.prefix_term(cfg), base.policy_gradient(cfg),
                                                         base.entropy_bonus(cfg)),
                       temperature=float(cfg.rollout.temperature)),)

  def check(self, cfg) -> None:
    key = f"{self.name}."
    require(self.prefix_loss in PREFIX_LOSSES, key + "prefix_loss", f"must be one of {PREFIX_LOSSES}")
    require(self.alpha > 0, key + "alpha", "must be > 0")
    require(len(self.stages) >= 1 and all(s >= 1 for s in self.stages), key + "stages", "must be positive sizes")
    require(sum(self.stages) == cfg.rollout.n, key + "stages",
            f"sizes {self.stages} must sum to rollout.n={cfg.rollout.n}")
    require(len(self.thresholds) == len(self.stages) - 1, key + "thresholds",
            f"needs one threshold per stage boundary ({len(self.stages) - 1})")
    require(len(self.prefix_ratios) == len(self.stages) - 1, key + "prefix_ratios",
            f"needs one ratio per level ({len(self.stages) - 1})")
    require(all(0.0 <= x <= 1.0 for x in self.prefix_ratios), key + "prefix_ratios", "must lie in [0, 1]")
    require(self.fixed_prefix_ratio <= 1.0, key + "fixed_prefix_ratio", "must be <= 1")
