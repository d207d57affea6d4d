"""GRPO as the paper's baseline (docs/algorithm.md#grpo): n rollouts of the model's own per prompt, group-mean
baseline (no std), no clip, entropy bonus, sum / L_max; no demonstrations."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from trapo_jax.algorithms import base


@base.register
@dataclasses.dataclass(frozen=True)
class Grpo(base.Method):
  name: ClassVar[str] = "grpo"

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    return (base.Phase("rl", base.own_rollouts(cfg),
                       base.objective(cfg, base.policy_gradient(cfg), base.entropy_bonus(cfg)),
                       temperature=float(cfg.rollout.temperature)),)
