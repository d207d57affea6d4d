"""What a training method declares, in one place (docs/algorithm.md): its config group with the official defaults,
its phases over the run, each phase's rows and objective, and its own config checks.

The trainer, config validation and the compile benchmark ask the registry; nothing else branches on a method's
name. A method is a frozen dataclass: its fields are the config group `cfg.<name>`, so `--config.<name>.<field>`
sets them and `--config.algo=<name>` alone selects the whole method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import ml_collections
import numpy as np

from trapo_jax import losses
from trapo_jax.data import templates
from trapo_jax.errors import ConfigError, require
from trapo_jax.sampling import microgroup


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of training with one way of making rows and one objective (one compiled step)."""
  name: str
  rows: microgroup.Plan | microgroup.DemoRows  # sampled stages, or demonstrations alone
  objective: losses.Objective
  # The update's log-probs are of softmax(logits / temperature), the distribution the rows were sampled from, as the
  # official actor divides by rollout.temperature in both its old-log-prob pass and its update.
  temperature: float = 1.0
  optimizer: str = ""  # which optimizer updates: "" the run's (cfg.optim), else one of Method.optimizers
  prompts: int = 0  # prompts per update; 0: train.batch_prompts (a phase run from `after_update` may differ)
  # How the phase's official code accumulates (docs/algorithm.md#accumulation): its micro-batch gradients' "mean"
  # or "sum"; with "sum", the micro-batches per mini-batch it sums (the official K); optimizer updates per batch
  # (0: train.mini_batches).
  micro_reduce: str = "mean"
  micro_batches: int = 0
  mini_batches: int = 0
  # Which training prompts the phase draws (`prompt_part`): "" all; "train" those not held out, "held_out" the
  # Method.held_out(cfg) share kept for a later phase (SFT->RL's RL phase on prompts its SFT never saw).
  prompts_from: str = ""
  # Whether the batch carries a per-row advantage of the given prefix tokens apart from the row's own
  # (Method.advantages; Prefix-RFT's prefix-specific estimators).
  prefix_advantages: bool = False

  @property
  def rows_per_prompt(self) -> int:
    return self.rows.n

  @property
  def samples(self) -> bool:
    return isinstance(self.rows, microgroup.Plan)


@dataclasses.dataclass(frozen=True)
class Method:
  """Base of every registered method; see the module docstring."""
  name: ClassVar[str] = ""

  @classmethod
  def config_group(cls) -> ml_collections.ConfigDict:
    """The config group `cfg.<name>`: every field with its default."""
    return ml_collections.ConfigDict({f.name: _default(f) for f in dataclasses.fields(cls)})

  @classmethod
  def from_config(cls, cfg) -> "Method":
    group = cfg[cls.name]
    return cls(**{f.name: _frozen(group[f.name]) for f in dataclasses.fields(cls)})

  def demo_form(self, cfg) -> str:
    """Which text of a demonstration this method's rows hold (`trapo_jax.data.demos.demo_text`)."""
    del cfg
    return "thought"

  def phases(self, cfg) -> tuple[Phase, ...]:
    """Every phase the run may enter, in order (each is compiled once)."""
    raise NotImplementedError

  def phase_at(self, cfg, step: int) -> Phase:
    """The phase of optimizer step `step` (0-based). Default: the method's only phase."""
    del step
    (phase,) = self.phases(cfg)
    return phase

  def check(self, cfg) -> None:
    """Raises ConfigError naming the key of a value this method cannot work with."""
    del cfg

  def advantage_std(self, cfg) -> bool:
    """Whether group advantages are divided by the group's std. Default: loss.use_std."""
    return bool(cfg.loss.use_std)

  def advantages(self, cfg, rb, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The method's own advantages of a RolloutBatch `rb` with (shaped) rewards [N]: (each row's [N], each row's
    given prefix's [N] or None), the latter for a phase with prefix_advantages. Default: None, the run's estimator
    (loss.advantage) over each prompt's group."""
    del cfg, rb, rewards
    return None

  def length_from_data(self, cfg, examples) -> dict[str, Any]:
    """Config changes (dotted keys) that set the run's length from its training examples (the loader's, after
    filtering), for a method whose length is counted in epochs over them (SFT's `epochs`). Default: none."""
    del cfg, examples
    return {}

  def held_out(self, cfg) -> float:
    """The share of training prompts held out for phases with prompts_from="held_out". Default: none."""
    del cfg
    return 0.0

  def optimizers(self, cfg) -> dict[str, dict[str, Any]]:
    """Optimizers besides the run's, by name: each the cfg.optim keys it changes. Their state is part of the train
    state (and so of every checkpoint). Default: none."""
    del cfg
    return {}

  def initial_state(self, cfg) -> dict[str, Any]:
    """The method's own run state, JSON-serialisable, saved with every checkpoint. Default: none."""
    del cfg
    return {}

  def after_update(self, cfg, step: int, uids: np.ndarray, rewards: np.ndarray,
                   state: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[Phase, list[int]]]]:
    """After optimizer step `step` (0-based) on the prompts `uids` [G] whose rows got `rewards` [G, rows] (the
    global batch): the method's new run state and further updates to run now, each a phase of demonstration rows and
    the uids of the prompts it trains on. Default: none."""
    del cfg, step, uids, rewards
    return state, []


