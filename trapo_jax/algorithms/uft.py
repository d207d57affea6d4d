"""UFT (docs/algorithm.md#uft): each prompt's rollouts continue a hint, the first k of up to 5 segments of its
solution, each segment kept with probability p(t) = 0.05 + 0.45 (1 + cos(pi t / T_hint)) and no hint after T_hint;
loss = GRPO on the generated tokens + beta x the token-mean NLL of the hint tokens.

Official code: liumy2010/UFT, `verl/utils/dataset/rl_dataset.py:RLHFDataset.__getitem__` (the hint: num = min(5,
steps) segments of the solution's steps, k = the number of num Bernoulli(p) draws, the first k segments appended to
the prompt; `timestep` from 1), `verl/workers/actor/dp_actor.py:update_policy` (PPO loss, clip 0.2, token mean;
`sft_loss_coef` x the token-mean cross-entropy of the hint tokens; entropy 0.001; the KL loss, `low_var_kl`: k3
clamped to [-10, 10], token mean, 0.001), `verl/trainer/ppo/core_algos.py:compute_grpo_outcome_advantage` (divided
by the group std), `run.py` (T = 500, T_hint = 300, p from 0.05 to 0.95, beta = 0.001, 4 rollouts, 256 prompts per
batch in 4 PPO mini-batches).

Here the hint is a given prefix of the response rather than the end of the prompt: the same tokens in the same order,
but the grader reads only what the model generated (`grade_given=False`), as the official reward reads the response
alone, and the policy gradient and entropy see only generated tokens. Segments are the demonstration's "\\n\\n"
steps; T_hint is `hint_steps` x train.steps (0.6 = the official 300 of 500).

The KL term is UFT's own (`kl_coef`), so loss.kl_coef stays 0; its reference is the initial policy.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from trapo_jax import losses
from trapo_jax.algorithms import base
from trapo_jax.algorithms import schedules
from trapo_jax.errors import require
from trapo_jax.sampling import microgroup


def segment_ends(demo: np.ndarray, split_ids: np.ndarray, segments: int) -> list[int]:
  """Token counts of the first 0, 1, ..., num segments of a demonstration without EOS (docs/algorithm.md#uft).

  The demonstration's steps end just after each "\n\n" token; num = min(segments, steps) segments of round(j /
  num * steps) steps (Python's rounding, as the official `separation`), the last ending with the text.
  """
  m = len(demo)
  ends = [j + 1 for j in np.flatnonzero(np.isin(demo, split_ids)) if j + 1 < m] + [m]
  if m == 0:
    return [0]
  num = min(segments, len(ends))
  steps = [round(j / num * len(ends)) for j in range(num)] + [len(ends)]
  return [0 if s == 0 else ends[s - 1] for s in steps]


@dataclasses.dataclass(frozen=True)
class Hints(microgroup.Drawn):
  """UFT's hints (official `RLHFDataset.__getitem__`): per prompt and stage, the first k of the num segments of demo
  #0 (segment_ends), k ~ Binomial(num, prob); every row of the stage continues the same hint (UFT has one stage, so
  one hint per prompt), every stage is guided (a hint of no segments is no prefix). The ratio recorded is the
  hint's share of the demonstration."""
  prob: float = 0.0  # the probability of keeping each segment, p(t)
  segments: int = 5

  def guides(self, stage: int) -> bool:
    return True

  def inputs(self, stage, levels, demo_ids, demo_lens, split_ids, rng=None, prompt_lens=None) -> microgroup.StageInputs:
    del stage, levels, prompt_lens
    g, _, width = demo_ids.shape
    prefixes, ratios = [], []
    for i in range(g):
      demo = demo_ids[i, 0, :max(int(demo_lens[i, 0]) - 1, 0)]
      ends = segment_ends(demo, split_ids, self.segments)
      k = int((rng.random(len(ends) - 1) < self.prob).sum())
      prefixes.append(demo[:ends[k]])
      ratios.append(ends[k] / int(demo_lens[i, 0]) if demo_lens[i, 0] else 0.0)
    return microgroup.given_inputs(prefixes, ratios, width)


@base.register
@dataclasses.dataclass(frozen=True)
class Uft(base.Method):
  name: ClassVar[str] = "uft"
  hint_steps: float = 0.6  # T_hint / train.steps (official 300 / 500)
  p_low: float = 0.05
  p_high: float = 0.95
  segments: int = 5
  sft_coef: float = 0.001  # beta: weight of the hint tokens' NLL
  clip_eps: float = 0.2
  use_std: bool = True
  kl_coef: float = 0.001  # official use_kl_loss: kl_loss_coef x the clamped k3 to the reference, token mean
  mini_batches: int = 4  # AdamW steps per batch (official: 256 prompts in 4 PPO mini-batches)

  def demo_form(self, cfg) -> str:
    return base.whole_response(cfg)

  def t_hint(self, cfg) -> int:
    return round(self.hint_steps * cfg.train.steps)

  def hint_prob(self, cfg, step: int) -> float:
    """p at optimizer step `step` (0-based; the official timestep is step + 1)."""
    return schedules.uft_hint_prob(step + 1, self.t_hint(cfg), self.p_low, self.p_high)

  def phase_at(self, cfg, step: int) -> base.Phase:
    """Only the rows change with the step (p): one objective, compiled once."""
    hints = Hints(prob=self.hint_prob(cfg, step), segments=self.segments)
    plan = microgroup.Plan(stages=(cfg.rollout.n,), guidance=hints, imitate="all", grade_given=False)
    pg = base.policy_gradient(cfg, aggregation="token_mean", over="selected", clip_eps=float(self.clip_eps))
    hint = losses.Term("hint_nll", tokens="imitated", loss="nll", weight=float(self.sft_coef),
                       aggregation="token_mean", over="selected")
    entropy = losses.Term("entropy", tokens="own", loss="entropy", weight=-float(cfg.loss.entropy_coef),
                          aggregation="token_mean", over="selected")
    terms = (pg, hint, entropy)
    if self.kl_coef > 0:
      terms += (losses.Term("kl", tokens="own", loss="reference_kl", weight=float(self.kl_coef),
                            aggregation="token_mean", over="selected", params=(("estimator", "k3_clamped"),)),)
    return base.Phase("rl", plan, base.objective(cfg, *terms), temperature=float(cfg.rollout.temperature),
                      mini_batches=self.mini_batches)

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    return (self.phase_at(cfg, 0),)

  def advantage_std(self, cfg) -> bool:
    return self.use_std

  def check(self, cfg) -> None:
    require(0 <= self.hint_steps <= 1, "uft.hint_steps", "must lie in [0, 1] (a fraction of train.steps)")
    require(0 <= self.p_low <= self.p_high <= 1, "uft.p_low", "needs 0 <= p_low <= p_high <= 1")
    require(self.segments >= 1, "uft.segments", "must be >= 1")
    require(self.sft_coef >= 0, "uft.sft_coef", "must be >= 0")
    require(self.clip_eps > 0, "uft.clip_eps", "must be > 0")
    require(self.kl_coef >= 0, "uft.kl_coef", "must be >= 0")
    require(self.mini_batches >= 1, "uft.mini_batches", "must be >= 1")
    require(cfg.loss.kl_coef == 0, "loss.kl_coef", "uft has its own KL term (uft.kl_coef): leave loss.kl_coef at 0")
