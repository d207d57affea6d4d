"""The rollouts of a training step: a phase's rows for a batch of prompts, sampled, graded and assembled, with their
metrics.

`Rollouts` is built once per run from the config, a sampler, a grader and the tokenizer's ids. Its one entry,
`collect(plan, prompts, params, rng)`, gives this process's rows of a phase (a Plan's stages, or demonstrations
alone), the rewards their advantages are computed from, and the step's rollout metrics over every process's rows.
Inside it: the plan's stages one sampler call each (rollout.collect), or every stage's alternatives in one decode
pass where `in_one_pass` (rollout.collect_one_pass); DAPO's dynamic sampling (train.dynamic_sampling) and soft
overlong punishment (rollout.overlong_buffer); the seconds spent sampling and grading.

It is the seam where another sampler backend would plug in, as Tunix's `BaseRollout` is for its vanilla, vLLM and
SGLang-JAX engines (google/tunix d19ecbb, `tunix/rl/rollout/base_rollout.py`: `generate`, `update_params`, `pad_id`,
`eos_id`). What the component asks of its `sampler` is the contract of trapo_jax/sampling/sampler.py's `sample`
and `sample_shared`: the policy's params passed with each call (Tunix's engines take them by `update_params`), rows
prompt-major as host arrays, a row's randomness keyed by its row id and sample (so that both paths, and any split
of the batch over processes, give a row the same tokens). Of its `grader` it asks a `(tokens, response_mask,
answers) -> (rewards, counts)` function (`MathVerify`). The trainer (trapo_jax/train/trainer.py) sees neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np

from trapo_jax import errors
from trapo_jax import losses
from trapo_jax import rewards as rewards_lib
from trapo_jax import sharding
from trapo_jax.data import pipeline
from trapo_jax.sampling import microgroup
from trapo_jax.sampling import rollout as rollout_lib


def in_one_pass(cfg, rows) -> bool:
  """Whether a phase's rows are sampled in one decode pass: rollout.one_pass asks for it (None: `one_pass_default`
  of the backend the run is on) and they are a plan whose stages are chosen by rewards
  (microgroup.one_pass_applies). The trainer's rollouts and --mode=compile both ask this, so that compile mode lowers
  the sampler calls training makes (it resolves None for its target first: `resolve_by_backend`)."""
  asked = cfg.rollout.one_pass
  if asked is None:
    asked = one_pass_default(jax.default_backend())
  return bool(asked) and isinstance(rows, microgroup.Plan) and microgroup.one_pass_applies(rows)


def one_pass_default(platform: str) -> bool:
  """rollout.one_pass=None's choice on `platform`: one pass on accelerators, where a decode step is bound by reading
  the weights and the KV cache and more rows per pass come almost free; the stages on CPU, where decode is bound by
  compute and one pass samples rows the stages never need (88 against 56 a prompt batch for TRAPO's 4, 2, 1, 1 on the
  default experiment; docs/algorithm.md#one-pass). Both keep the same rows."""
  return platform != "cpu"


def gathers_weights(cfg) -> bool:
  """Whether the sampler gathers the FSDP-sharded weights once per decode (Sampler's gather_weights):
  rollout.gather_weights, or where None `gather_weights_default` of the backend the run is on."""
  asked = cfg.rollout.gather_weights
  return gather_weights_default(jax.default_backend()) if asked is None else bool(asked)


def gather_weights_default(platform: str) -> bool:
  """rollout.gather_weights=None's choice on `platform`: on CPU, whose devices share the host's memory, a copy of the
  weights per device is cheap and each decode step's gathers are not (across processes, a message per layer and
  step); on accelerators the copy takes HBM the configs' slices were sized without (15 GB for a 7B model in
  bfloat16 per tensor shard), so the weights stay sharded unless asked."""
  return platform == "cpu"


def resolve_by_backend(cfg, platform: str):
  """cfg, with the choices left to the backend (rollout.one_pass, rollout.gather_weights: None) made for `platform`
  (a compile target's)."""
  r = cfg.rollout
  if r.one_pass is not None and r.gather_weights is not None:
    return cfg
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    if r.one_pass is None:
      cfg.rollout.one_pass = one_pass_default(platform)
    if r.gather_weights is None:
      cfg.rollout.gather_weights = gather_weights_default(platform)
  return cfg


class Collected(NamedTuple):
  """What `Rollouts.collect` gives for a step."""
  rows: rollout_lib.RolloutBatch  # this process's N rows
  rewards: np.ndarray  # [N] float32: the graded rewards, shaped where the config asks (`shaped_rewards`)
  metrics: dict[str, float]  # over every process's rows; the seconds this process sampled and graded


@dataclasses.dataclass(frozen=True)
class MathVerify:
  """The official training reward: math-verify over the decoded responses, alone (the boxed fallback is the
  evaluation's only), each response bounded by `timeout_s` in `workers` processes (rewards.grade_batch)."""
  tokenizer: Any
  timeout_s: float
  workers: int

  def __call__(self, tokens: np.ndarray, response_mask: np.ndarray, answers: list) -> tuple[np.ndarray, dict]:
    """tokens, response_mask [M, L], answers [M] -> (rewards [M] float32, the items that timed out and the worker
    restarts)."""
    texts = pipeline.decode_responses(self.tokenizer, tokens, response_mask)
    scores = rewards_lib.grade_batch(texts, answers, timeout_s=self.timeout_s, workers=self.workers, fallback=False)
    stats = rewards_lib.last_stats()
    return np.asarray(scores, np.float32), {"timeouts": stats.timeouts, "restarts": stats.restarts}


# grader(tokens [M, L], response_mask [M, L], answers [M]) -> (rewards [M], counts by name): MathVerify's contract.
Grader = Callable[[np.ndarray, np.ndarray, list], tuple[np.ndarray, dict]]


@dataclasses.dataclass
class Rollouts:
  """A run's rollouts (see the module docstring); `collect` is the entry. cfg: the run's config (rollout.*,
  data.max_response_len, train.dynamic_sampling and max_refill_rounds)."""
  cfg: Any
  sampler: Any  # trapo_jax.sampling.sampler.Sampler, or a backend with its sample and sample_shared
  grader: Grader
  eos_ids: tuple[int, ...]
  pad_id: int
  split_ids: np.ndarray  # the tokens a demonstration's prefixes are cut after (microgroup.split_token_ids)

  @classmethod
  def build(cls, cfg, sampler, tokenizer) -> "Rollouts":
    """The run's rollouts: its sampler, math-verify over its tokenizer's decoding (eval.grader_timeout_s and
    grader_workers), the tokenizer's EOS, padding and split tokens."""
    return cls(cfg=cfg, sampler=sampler, grader=MathVerify(tokenizer, cfg.eval.grader_timeout_s,
                                                            cfg.eval.grader_workers),
               eos_ids=(int(tokenizer.eos_token_id),), pad_id=pipeline.pad_id(tokenizer),
               split_ids=microgroup.split_token_ids(tokenizer))

  def collect(self, plan, prompts, params, rng: jax.Array, *, draws: np.random.Generator | None = None,
              more_prompts: Iterator | None = None) -> Collected:
    """A phase's rows for this process's share of the step's prompts (a PromptBatch of G prompts, the consecutive
    share of the global batch: its first prompt sits at process_index x G).

    plan: the phase's rows, a microgroup.Plan (sampled and graded) or microgroup.DemoRows (whole demonstrations,
    nothing sampled).
    params: the policy's. rng: the step's key; dynamic sampling's rounds fold in their number, as the first does
    0, so that another batch of prompts at the same positions draws other samples. draws: the plan's host draws
    (random prefixes, hints). more_prompts: further shares of prompt batches (the run's loader), which dynamic
    sampling draws from.
    """
    if not isinstance(plan, microgroup.Plan):  # demonstrations alone: nothing sampled or graded
      batch = rollout_lib.demo_batch(prompts, which=plan.which, max_len=self.cfg.data.max_response_len)
      return Collected(batch, batch.rewards, _clock_metrics({}))
    clock: dict[str, float] = {}
    rounds = itertools.count()
    once = lambda batch: self._rows(plan, batch, params, jax.random.fold_in(rng, next(rounds)), draws, clock)
    batch = once(prompts)
    refilled = {}
    if self.cfg.train.dynamic_sampling:
      batch, refilled = _refill(self.cfg, batch, once, more_prompts)
    shaped, shaping = shaped_rewards(self.cfg, batch)
    metrics = {**_rollout_metrics(batch, len(plan.stages)), **refilled, **shaping, **_clock_metrics(clock)}
    return Collected(batch, shaped, metrics)

  def _rows(self, plan: microgroup.Plan, prompts, params, rng: jax.Array, draws, clock: dict):
    """One round of the plan's rows for `prompts`: in one decode pass where `in_one_pass`, else stage by stage."""
    first = jax.process_index() * prompts.prompt_ids.shape[0]
    grade = self._grade_fn(clock)
    if in_one_pass(self.cfg, plan):
      return rollout_lib.collect_one_pass(plan, prompts, self._sample_fn(plan, params, rng, clock, True), grade,
                                          self.split_ids, first, pad_id=self.pad_id, rng=draws)
    return rollout_lib.collect(plan, prompts, self._sample_fn(plan, params, rng, clock, False), grade, self.split_ids,
                               rng=draws, first_prompt=first)

  def _sampling(self, plan: microgroup.Plan, rng: jax.Array) -> dict[str, Any]:
    """The sampler's arguments every call of a plan shares: rows as wide as the plan's (microgroup.response_width:
    a prefix in the prompt's budget widens them), the config's sampling, the step's key. Every call of the step
    shares the key, rows being keyed by (prompt's position in the global batch, stage, alternative): the same
    samples however the batch is split, and whichever path asks for them."""
    r = self.cfg.rollout
    width, continuation = microgroup.response_width(plan, self.cfg.data.max_response_len)
    return dict(max_len=width, rng=rng, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                eos_ids=self.eos_ids, pad_id=self.pad_id, continuation=continuation)

  def _sample_fn(self, plan, params, rng, clock, one_pass: bool):
    """rollout.collect's sampler (Sampler.sample), or with one_pass rollout.collect_one_pass's (Sampler.sample_shared),
    timed. Both take the prompts and prefixes, then three arguments of their own, in the order rollout passes them."""
    kw = self._sampling(plan, rng)
    sample, names = ((self.sampler.sample_shared, ("branches", "row_ids", "sample_ids")) if one_pass
                     else (self.sampler.sample, ("active", "n", "row_ids")))

    def sample_fn(prompt_ids, prompt_lens, prefixes, prefix_lens, *own):
      with _timed(clock, "sampling"):
        return _host_rows(sample(params, prompt_ids, prompt_lens, prefixes, prefix_lens, **dict(zip(names, own)), **kw))
    return sample_fn

  def _grade_fn(self, clock) -> rollout_lib.GradeFn:
    """The grader as rollout.collect takes it, timed, its counts added to the clock's."""
    def grade_fn(tokens, response_mask, answers):
      with _timed(clock, "grading"):
        scores, counts = self.grader(tokens, response_mask, answers)
      for k, v in counts.items():
        clock[f"grader_{k}"] = clock.get(f"grader_{k}", 0) + v
      return scores
    return grade_fn


@contextlib.contextmanager
def _timed(clock: dict, key: str):
  """Adds the seconds of the block to clock[key]; the sampler's rows are on the host when it ends."""
  t = time.perf_counter()
  yield
  clock[key] = clock.get(key, 0.0) + time.perf_counter() - t


def _clock_metrics(clock: dict) -> dict[str, float]:
  return {"time/sampling": clock.get("sampling", 0.0), "time/grading": clock.get("grading", 0.0),
          "grader/timeouts": clock.get("grader_timeouts", 0), "grader/restarts": clock.get("grader_restarts", 0)}


def _host_rows(out) -> tuple[np.ndarray, ...]:
  """The sampler's rows as rollout.collect takes them: tokens, prefix_mask, response_mask, logprobs, eos (numpy:
  waits for the decode)."""
  return (np.asarray(out.tokens), np.asarray(out.prefix_mask), np.asarray(out.response_mask),
          np.asarray(out.logprobs), np.asarray(out.eos))


def _refill(cfg, rb: rollout_lib.RolloutBatch, once, more_prompts) -> tuple[rollout_lib.RolloutBatch, dict]:
  """DAPO's dynamic sampling over the prompts `more_prompts` yields after this step's (train.dynamic_sampling)."""
  if more_prompts is None:
    raise errors.TrainingError("train.dynamic_sampling: this step was given no further prompts to draw refills from")
  # Every process must make the same rounds: it goes on while any process lacks informative groups.
  all_done = lambda done: sharding.agree_max(int(not done))[0] == 0
  rb, stats = rollout_lib.dynamic_sampling(rb, lambda: once(next(more_prompts)), groups=rb.levels.shape[0],
                                           max_rounds=cfg.train.max_refill_rounds, all_done=all_done)
  names = ("informative_groups", "filtered_groups", "kept_uninformative")
  counts = np.asarray([stats[k] for k in names])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(counts)).sum(0)
  return rb, {"dynamic_sampling/rounds": float(stats["rounds"]),
              **{f"dynamic_sampling/{k}": float(v) for k, v in zip(names, counts)}}


