"""CHORD (docs/algorithm.md#chord): (1 - mu) x GRPO on the model's own rollouts + mu x an SFT term on a separate
share of demonstration rows; CHORD-mu schedules mu with plain NLL, CHORD-phi keeps mu fixed and weights each
demonstration token by sg(p (1 - p)).

Official code: modelscope/Trinity-RFT, `trinity/algorithm/policy_loss_fn/chord_policy_loss.py`
(`MIXCHORDPolicyLossFn`: the PPO loss, clip 0.2 and dual clip 3 (Trinity's PPO loss), token mean over the micro-batch's own rows and the SFT loss token
mean over its expert rows, each times the micro-batch's share of that row type; `mu_schedule_function`;
`SFTPhiLossFn`), `trinity/algorithm/advantage_fn/grpo_advantage.py` (advantages divided by the group std),
`examples/mix_chord/mix_chord.yaml` (expert_data_ratio 0.2; mu warm-up 200, decay 400, peak 0.5, valley 0.02 with
phi on; its comments give the paper's CHORD-mu as warm-up 0, decay 200, peak 0.9, valley 0.05, phi off, and
CHORD-phi as mu = 0.1). `chord_mu`'s defaults are the paper's CHORD-mu; the example's run is
experiments/configs/chord_example.py.

Here the expert rows are the prompts' own demonstrations, appended to each prompt's rows, ungraded and outside its
GRPO group: k = round(n x share / (1 - share)) per prompt, 2 for n = 8 at the official 20 %, whatever the batch.
The mu schedule is in fractions of train.steps (`mu_warmup`, `mu_decay`): 0 and 0.4 equal the paper's 0 and 200
steps at this comparison's 500-step budget (the official run's length is not published).

Not verified: Trinity's `entropy_loss_fn="mix"` coefficient (its default is 0: no entropy term here) and whether
its step count starts at 0 or 1 (here: the 0-based optimizer step).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.algorithms import schedules
from trapo_jax.errors import require
from trapo_jax.sampling import microgroup


@dataclasses.dataclass(frozen=True)
class ChordWeight:
  """A term weight of the step: mu(t) for the SFT term or 1 - mu(t) for GRPO, over the row type's share of the
  batch (the official per-micro-batch weight of each type, with the `row_share_token_mean` aggregation)."""
  warmup: int
  decay: int
  peak: float
  valley: float
  sft: bool
  share: float

  def __call__(self, step: int) -> float:
    mu = schedules.chord_mu(step, self.warmup, self.decay, self.peak, self.valley)
    return (mu if self.sft else 1.0 - mu) / self.share


@dataclasses.dataclass(frozen=True)
class Chord(base.Method):
  """CHORD's terms and rows; the registered variants differ by their defaults."""
  mu_warmup: float = 0.0  # fraction of train.steps (the paper's CHORD-mu: 0 steps)
  mu_decay: float = 0.4  # fraction of train.steps (the paper's 200 steps of 500)
  mu_peak: float = 0.9
  mu_valley: float = 0.05
  phi: bool = False  # weight each demonstration token's -log p by sg(p (1 - p))
  expert_share: float = 0.2  # demonstration rows' share of the batch (official expert_data_ratio)
  clip_eps: float = 0.2
  dual_clip: float = 3.0  # Trinity's PPO loss caps a negative advantage's loss at -3 A
  use_std: bool = True

  def demo_form(self, cfg) -> str:
    return base.whole_response(cfg)

  def demo_rows(self, cfg) -> int:
    return round(cfg.rollout.n * self.expert_share / (1.0 - self.expert_share))

  def mu_steps(self, cfg) -> tuple[int, int]:
    return round(self.mu_warmup * cfg.train.steps), round(self.mu_decay * cfg.train.steps)

  def weight(self, cfg, *, sft: bool) -> ChordWeight:
    n, k = cfg.rollout.n, self.demo_rows(cfg)
    warmup, decay = self.mu_steps(cfg)
    return ChordWeight(warmup=warmup, decay=decay, peak=float(self.mu_peak), valley=float(self.mu_valley), sft=sft,
                       share=(k if sft else n) / (n + k))

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    plan = microgroup.Plan(stages=(cfg.rollout.n,), guidance=microgroup.Unguided(),
                           demos=tuple(range(self.demo_rows(cfg))))
    pg = base.policy_gradient(cfg, weight=self.weight(cfg, sft=False), aggregation="row_share_token_mean",
                              over="selected", clip_eps=float(self.clip_eps), dual_clip=float(self.dual_clip))
    sft = losses.Term("sft", tokens="demo_rows", loss="phi_nll" if self.phi else "nll",
                      weight=self.weight(cfg, sft=True), aggregation="row_share_token_mean", over="selected")
    return (base.Phase("rl", plan, base.objective(cfg, pg, sft), temperature=float(cfg.rollout.temperature)),)

  def advantage_std(self, cfg) -> bool:
    return self.use_std

  def check(self, cfg) -> None:
    key = f"{self.name}."
    require(0 < self.expert_share < 1, key + "expert_share", "must lie in (0, 1)")
    require(1 <= self.demo_rows(cfg) <= 2, key + "expert_share",
            f"gives {self.demo_rows(cfg)} demonstration rows per prompt at rollout.n={cfg.rollout.n}; each problem "
            "has 1 or 2")
    require(self.mu_warmup >= 0 and self.mu_decay >= 0, key + "mu_warmup", "warm-up and decay must be >= 0")
    require(0 <= self.mu_valley <= 1 and 0 <= self.mu_peak <= 1, key + "mu_peak", "mu must lie in [0, 1]")
    require(self.clip_eps > 0, key + "clip_eps", "must be > 0")
    require(self.dual_clip > 1, key + "dual_clip", "must be > 1")


@base.register
@dataclasses.dataclass(frozen=True)
class ChordMu(Chord):
  name: ClassVar[str] = "chord_mu"


@base.register
@dataclasses.dataclass(frozen=True)
class ChordPhi(Chord):
  name: ClassVar[str] = "chord_phi"
  mu_warmup: float = 0.0
  mu_decay: float = 0.0
  mu_peak: float = 0.1
  mu_valley: float = 0.1
  phi: bool = True