def _default(f: dataclasses.Field) -> Any:
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  raise TypeError(f"method field {f.name} needs a default (the official value)")


def _frozen(value: Any) -> Any:
  """Config values -> hashable dataclass fields (lists from flags become tuples)."""
  return tuple(value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------------------------
# The registry.

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
  """Class decorator: makes a method findable by its `name`."""
  if not cls.name or cls.name in _REGISTRY:
    raise ValueError(f"method {cls.__name__}: name {cls.name!r} is empty or registered twice")
  _REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get(name: str) -> type[Method]:
  if name not in _REGISTRY:
    raise ConfigError(f"algo: unknown method {name!r} (registered: {', '.join(names())})")
  return _REGISTRY[name]


def from_config(cfg) -> Method:
  """The method `cfg.algo` names, built from its config group."""
  return get(cfg.algo).from_config(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Terms and plans the methods share.


def objective(cfg, *terms: losses.Term) -> losses.Objective:
  """The terms over the run's fixed response length and sequence scale (docs/algorithm.md, normalisation); an RL
  objective (one with a policy-gradient term) also gets the KL to the reference policy when loss.kl_in is "loss",
  unless the method has its own."""
  if (any(t.loss == "policy_gradient" for t in terms) and cfg.loss.kl_coef > 0 and cfg.loss.kl_in == "loss"
      and not any(t.loss == "reference_kl" for t in terms)):  # a method's own KL term (UFT's) stands instead
    terms += (reference_kl(cfg),)
  return losses.Objective(terms=tuple(terms), max_len=int(cfg.data.max_response_len),
                          seq_scale=float(cfg.loss.seq_scale))


def policy_gradient(cfg, *, weight=1.0, aggregation: str | None = None, over: str = "response",
                    **params) -> losses.Term:
  """-A * ratio on the tokens the model generated itself; PPO clip only if loss.clip_eps >= 0 (official: none).

  The options of docs/algorithm.md#rl-options enter as further params, only when set, so that the official term
  is the same Term as before them. A method with its own clip (`clip_eps=`, `dual_clip=`), weight or aggregation
  passes it here and keeps every other option.
  """
  lc = cfg.loss
  options = {"clip_eps": None if lc.clip_eps < 0 else float(lc.clip_eps)}
  if lc.clip_eps_high >= 0:
    options["clip_eps_high"] = float(lc.clip_eps_high)
  if lc.dual_clip >= 0:
    options["dual_clip"] = float(lc.dual_clip)
  if lc.importance_ratio != "token":
    options["ratio"] = lc.importance_ratio
  if lc.tis_cap > 0:
    options.update(tis_cap=float(lc.tis_cap), tis_level=lc.tis_level, tis_mode=lc.tis_mode)
  options.update(params)
  return losses.Term("pg", tokens="own", loss="policy_gradient", weight=weight,
                     aggregation=aggregation or cfg.loss.aggregation, over=over, params=tuple(options.items()))


def reference_kl(cfg) -> losses.Term:
  """loss.kl_coef x the KL estimate (loss.kl_estimator) to the frozen reference policy on the model's own tokens."""
  return losses.Term("kl", tokens="own", loss="reference_kl", weight=float(cfg.loss.kl_coef),
                     aggregation=cfg.loss.aggregation, params=(("estimator", cfg.loss.kl_estimator),))


def entropy_bonus(cfg) -> losses.Term:
  """-entropy_coef x the token-mean entropy of every response token, prefixes and demonstrations included."""
  return losses.Term("entropy", tokens="response", loss="entropy", weight=-float(cfg.loss.entropy_coef),
                     aggregation="token_mean")


def whole_response(cfg) -> str:
  """The whole demonstration as a response (LUFFY's target: `tgt[0]['content']`), without its opening "<think>\n"
  when the prompt already ends with one."""
  return "response_after_think" if templates.opens_think(cfg.data.template) else "response"


def own_rollouts(cfg) -> microgroup.Plan:
  """n rollouts of the model's own per prompt, no guidance."""
  return microgroup.Plan(stages=(cfg.rollout.n,), guidance=microgroup.Unguided())


def accumulation(name: str, *, micro_batches: int, mini_batches: int) -> dict[str, Any]:
  """Phase fields of a verl-0.2 actor (HPT, SRFT, ReLIFT): each micro-batch's loss back-propagated unscaled, so the
  gradients of a mini-batch's `micro_batches` micro-batches add up, and `mini_batches` AdamW steps per batch.
  `name`: the method's config group, whose keys hold the two counts."""
  require(micro_batches >= 1, f"{name}.micro_batches", "must be >= 1")
  require(mini_batches >= 1, f"{name}.mini_batches", "must be >= 1")
  return dict(micro_reduce="sum", micro_batches=micro_batches, mini_batches=mini_batches)


PROMPT_PARTS = ("", "train", "held_out")


def in_part(uid: int, held_out: float, part: str) -> bool:
  """Whether the prompt `uid` belongs to `part` of a split holding out the `held_out` share: a fixed hash of the uid,
  so the split does not depend on the order, the batch or the process."""
  if part == "":
    return True
  held = (int(uid) * 2654435761 % 2 ** 32) / 2 ** 32 < held_out  # Knuth's multiplicative hash
  return held if part == "held_out" else not held


def check_rows(cfg, phases: tuple[Phase, ...], batch_shards: int) -> None:
  """Every phase's rows per step split evenly over the batch shards and its mini- and micro-batches; every term can
  be evaluated."""
  for phase in phases:
    rows = (phase.prompts or cfg.train.batch_prompts) * phase.rows_per_prompt
    require(rows % batch_shards == 0, "train.batch_prompts",
            f"{rows} sequences per step ({phase.name} phase) do not split over the {batch_shards} batch shards "
            "(mesh data x fsdp)")
    require(phase.prompts_from in PROMPT_PARTS, "algo", f"{cfg.algo}, {phase.name} phase: prompts_from "
            f"{phase.prompts_from!r} is not one of {PROMPT_PARTS}")
    if phase.mini_batches:
      require(cfg.train.mini_batches in (1, phase.mini_batches), "train.mini_batches",
              f"{cfg.algo} sets its own mini-batches ({cfg.algo}.mini_batches = {phase.mini_batches})")
    k = phase.mini_batches or cfg.train.mini_batches
    key = f"{cfg.algo}.mini_batches" if phase.mini_batches else "train.mini_batches"
    require(rows % (k * batch_shards) == 0, key,
            f"{rows} sequences per step ({phase.name} phase) do not split into {k} mini-batches over the "
            f"{batch_shards} batch shards")
    if phase.micro_batches:
      require(rows % (k * phase.micro_batches * batch_shards) == 0, f"{cfg.algo}.micro_batches",
              f"{rows} sequences per step ({phase.name} phase) do not split into {k} mini-batches of "
              f"{phase.micro_batches} micro-batches over the {batch_shards} batch shards")
    for term in phase.objective.terms:
      try:
        losses.check_term(term)
      except ValueError as e:
        raise ConfigError(f"algo: {cfg.algo}, {phase.name} phase: {e}") from None
