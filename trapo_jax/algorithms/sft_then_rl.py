"""SFT then RL (docs/algorithm.md#sft-then-rl): SFT for the first `sft_steps` optimizer steps, GRPO after, one run.

The official baseline runs them as two trainings: SFT (OpenRLHF: lr 5e-5, 10 % warm-up, cosine to 0.1 x lr, 3
epochs) and then RL from the SFT model with PPO clipping on, on held-out prompts (`openr1.complement.parquet`; LUFFY
`exp_scripts/train_sft_rl.sh`). Here the SFT phase has its own AdamW (`lr`, `warmup`, `schedule`, `min_lr`, as
`algo=sft`, its schedule over the SFT steps), so the RL phase starts the run's AdamW fresh, as a new training does,
its policy gradient is clipped at `clip_eps` (0.2), and it draws only the `rl_prompts` share of the training prompts,
which the SFT phase never draws (base.in_part: a fixed split by uid).

The SFT length: `sft_steps` >= 0 steps; -1 (the default) `epochs` x the SFT part's examples // train.batch_prompts
steps where `epochs` > 0 (official 3; the trainer sets sft_steps from its loader's examples, `length_from_data`),
else half of train.steps (the comparison's budget split, the default).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from trapo_jax.algorithms import base
from trapo_jax.algorithms import grpo
from trapo_jax.algorithms import sft
from trapo_jax.errors import require


@base.register
@dataclasses.dataclass(frozen=True)
class SftThenRl(base.Method):
  name: ClassVar[str] = "sft_then_rl"
  sft_steps: int = -1  # steps of SFT before GRPO; -1: from `epochs` if > 0, else half of train.steps
  lr: float = 5e-5  # the SFT phase's learning rate (official OpenRLHF SFT)
  warmup: float = 0.1  # the SFT phase's linear warm-up, a share of its steps
  clip_eps: float = 0.2  # PPO clip of the RL phase (official: on)
  rl_prompts: float = 0.5  # share of the training prompts held out for the RL phase; 0: both phases draw all
  schedule: str = "cosine_with_min_lr"  # the SFT phase's learning rate after its warm-up (as sft.schedule)
  min_lr: float = 0.1  # the cosine's end, a share of lr
  epochs: float = 0.0  # with sft_steps = -1: > 0, the SFT length in epochs over its part's examples (official 3)

  def demo_form(self, cfg) -> str:
    return sft.Sft().demo_form(cfg)

  def sft_steps_of(self, cfg) -> int:
    return cfg.train.steps // 2 if self.sft_steps < 0 else self.sft_steps

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    (rl,) = grpo.Grpo().phases(cfg)
    pg = base.policy_gradient(cfg, clip_eps=float(self.clip_eps))
    split = self.rl_prompts > 0
    rl = dataclasses.replace(rl, objective=base.objective(cfg, pg, base.entropy_bonus(cfg)),
                             prompts_from="held_out" if split else "")
    (first,) = sft.Sft().phases(cfg)
    return (dataclasses.replace(first, prompts_from="train" if split else ""), rl)

  def held_out(self, cfg) -> float:
    return float(self.rl_prompts)

  def length_from_data(self, cfg, examples) -> dict[str, Any]:
    """sft_steps from `epochs` over the examples the SFT phase draws (those not held out for RL)."""
    if self.sft_steps >= 0 or self.epochs <= 0:
      return {}
    part = "train" if self.rl_prompts > 0 else ""
    count = sum(base.in_part(e.uid, self.held_out(cfg), part) for e in examples)
    steps = sft.epoch_steps(self, count, cfg.train.batch_prompts)
    require(steps < cfg.train.steps, "sft_then_rl.epochs",
            f"{self.epochs} epochs of the SFT part's {count} examples take {steps} steps, not less than "
            f"train.steps={cfg.train.steps}: no step is left for RL")
    return {"sft_then_rl.sft_steps": steps}

  def optimizers(self, cfg) -> dict[str, dict[str, Any]]:
    return {"sft": sft.sft_optimizer(self, self.sft_steps_of(cfg))}

  def phase_at(self, cfg, step: int) -> base.Phase:
    first, then = self.phases(cfg)
    return first if step < self.sft_steps_of(cfg) else then

  def check(self, cfg) -> None:
    require(self.sft_steps >= -1, "sft_then_rl.sft_steps", "must be >= 0, or -1 (epochs, or half of train.steps)")
    require(self.clip_eps > 0, "sft_then_rl.clip_eps", "must be > 0")
    require(0 <= self.rl_prompts < 1, "sft_then_rl.rl_prompts", "must lie in [0, 1) (a share of the prompts)")
    sft.check_optimizer(self)
