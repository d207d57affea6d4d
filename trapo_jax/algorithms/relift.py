"""ReLIFT (docs/algorithm.md#relift): GRPO on n rollouts of the model's own; a prompt whose rollouts all fail goes,
with its demonstration, into a buffer; once the buffer holds `buffer_size` prompts, a separate fine-tuning update on
their demonstrations runs with its own AdamW, and those prompts leave the buffer.

Official code: TheRoadQaQ/ReLIFT, `relift/verl/verl/relift/trainer.py:fit` (the buffer: hard prompts of the batch,
newest first, `sft_data_size` taken from the front), `actor.py:sft_update_policy` (token-mean NLL minus
`sft.entropy_coeff` x the token-mean entropy, temperature 1, one epoch, one optimizer step per `sft_mini_batch_size`
= `sft_data_size`), `fsdp_worker.py:_build_model_optimizer` (a second AdamW, `optim.sft.lr`, the RL optimizer's betas
and weight decay, clip `sft.sft_grad_clip`), `rl_dataset_with_target.py` (the target is the whole first solution,
its "<think>\\n" dropped when the prompt ends with one), `examples/math-7b/train.sh` (the run).

Scale-free defaults that equal the official ones at its 128-prompt batches and lr 1e-6: the buffer holds
`buffer_batches` x train.batch_prompts prompts (official 128), and the fine-tuning lr is `sft_lr_scale` x optim.lr
(official 1e-6 for both). The buffer and the fine-tuning optimizer's state are part of every checkpoint.

Accumulation (`actor.py`, verl 0.2): the RL update sums a GPU's micro-batch losses (`micro_batches`) and splits its
128-prompt batch into two mini-batches, two AdamW steps (`mini_batches`); the fine-tuning loss is 1/8 of its token
mean (`sft_loss_scale`: the official gradient accumulation divides by the whole mini-batch over the per-GPU
micro-batch, 8 times a GPU's count at 8 GPUs), docs/algorithm.md#accumulation.

Not reproduced: its reward also requires the thought format (`reward_impl_version=3`); here every method
shares the grader.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.algorithms import grpo
from trapo_jax.errors import require
from trapo_jax.sampling import microgroup


@base.register
@dataclasses.dataclass(frozen=True)
class Relift(base.Method):
  name: ClassVar[str] = "relift"
  buffer_batches: float = 1.0  # the buffer's size in batches of train.batch_prompts prompts (official 128 / 128)
  sft_lr_scale: float = 1.0  # fine-tuning lr / optim.lr (official 1e-6 / 1e-6)
  sft_grad_clip: float = 1.0
  sft_entropy_coef: float = 0.001
  demo: int = 0  # which demonstration is fine-tuned on (official: the first target)
  micro_batches: int = 2  # RL micro-batches summed per mini-batch; official K: a GPU's dynamic ones (7B config: 8)
  mini_batches: int = 2  # RL AdamW steps per batch (official: 128 prompts in mini-batches of 64)
  sft_loss_scale: float = 0.125  # x the fine-tuning loss (official: 1/8 of the token mean, see above)

  def demo_form(self, cfg) -> str:
    return base.whole_response(cfg)

  def buffer_size(self, cfg) -> int:
    return max(1, round(self.buffer_batches * cfg.train.batch_prompts))

  def fine_tune_phase(self, cfg) -> base.Phase:
    scale = float(self.sft_loss_scale)
    nll = losses.Term("nll", tokens="imitated", loss="nll", weight=scale, aggregation="token_mean")
    entropy = losses.Term("entropy", tokens="response", loss="entropy", weight=-scale * float(self.sft_entropy_coef),
                          aggregation="token_mean")
    return base.Phase("fine_tune", microgroup.DemoRows(which=(self.demo,)), base.objective(cfg, nll, entropy),
                      optimizer="fine_tune", prompts=self.buffer_size(cfg))

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    (rl,) = grpo.Grpo().phases(cfg)
    rl = dataclasses.replace(rl, **base.accumulation(self.name, micro_batches=self.micro_batches,
                                                     mini_batches=self.mini_batches))
    return (rl, self.fine_tune_phase(cfg))

  def phase_at(self, cfg, step: int) -> base.Phase:
    return self.phases(cfg)[0]

  def optimizers(self, cfg) -> dict[str, dict[str, Any]]:
    return {"fine_tune": dict(lr=self.sft_lr_scale * cfg.optim.lr, grad_clip=self.sft_grad_clip, warmup_steps=0)}

  def initial_state(self, cfg) -> dict[str, Any]:
    return {"buffer": []}

  def after_update(self, cfg, step: int, uids: np.ndarray, rewards: np.ndarray,
                   state: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[base.Phase, list[int]]]]:
    """Prompts whose rollouts all failed join the front of the buffer; a full buffer's first `buffer_size` prompts
    are fine-tuned on now and leave it."""
    hard = [int(u) for u, r in zip(uids, rewards) if not (r > 0).any()]
    buffer = hard + list(state["buffer"])
    size = self.buffer_size(cfg)
    if len(buffer) < size:
      return {"buffer": buffer}, []
    return {"buffer": buffer[size:]}, [(self.fine_tune_phase(cfg), buffer[:size])]

  def check(self, cfg) -> None:
    require(self.buffer_batches > 0, "relift.buffer_batches", "must be > 0")
    require(self.sft_lr_scale > 0, "relift.sft_lr_scale", "must be > 0")
    require(self.sft_grad_clip > 0, "relift.sft_grad_clip", "must be > 0")
    require(self.sft_loss_scale > 0, "relift.sft_loss_scale", "must be > 0")
    require(self.demo in (0, 1), "relift.demo", "must be 0 or 1 (each problem has two demonstrations)")
