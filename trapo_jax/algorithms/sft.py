"""SFT (docs/algorithm.md#sft): token-mean NLL on one whole demonstration per problem, nothing sampled.

As the official SFT data preparation (ElliottYan/LUFFY `data/prepare_sft.py`, used by TRAPO's SFT baseline): the
target is the whole R1 response with its leading "<think>\\n" removed.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.sampling import microgroup


@base.register
@dataclasses.dataclass(frozen=True)
class Sft(base.Method):
  name: ClassVar[str] = "sft"

  def demo_form(self, cfg) -> str:
    return "response_after_think"

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    nll = losses.Term("nll", tokens="imitated", loss="nll", aggregation="token_mean")
    return (base.Phase("sft", microgroup.DemoRows(which=(0,)), base.objective(cfg, nll)),)
