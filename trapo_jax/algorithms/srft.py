"""SRFT (docs/algorithm.md#srft): LUFFY's rows (n - 1 rollouts and one whole demonstration in one GRPO group) with
entropy-aware weights: on the demonstration, 0.5 sg(exp(-H)) x NLL plus LUFFY's shaped off-policy term; on the
model's own tokens, REINFORCE with weight 0.1 sg(exp(H)) on correct rollouts and -1 on wrong ones; H the row's
mean token entropy.

SRFT publishes no code. This follows the reimplementation in TsinghuaC3I/Unify-Post-Training (the HPT repository):
`hpt/verl/verl/mix_src/mix_actor.py:update_policy` (`offline_loss_type="srft"`: `sft_coef = 0.5 exp(-H)`,
`on_coef = 0.1 exp(H)`, H = `masked_mean(entropy, response_mask, axis=-1)` detached; the SFT loss a token mean over
the micro-batch's demonstration rows), `mix_core_alg.py:compute_token_on_off_policy_srft_loss` (`srft_type="paper"`:
-w log p on own tokens, w from `correct_answer_mask` = reward 1; -A p / (p + 0.1) on demonstration tokens; sum / max
length, no clip), `exp_scripts/train_srft.sh` (the run: lr 1e-6, 8 rollouts with one prefix of ratio 1.0).

Accumulation as HPT's (the same actor): the micro-batch losses of a mini-batch summed (`micro_batches`), two AdamW
steps per 128-prompt batch (`mini_batches`), docs/algorithm.md#accumulation.
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
class Srft(base.Method):
  name: ClassVar[str] = "srft"
  sft_coef: float = 0.5  # x sg(exp(-H)) on the demonstration's NLL
  correct_coef: float = 0.1  # x sg(exp(H)): REINFORCE weight of a correct rollout's tokens
  wrong_coef: float = -1.0  # REINFORCE weight of a wrong rollout's tokens
  gamma: float = 0.1  # LUFFY's shaping p / (p + gamma) on demonstration tokens
  micro_batches: int = 2  # summed per mini-batch; official K = a GPU's dynamic micro-batches (the 7B config: 8)
  mini_batches: int = 2  # AdamW steps per batch (official: 128 prompts in mini-batches of 64)

  def demo_form(self, cfg) -> str:
    return base.whole_response(cfg)

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    plan = microgroup.Plan(stages=(cfg.rollout.n - 1, 1), guidance=microgroup.FixedRatio(ratio=1.0))
    sft = losses.Term("sft", tokens="demo_rows", loss="entropy_weighted_nll", weight=float(self.sft_coef),
                      aggregation="token_mean", over="selected")
    off = losses.Term("off", tokens="imitated", loss="luffy_shaped", aggregation=cfg.loss.aggregation,
                      params=(("gamma", float(self.gamma)),))
    on = losses.Term("on", tokens="own", loss="srft_reinforce", aggregation=cfg.loss.aggregation,
                     params=(("correct", float(self.correct_coef)), ("wrong", float(self.wrong_coef))))
    return (base.Phase("rl", plan, base.objective(cfg, sft, off, on, base.entropy_bonus(cfg)),
                       temperature=float(cfg.rollout.temperature),
                       **base.accumulation(self.name, micro_batches=self.micro_batches,
                                           mini_batches=self.mini_batches)),)

  def check(self, cfg) -> None:
    require(self.gamma > 0, "srft.gamma", "must be > 0")
    require(cfg.rollout.n >= 2, "rollout.n", "srft needs at least one rollout besides the demonstration")
