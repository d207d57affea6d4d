"""SFT (docs/algorithm.md#sft): token-mean NLL on one whole demonstration per problem, nothing sampled.

As the official SFT data preparation (ElliottYan/LUFFY `data/prepare_sft.py`, used by TRAPO's SFT baseline): the
target is the whole R1 response with its leading "<think>\\n" removed. The official SFT (OpenRLHF) has its own
optimizer settings: lr 5e-5 with a linear warm-up over the first 10 % of its steps (`lr`, `warmup`), here an AdamW
of the method's own (`optimizers`), the run's betas, weight decay and clip. Its 3 epochs over the demonstrations are
train.steps x train.batch_prompts here (the run's length).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.errors import require
from trapo_jax.sampling import microgroup


@base.register
@dataclasses.dataclass(frozen=True)
class Sft(base.Method):
  name: ClassVar[str] = "sft"
  lr: float = 5e-5  # official (OpenRLHF) learning rate
  warmup: float = 0.1  # linear warm-up over this share of the SFT steps (official 10 %)

  def demo_form(self, cfg) -> str:
    return "response_after_think"

  def sft_steps_of(self, cfg) -> int:
    return cfg.train.steps

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    nll = losses.Term("nll", tokens="imitated", loss="nll", aggregation="token_mean")
    return (base.Phase("sft", microgroup.DemoRows(which=(0,)), base.objective(cfg, nll), optimizer="sft"),)

  def optimizers(self, cfg) -> dict[str, dict[str, Any]]:
    return {"sft": sft_optimizer(self, self.sft_steps_of(cfg))}

  def check(self, cfg) -> None:
    check_optimizer(self)


def sft_optimizer(method, steps: int) -> dict[str, Any]:
  """cfg.optim keys of the SFT AdamW over `steps` steps: `method.lr`, warm-up over `method.warmup` of them."""
  return dict(lr=float(method.lr), warmup_steps=round(method.warmup * steps))


def check_optimizer(method) -> None:
  require(method.lr > 0, f"{method.name}.lr", "must be > 0")
  require(0 <= method.warmup < 1, f"{method.name}.warmup", "must lie in [0, 1) (a share of the SFT steps)")
