"""SFT then RL (docs/algorithm.md#sft-then-rl): SFT for the first `sft_steps` optimizer steps, GRPO after, one run."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from trapo_jax.algorithms import base
from trapo_jax.algorithms import grpo
from trapo_jax.algorithms import sft
from trapo_jax.errors import require


@base.register
@dataclasses.dataclass(frozen=True)
class SftThenRl(base.Method):
  name: ClassVar[str] = "sft_then_rl"
  sft_steps: int = -1  # steps of SFT before GRPO; -1: half of train.steps (the split follows an overridden budget)

  def demo_form(self, cfg) -> str:
    return sft.Sft().demo_form(cfg)

  def sft_steps_of(self, cfg) -> int:
    return cfg.train.steps // 2 if self.sft_steps < 0 else self.sft_steps

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    return sft.Sft().phases(cfg) + grpo.Grpo().phases(cfg)

  def phase_at(self, cfg, step: int) -> base.Phase:
    first, then = self.phases(cfg)
    return first if step < self.sft_steps_of(cfg) else then

  def check(self, cfg) -> None:
    require(self.sft_steps >= -1, "sft_then_rl.sft_steps", "must be >= 0, or -1 for half of train.steps")