def shaped_rewards(cfg, rb: rollout_lib.RolloutBatch) -> tuple[np.ndarray, dict]:
  """The graded rewards [N] plus DAPO's soft overlong punishment of generated rows (rollout.overlong_buffer > 0)."""
  if cfg.rollout.overlong_buffer <= 0:
    return rb.rewards, {}
  penalty = rollout_lib.overlong_penalty(rb.lengths, cfg.data.max_response_len, cfg.rollout.overlong_buffer,
                                         cfg.rollout.overlong_penalty)
  penalty = np.where(rb.kind == losses.ROW_DEMO, 0.0, penalty).astype(np.float32)
  return rb.rewards + penalty, {"overlong/penalty_mean": float(penalty.mean())}


def _global(rb: rollout_lib.RolloutBatch) -> rollout_lib.RolloutBatch:
  """Every process's rows (for metrics): on several processes, the small per-row fields gathered."""
  if jax.process_count() == 1:
    return rb
  from jax.experimental import multihost_utils
  fields = dict(rewards=rb.rewards, stage=rb.stage, ratio=rb.ratio, levels=rb.levels, group_ids=rb.group_ids,
                prefix_mask=rb.prefix_mask, response_mask=rb.response_mask)
  if rb.truncated is not None:
    fields["truncated"] = rb.truncated
  if rb.in_group is not None:
    fields["in_group"] = rb.in_group
  gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in fields.items()}
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([rb.sampled_rows, rb.decode_passes])))
  return dataclasses.replace(rb, **gathered, kind=np.asarray(multihost_utils.process_allgather(rb.kind, tiled=True)),
                             sampled_rows=int(counts[:, 0].sum()), decode_passes=int(counts[:, 1].max()))


