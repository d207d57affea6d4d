"""SFT (docs/algorithm.md#sft): token-mean NLL on one whole demonstration per problem, nothing sampled.

As the official SFT data preparation (ElliottYan/LUFFY `data/prepare_sft.py`, used by TRAPO's SFT baseline): the
target is the whole R1 response with its leading "<think>\\n" removed. The official SFT is OpenRLHF's
`openrlhf.cli.train_sft` as LUFFY's README runs it (`--learning_rate 5e-5 --lr_warmup_ratio 0.1 --max_epochs 3
--train_batch_size 64`) with its default scheduler (OpenRLHF 14fe44c6, May 2025: `--lr_scheduler
cosine_with_min_lr`, `min_lr` = 0.1 x lr; warm-up math.ceil(steps x ratio) updates, steps = ceil(epochs x
(examples // batch))): here an AdamW of the method's own (`optimizers`) with `lr`, `warmup`, `schedule` and
`min_lr`, the run's betas, weight decay and clip.

The length: `epochs` > 0 counts it in epochs over the training examples, ceil(epochs x (examples //
train.batch_prompts)) steps as OpenRLHF (the trainer sets train.steps once its loader has the examples:
`length_from_data`); 0, the default, keeps train.steps, the budget every method of a comparison shares (the
official run is `epochs` = 3).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.algorithms import schedules
from trapo_jax.errors import ConfigError, require
from trapo_jax.sampling import microgroup


@base.register
@dataclasses.dataclass(frozen=True)
class Sft(base.Method):
  name: ClassVar[str] = "sft"
  lr: float = 5e-5  # official (OpenRLHF) learning rate
  warmup: float = 0.1  # linear warm-up over this share of the SFT steps (official 10 %)
  schedule: str = "cosine_with_min_lr"  # after the warm-up (OpenRLHF's default); "constant": lr
  min_lr: float = 0.1  # the cosine's end, a share of lr (OpenRLHF: min_lr = 0.1 x lr)
  epochs: float = 0.0  # > 0: the length in epochs over the examples (official 3); 0: train.steps

  def demo_form(self, cfg) -> str:
    return "response_after_think"

  def sft_steps_of(self, cfg) -> int:
    return cfg.train.steps

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    nll = losses.Term("nll", tokens="imitated", loss="nll", aggregation="token_mean")
    return (base.Phase("sft", microgroup.DemoRows(which=(0,)), base.objective(cfg, nll), optimizer="sft"),)

  def optimizers(self, cfg) -> dict[str, dict[str, Any]]:
    return {"sft": sft_optimizer(self, self.sft_steps_of(cfg))}

  def length_from_data(self, cfg, examples) -> dict[str, Any]:
    if self.epochs <= 0:
      return {}
    return {"train.steps": epoch_steps(self, len(examples), cfg.train.batch_prompts)}

  def check(self, cfg) -> None:
    check_optimizer(self)


def epoch_steps(method, examples: int, batch: int) -> int:
  """OpenRLHF's SFT length: ceil(epochs x (examples // batch)) updates (`train_sft.py`: max_steps)."""
  steps = math.ceil(method.epochs * (examples // batch))
  if steps < 1:
    raise ConfigError(f"{method.name}.epochs: {method.epochs} epochs of {examples} examples in batches of {batch} "
                      "make no step")
  return steps


def sft_optimizer(method, steps: int) -> dict[str, Any]:
  """cfg.optim keys of the SFT AdamW over `steps` steps: `method.lr`, a linear warm-up over math.ceil(steps x
  `method.warmup`) of them (OpenRLHF's count), then `method.schedule` down to `method.min_lr` x lr at the last
  step."""
  keys = dict(lr=float(method.lr), warmup_steps=math.ceil(steps * method.warmup))
  if method.schedule != "constant":
    keys.update(schedule=method.schedule, min_lr_ratio=float(method.min_lr), decay_steps=int(steps))
  return keys


def check_optimizer(method) -> None:
  require(method.lr > 0, f"{method.name}.lr", "must be > 0")
  require(0 <= method.warmup < 1, f"{method.name}.warmup", "must lie in [0, 1) (a share of the SFT steps)")
  require(method.schedule in schedules.LR_SCHEDULES, f"{method.name}.schedule",
          f"must be one of {schedules.LR_SCHEDULES}")
  require(0 <= method.min_lr <= 1, f"{method.name}.min_lr", "must lie in [0, 1] (a share of the learning rate)")
  require(method.epochs >= 0, f"{method.name}.epochs", "must be >= 0 (0: the run's train.steps)")
