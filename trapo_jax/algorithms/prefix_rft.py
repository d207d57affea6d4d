"""Prefix-RFT (docs/algorithm.md#prefix-rft): per prompt, some groups of rollouts are the model's own and the others
continue a prefix of a demonstration, its ratio r = low + (high - low) Beta(1, 1) with bounds scheduled over
training; prefix tokens share their row's advantage under the PPO-clip surrogate, but only those outside the
lowest-entropy share of a micro-batch's prefix tokens keep it; Dr.GRPO advantages (no std); a token mean over the
micro-batch's response tokens (the shipped YAML's `loss_agg_mode: token-mean`; `aggregation`).

Official code: ZeroYuHuang/prefix_rft 5f5d2a1, `recipe/prefix_rft/`: `rl_dataset.py:PrefixRFTDataset`
(`num_prefix` groups of which `num_empty_prefix` unguided, a random demonstration per group, `_get_prefix`: int(r x
length) tokens, at least `min_prefix_len`, at most length - 1; the prefix appended to the prompt and cut to
`max_prompt_length`), `ray_trainer.py:post_process_gen_batch` (the response trained on is prefix + continuation,
`prefix_mask` on the prefix), `scheduler/global_step.py` (`BetaSampler`, `CosineDecayController`, `CTRL_MAPPING`),
`dp_actor.py:reshape_func` ("entropy": the lowest-entropy share of the micro-batch's prefix tokens get advantage 0,
the share `ent_mask_ratio_ctrl.value(global_step)`, global_step counting from 1), `core_algos.py:compute_policy_loss`
(dual clip, c = 3), `agg_loss` (`loss_agg_mode`: the YAML's token-mean; "dr_grpo", sum / max tokens, is
`aggregation="seq_sum_over_max_len"`), `compute_dr_grpo_outcome_advantage` (mean-centred, no std) and the prefix
estimators `compute_dr_grpo_prefix_outcome_advantage`, `_v2` (`advantage`).

The repository ships its trainer defaults (`config/prefix_rft_trainer.yaml`) but no run configuration (its scripts
take a `$TRAIN_CONFIG` it does not contain), and the YAML has none of the recipe's own keys, so these are guesses
from the paper's description: 2 groups of 4 rollouts, 1 unguided; the upper bound decays by a cosine from 0.95 to
0.05 over the run, the lower bound stays 0.05; `min_prefix_len` 1; the entropy term over every response token; the
bounds' step is the 0-based optimizer step. The entropy mask's controller (`off_ent_mask_ratio_ctrl_type` and its
kwargs) has no value in the code either: `mask_ctrl` = "const" at `mask_init` = 0.8 is the paper's (the top 20 % of
prefix tokens by entropy keep their advantage); "linear_decay" and "cosine_decay" are the official classes, each
kwarg left at -1 taking their __init__'s default. The YAML's `adv_estimator: gae` needs a critic, which no method
here has: the default stays Dr.GRPO, the estimator the paper names.
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

ADVANTAGES = ("dr_grpo",) + losses.PREFIX_ESTIMATORS
PLACEMENTS = ("prompt", "response")


@dataclasses.dataclass(frozen=True)
class DrawnRatio(microgroup.Drawn):
  """Prefix-RFT's prefixes (official `PrefixRFTDataset.__getitem__`/`_get_prefix`): the first `unguided` stages are
  the model's own; in each later stage, per prompt, one of its demonstrations at random, r = low + (high - low) *
  Beta(*beta) with (low, high) the `bounds`, and its first max(floor(r * m), min_prefix) tokens, at most m - 1, m the
  demonstration's length without EOS (at least one of its tokens is left to generate). With prompt_budget > 0 the
  prefix is then cut to the prompt's room, prompt_budget - prompt length (the official right truncation of prompt +
  prefix at max_prompt_length; none left: no prefix). The ratio recorded is the prefix length over m."""
  unguided: int = 1  # official num_empty_prefix
  bounds: tuple[float, float] = (0.0, 1.0)
  beta: tuple[float, float] = (1.0, 1.0)  # official BetaSampler
  min_prefix: int = 1  # official min_prefix_len
  prompt_budget: int = 0  # > 0: prompt + prefix tokens at most this, the continuation its own budget

  def guides(self, stage: int) -> bool:
    return stage >= self.unguided

  def inputs(self, stage, levels, demo_ids, demo_lens, split_ids, rng=None, prompt_lens=None) -> microgroup.StageInputs:
    del levels, split_ids
    g, _, width = demo_ids.shape
    if not self.guides(stage):
      return microgroup.given_inputs([np.zeros(0, np.int32)] * g, np.zeros(g), width)
    if self.prompt_budget > 0 and prompt_lens is None:
      raise ValueError("a plan whose prefix sits in the prompt's budget needs the prompt lengths")
    low, high = min(self.bounds), max(self.bounds)
    prefixes, ratios = [], []
    for i in range(g):
      have = np.flatnonzero(demo_lens[i] > 1)
      which = int(rng.choice(have)) if have.size else 0
      r = low + (high - low) * rng.beta(*self.beta)
      m = int(demo_lens[i, which]) - 1  # without EOS
      k = min(max(int(r * m), self.min_prefix), m - 1) if m > 1 else 0
      if self.prompt_budget > 0:
        k = max(0, min(k, self.prompt_budget - int(prompt_lens[i])))
      prefixes.append(demo_ids[i, which, :k])
      ratios.append(k / m if m > 0 else 0.0)
    return microgroup.given_inputs(prefixes, ratios, width)


@dataclasses.dataclass(frozen=True)
class MaskShare:
  """The share of a micro-batch's prefix tokens whose advantage is masked at optimizer step `step` (0-based): the
  official controller at global_step = step + 1 (the actor's step counts from 1)."""
  kind: str
  init: float
  target: float
  n_steps: int
  warmup_ratio: float

  def __call__(self, step: int) -> float:
    return schedules.controller(self.kind, step + 1, self.init, self.target, self.n_steps, self.warmup_ratio)


@base.register
@dataclasses.dataclass(frozen=True)
class PrefixRft(base.Method):
  name: ClassVar[str] = "prefix_rft"
  stages: tuple[int, ...] = (4, 4)  # guess: groups of rollouts per prompt, summing to rollout.n
  unguided: int = 1  # guess: the first groups are the model's own (official num_empty_prefix)
  high: tuple[float, float] = (0.95, 0.05)  # guess: the upper bound's cosine, from -> to
  low: tuple[float, float] = (0.05, 0.05)  # guess: the lower bound's (constant)
  schedule_steps: float = 1.0  # guess: the cosines' length as a fraction of train.steps
  min_prefix: int = 1  # guess: official min_prefix_len
  # The entropy mask's controller (official off_ent_mask_ratio_ctrl_type, schedules.CONTROLLERS) and its kwargs; the
  # code sets none of them. -1: the class's default (schedules.CONTROLLER_DEFAULTS).
  mask_ctrl: str = "const"
  mask_init: float = 0.8  # the paper's 80 % masked ("const": at every step); the const class's own default is 0
  mask_target: float = -1.0
  mask_steps: int = -1  # optimizer steps
  mask_warmup: float = -1.0
  advantage: str = "dr_grpo"  # or the official prefix estimators (losses.PREFIX_ESTIMATORS); not "gae" (a critic)
  placement: str = "prompt"  # where the prefix sits: the official "prompt" budget, or "response" (the one before)
  prompt_budget: int = -1  # "prompt": prompt + prefix tokens at most (official max_prompt_length); -1: data's
  clip_eps: float = 0.2
  clip_c: float = 3.0  # dual clip for A < 0
  aggregation: str = "token_mean"  # the shipped YAML's loss_agg_mode; "seq_sum_over_max_len": agg_loss("dr_grpo")

  def demo_form(self, cfg) -> str:
    return base.whole_response(cfg)

  def bounds(self, cfg, step: int) -> tuple[float, float]:
    """(low, high) of the prefix ratio at optimizer step `step`."""
    steps = max(1, round(self.schedule_steps * cfg.train.steps))
    return (schedules.cosine_bound(step, *self.low, steps), schedules.cosine_bound(step, *self.high, steps))

  def mask_share(self) -> MaskShare:
    """The entropy mask's controller with the class defaults filled in where a kwarg is -1."""
    init, target, n_steps, warmup = schedules.CONTROLLER_DEFAULTS[self.mask_ctrl]
    pick = lambda value, default: default if value == -1 else value
    return MaskShare(self.mask_ctrl, float(pick(self.mask_init, init)), float(pick(self.mask_target, target)),
                     int(pick(self.mask_steps, n_steps)), float(pick(self.mask_warmup, warmup)))

  def plan(self, cfg, step: int) -> microgroup.Plan:
    budget = 0
    if self.placement == "prompt":
      budget = self.prompt_budget if self.prompt_budget > 0 else int(cfg.data.max_prompt_len)
    drawn = DrawnRatio(unguided=self.unguided, bounds=self.bounds(cfg, step), min_prefix=self.min_prefix,
                       prompt_budget=budget)
    return microgroup.Plan(stages=self.stages, guidance=drawn, imitate="all")

  def phase_at(self, cfg, step: int) -> base.Phase:
    """Only the rows change with the step (the bounds): one objective, compiled once; a scheduled mask share is an
    input of the step (losses.Term.inputs), a constant one a constant of it."""
    clip = dict(clip_eps=float(self.clip_eps), dual_clip=float(self.clip_c))
    own = base.policy_gradient(cfg, aggregation=self.aggregation, **clip)
    share = self.mask_share()
    if share.kind == "const":
      mask, inputs = (("entropy_drop", share.init),), ()
    else:
      mask, inputs = (), (("entropy_drop", share),)
    prefix = losses.Term("prefix", tokens="imitated", loss="prefix_rft_surrogate", aggregation=self.aggregation,
                         params=tuple(clip.items()) + mask, inputs=inputs)
    return base.Phase("rl", self.plan(cfg, step), base.objective(cfg, own, prefix, base.entropy_bonus(cfg)),
                      temperature=float(cfg.rollout.temperature),
                      prefix_advantages=self.advantage in losses.PREFIX_ESTIMATORS)

  def phases(self, cfg) -> tuple[base.Phase, ...]:
    return (self.phase_at(cfg, 0),)

  def advantages(self, cfg, rb, rewards: np.ndarray):
    """The prefix estimators' (losses.prefix_advantages): a prompt's rows continuing one prefix (one guided stage)
    form a group, its rows without a prefix another, as the official prefix_uid groups them; Dr.GRPO (None): the
    run's estimator over all the prompt's rows."""
    if self.advantage not in losses.PREFIX_ESTIMATORS:
      return None
    guided = rb.kind == losses.ROW_GUIDED  # a drawn prefix of no token leaves the row the model's own
    per_prompt = len(self.stages) + 1
    base_keys = rb.group_ids.astype(np.int64) * per_prompt
    keys = np.where(guided, base_keys + rb.stage + 1, base_keys)
    _, dense = np.unique(np.concatenate([keys, base_keys]), return_inverse=True)
    n = len(keys)
    if dense.max(initial=0) >= n:
      raise ValueError("prefix_rft.unguided: a prompt has no row without a prefix to centre its prefixes on")
    own, prefix = losses.prefix_advantages(self.advantage, np.asarray(rewards, np.float32), dense[:n], dense[n:],
                                           guided)
    return np.asarray(own), np.asarray(prefix)

  def check(self, cfg) -> None:
    require(len(self.stages) >= 1 and all(s >= 1 for s in self.stages), "prefix_rft.stages", "must be positive sizes")
    require(sum(self.stages) == cfg.rollout.n, "prefix_rft.stages",
            f"sizes {self.stages} must sum to rollout.n={cfg.rollout.n}")
    require(0 <= self.unguided < len(self.stages), "prefix_rft.unguided",
            f"must leave at least one of the {len(self.stages)} groups guided")
    require(all(0 <= r <= 1 for r in self.high + self.low) and len(self.high) == len(self.low) == 2,
            "prefix_rft.high", "bounds are (from, to) pairs in [0, 1]")
    require(self.schedule_steps > 0, "prefix_rft.schedule_steps", "must be > 0")
    require(self.min_prefix >= 1, "prefix_rft.min_prefix", "must be >= 1")
    require(self.mask_ctrl in schedules.CONTROLLERS, "prefix_rft.mask_ctrl",
            f"must be one of {schedules.CONTROLLERS} (official CTRL_MAPPING)")
    share = self.mask_share()
    require(0 <= share.init <= 1 and 0 <= share.target <= 1, "prefix_rft.mask_init",
            "the mask's shares (mask_init, mask_target) must lie in [0, 1]")
    require(share.n_steps >= 1 and 0 <= share.warmup_ratio < 1, "prefix_rft.mask_steps",
            "needs mask_steps >= 1 and mask_warmup in [0, 1)")
    # The official classes' own assertions.
    require(share.kind != "linear_decay" or share.init > share.target, "prefix_rft.mask_init",
            "linear_decay needs mask_init > mask_target")
    require(share.kind != "cosine_decay" or share.init != share.target, "prefix_rft.mask_init",
            "cosine_decay needs mask_init != mask_target")
    require(self.advantage in ADVANTAGES, "prefix_rft.advantage",
            f"must be one of {ADVANTAGES} (the YAML's gae needs a critic: not built)")
    require(self.advantage == "dr_grpo" or self.unguided >= 1, "prefix_rft.unguided",
            f"{self.advantage} centres each prefix on the prompt's rows without one: needs unguided >= 1")
    require(self.placement in PLACEMENTS, "prefix_rft.placement", f"must be one of {PLACEMENTS}")
    require(self.prompt_budget == -1 or self.prompt_budget > 0, "prefix_rft.prompt_budget",
            "must be > 0, or -1 for data.max_prompt_len")
    require(self.clip_eps > 0 and self.clip_c > 1, "prefix_rft.clip_c", "needs clip_eps > 0 and clip_c > 1")
    require(self.aggregation in losses.AGGREGATIONS, "prefix_rft.aggregation",
            f"must be one of {losses.AGGREGATIONS}")
