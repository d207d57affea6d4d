"""HPT (docs/algorithm.md#hpt): per prompt, its n rollouts are graded; a prompt with at most `gate` correct ones has
them dropped and its demonstration trained with NLL in the same update, the others get GRPO.

Official code: TsinghuaC3I/Unify-Post-Training, `hpt/verl/verl/mix_src/mix_trainer.py:select_on_off_ada_balance`
(unify_strategy "switch": at most `switch_gate` correct -> the rollouts removed, one off-policy row added) and
`fit` (the off-policy row is the whole first target, `n_prefix=1`, ratio 1.0), `mix_actor.py:update_policy`
(`offline_loss_type="sft"`: `sft_loss_coef` x the token-mean NLL over the micro-batch's demonstration rows, plus the
policy gradient on the others, sum / max length, no clip, entropy 0.001), `exp_scripts/train.sh` (the run:
gate 0, coefficient 1.0, lr 5e-6).

Rows per prompt are fixed (n): a gated prompt's first row becomes the demonstration (outside the GRPO group: its
advantage is 0, its loss is the NLL alone) and its other rows are emptied, so no term sees them.

Accumulation (`mix_actor.py:update_policy`, verl 0.2): each micro-batch's loss is back-propagated unscaled, so a
GPU's K micro-batches add up (the SFT and entropy token means count K times), and a 128-prompt batch takes two AdamW
steps (`ppo_mini_batch_size` 64): `micro_batches` and `mini_batches` (docs/algorithm.md#accumulation).

Not reproduced: the middle branch (`switch_gate_off`, equal to the gate in the official run, so never taken);
`max_grad_norm=80` (an update whose gradient norm exceeds 80 is skipped).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.errors import require
from trapo_jax.sampling import microgroup


@base.register
@dataclasses.dataclass(frozen=True)
class Hpt(base.Method):
  name: ClassVar[str] = "hpt"
  gate: int = 0  # at most this many correct rollouts: train on the demonstration instead
  sft_coef: float = 1.0  # official 1.0 for Qwen2.5-Math-7B (0.3 for the 1.5B model)
  demo: int = 0
  micro_batches: int = 2  # summed per mini-batch; official K = a GPU's dynamic micro-batches (the 7B config: 8)
  mini_batches: int = 2  # AdamW steps per batch (official: 128 prompts in mini-batches of 64)

  def demo_form(self, cfg) -> str:
    return base.whole_response(cfg)

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    plan = microgroup.Plan(stages=(cfg.rollout.n,), guidance=microgroup.Unguided(), gate=self.gate,
                           gate_demo=self.demo)
    nll = losses.Term("sft", tokens="demo_rows", loss="nll", weight=float(self.sft_coef), aggregation="token_mean",
                      over="selected")
    return (base.Phase("rl", plan, base.objective(cfg, nll, base.policy_gradient(cfg), base.entropy_bonus(cfg)),
                       temperature=float(cfg.rollout.temperature),
                       **base.accumulation(self.name, micro_batches=self.micro_batches,
                                           mini_batches=self.mini_batches)),)

  def check(self, cfg) -> None:
    require(0 <= self.gate < cfg.rollout.n, "hpt.gate", f"must lie in [0, rollout.n={cfg.rollout.n})")
    require(self.sft_coef >= 0, "hpt.sft_coef", "must be >= 0")
    require(self.demo in (0, 1), "hpt.demo", "must be 0 or 1 (each problem has two demonstrations)")
