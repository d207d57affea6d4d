"""LUFFY (docs/algorithm.md#luffy): n - 1 rollouts of the model's own plus one whole demonstration per prompt, all
in one GRPO group; the demonstration is graded like any rollout and its tokens get the shaped off-policy loss
-A p / (p + gamma).

Official code: ElliottYan/LUFFY, `luffy/verl/verl/mix_src/mix_core_alg.py:compute_token_on_off_policy_loss`
(off_policy_reshape "p_div_p_0.1") and `rl_dataset_with_target.py` (the target is the whole R1 response, thought
and solution; its opening "<think>\\n" is dropped only when the prompt already ends with one).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.data import templates
from trapo_jax.errors import require
from trapo_jax.sampling import microgroup


@base.register
@dataclasses.dataclass(frozen=True)
class Luffy(base.Method):
  name: ClassVar[str] = "luffy"
  gamma: float = 0.1  # policy shaping f(p) = p / (p + gamma) on demonstration tokens

  def demo_form(self, cfg) -> str:
    return "response_after_think" if templates.opens_think(cfg.data.template) else "response"

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    # The last stage of one row is "guided" at ratio 1: the whole demonstration, nothing generated.
    plan = microgroup.Plan(stages=(cfg.rollout.n - 1, 1), guidance=microgroup.FixedRatio(ratio=1.0))
    shaped = losses.Term("luffy", tokens="imitated", loss="luffy_shaped", aggregation=cfg.loss.aggregation,
                         params=(("gamma", float(self.gamma)),))
    return (base.Phase("rl", plan, base.objective(cfg, shaped, base.policy_gradient(cfg), base.entropy_bonus(cfg)),
                       temperature=float(cfg.rollout.temperature)),)

  def check(self, cfg) -> None:
    require(self.gamma > 0, "luffy.gamma", "must be > 0")
    require(cfg.rollout.n >= 2, "rollout.n", "luffy needs at least one rollout besides the demonstration")