def _rollout_metrics(rb: rollout_lib.RolloutBatch, num_stages: int) -> dict[str, float]:
  """Rewards per stage, hint-level fractions, own vs expert lengths, solve-all/none (docs/algorithm.md#evaluation).

  Rewards are those of the graded rows in their prompt's group (demonstration rows a plan adds are not graded);
  lengths those of rows that kept their tokens."""
  rb = _global(rb)
  graded = np.ones(rb.rewards.shape, bool) if rb.in_group is None else rb.in_group
  kept = rb.lengths > 0
  m: dict[str, float] = {"reward/mean": float(rb.rewards[graded].mean())}
  for s in range(num_stages):
    sel = (rb.stage == s) & graded
    if sel.any():
      m[f"reward/stage_{s + 1}"] = float(rb.rewards[sel].mean())
  own = (rb.ratio == 0) & graded
  if own.any():
    m["reward/own"] = float(rb.rewards[own].mean())
  if (own & kept).any():
    m["length/own"] = float(rb.lengths[own & kept].mean())
  expert = rb.ratio >= 1
  if expert.any():
    m["length/expert"] = float(rb.lengths[expert].mean())
  guided = (rb.ratio > 0) & (rb.ratio < 1) & graded
  if guided.any():
    m["reward/guided"] = float(rb.rewards[guided].mean())
  top = rb.levels.max(axis=1)
  for level in range(num_stages):
    m[f"hint_level_{level}"] = float((top == level).mean())
  per_prompt = np.where(graded, rb.rewards, np.nan).reshape(rb.levels.shape[0], -1)
  m["solve_all"] = float((np.nanmin(per_prompt, 1) == 1).mean())
  m["solve_none"] = float((np.nanmax(per_prompt, 1) == 0).mean())
  m["prefix_tokens"] = float(rb.prefix_mask.sum())
  if rb.truncated is not None:
    m["overlong/truncated_frac"] = float(rb.truncated.mean())
  m["response_tokens"] = float(rb.response_mask.sum())
  # What one-pass sampling trades: one decode pass for more rows generated than used (docs/algorithm.md#one-pass).
  m["rollout/decode_passes"] = float(rb.decode_passes)
  m["rollout/rows_sampled"] = float(rb.sampled_rows)
  m["rollout/rows_used"] = float(((rb.kind != losses.ROW_DEMO) & kept).sum())  # generated rows the batch keeps
  return m
