"""Rollout collection: stages of sampling and grading per the micro-group plan, assembled into a training batch.

Host-side orchestration only; the sampler and the grader are passed in, so the schedule is testable with scripted
rewards. Rows are prompt-major: prompt i owns rows i*n .. i*n+n-1, in stage order; one GRPO group = one prompt.

Two ways to the same rows (docs/algorithm.md#one-pass): `collect` runs the stages one after the other, a sampler
call each, grading in between; `collect_one_pass` samples every stage's alternatives in one call, grades them all
and then keeps the rows the stages would have chosen. Both key a row's randomness by (prompt, stage, alternative,
sample) (`row_ids`), so a row's tokens do not depend on which of the two produced it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from trapo_jax import losses
from trapo_jax.sampling import microgroup


@dataclasses.dataclass
class RolloutBatch:
  """Host arrays over N = G * n rows (responses of width L)."""
  prompt_ids: np.ndarray  # [N, P] right-padded
  prompt_lens: np.ndarray  # [N]
  tokens: np.ndarray  # [N, L] prefix + continuation
  prefix_mask: np.ndarray  # [N, L] bool
  off_loss_mask: np.ndarray  # [N, L] bool: prefix tokens that get the prefix loss
  response_mask: np.ndarray  # [N, L] bool
  rewards: np.ndarray  # [N] float32
  group_ids: np.ndarray  # [N] int32: the prompt's index in the batch
  stage: np.ndarray  # [N] int32
  ratio: np.ndarray  # [N] float32: prefix ratio of the row's stage (0 = pure, 1 = full expert)
  levels: np.ndarray  # [G, stages] int32: guidance level of each stage
  kind: np.ndarray  # [N] int32: losses.ROW_OWN | ROW_GUIDED | ROW_DEMO
  logprobs: np.ndarray | None = None  # [N, L] float32: the sampler's log-prob of each generated token, 0 elsewhere
  truncated: np.ndarray | None = None  # [N] bool: the row reached L without EOS
  # [N] bool: rows graded and in their prompt's GRPO group; None: all of them. Rows outside (demonstrations a plan
  # adds after grading) have reward and advantage 0.
  in_group: np.ndarray | None = None
  sampled_rows: int = 0  # rows the sampler generated for this batch, used or not
  decode_passes: int = 0  # sampler calls that generated anything

  @property
  def lengths(self) -> np.ndarray:
    return self.response_mask.sum(-1)


# RolloutBatch's fields that count the sampling work behind a batch, not rows.
COUNTS = ("sampled_rows", "decode_passes")


# sample_fn(prompt_ids [G,P], prompt_lens [G], prefix_ids [G,Ld], prefix_lens [G], active [G], n, row_ids [G]) ->
#   (tokens [G*n, L], prefix_mask, response_mask) as numpy, prompt-major, optionally followed by the sampler's
#   logprobs [G*n, L] and eos [G*n] (the row ended with EOS); sample j of prompt i is keyed by (row_ids[i], j)
#   (Sampler.sample).
SampleFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
# shared_sample_fn(prompt_ids [G,P], prompt_lens [G], prefixes [G,X,Ld], prefix_lens [G,X], branches [R],
#   row_ids [G,R], sample_ids [G,R]) -> what sample_fn returns, for G*R rows, prompt-major (Sampler.sample_shared:
#   each prompt's R rows continue from the bare prompt or one of its X prefixes).
SharedSampleFn = Callable[..., tuple[np.ndarray, ...]]
# grade_fn(tokens [M, L], response_mask [M, L], answers list[str] of length M) -> rewards [M]
GradeFn = Callable[[np.ndarray, np.ndarray, list], np.ndarray]


def row_kinds(ratio: np.ndarray) -> np.ndarray:
  """[N] prefix ratios -> row kinds: 0 is the model's own rollout, a ratio >= 1 a whole demonstration."""
  return np.where(ratio <= 0, losses.ROW_OWN, np.where(ratio >= 1, losses.ROW_DEMO, losses.ROW_GUIDED)).astype(np.int32)


def row_ids(first_prompt: int, g: int, stage: int, guided: np.ndarray, num_stages: int) -> np.ndarray:
  """[G] ids keying the rows of one stage of prompts first_prompt .. first_prompt+G-1 (global batch positions):
  one per (prompt, stage, alternative), the alternative being whether the stage is guided ([G] bool)."""
  prompts = first_prompt + np.arange(g, dtype=np.int64)
  ids = (prompts * num_stages + stage) * 2 + np.asarray(guided, np.int64)
  if ids.max(initial=0) >= 2 ** 31:
    raise ValueError(f"{first_prompt + g} prompts x {num_stages} stages overflow the sampler's int32 row ids")
  return ids.astype(np.int32)


def collect(plan: microgroup.Plan, batch, sample_fn: SampleFn, grade_fn: GradeFn, split_ids: np.ndarray,
            rng: np.random.Generator | None = None, first_prompt: int = 0) -> RolloutBatch:
  """Runs the plan's stages for a PromptBatch (prompt_ids, prompt_lens, demo_ids, demo_lens, answers), one sampler
  call per stage, then what the plan does after grading (appended demonstrations, the gate). `rng`: for plans that
  draw prefixes at random. first_prompt: the global position of the batch's first prompt (keys its rows)."""
  g = batch.prompt_ids.shape[0]
  levels = np.zeros((g,), np.int32)
  cumulative = np.zeros((g,), np.float32)
  parts = []
  level_log = []
  sampled = passes = 0
  for s, size in enumerate(plan.stages):
    inp = microgroup.stage_inputs(plan, s, levels, batch.demo_ids, batch.demo_lens, split_ids, rng,
                                  prompt_lens=batch.prompt_lens)
    ids = row_ids(first_prompt, g, s, inp.ratios > 0, len(plan.stages))
    tokens, prefix_mask, response_mask, *extra = sample_fn(batch.prompt_ids, batch.prompt_lens, inp.prefix_ids,
                                                           inp.prefix_lens, ~inp.expert_full, size, ids)
    sampled += int((~inp.expert_full).sum()) * size
    passes += bool((~inp.expert_full).any())
    logprobs, eos = extra if extra else (np.zeros(tokens.shape, np.float32), np.ones((tokens.shape[0],), bool))
    answers = [a for a in batch.answers for _ in range(size)]
    graded = response_mask if plan.grade_given else response_mask & ~prefix_mask
    rewards = np.asarray(grade_fn(tokens, graded, answers), np.float32)
    cumulative += rewards.reshape(g, size).sum(1)
    loss_rows = microgroup.prefix_loss_rows(plan, s, inp.ratios > 0).reshape(-1)
    parts.append(dict(tokens=tokens, prefix_mask=prefix_mask, response_mask=response_mask, rewards=rewards,
                      off_loss_mask=prefix_mask & loss_rows[:, None], stage=np.full((g * size,), s, np.int32),
                      ratio=np.repeat(inp.ratios, size), logprobs=np.asarray(logprobs, np.float32),
                      truncated=~np.asarray(eos, bool)))
    # Drawn prefixes have no levels: a stage's level is 1 where it continues a prefix.
    level_log.append((inp.ratios > 0).astype(np.int32) if plan.guidance.draws else levels.copy())
    if s + 1 < len(plan.stages):
      levels = microgroup.stage_levels(plan, s, cumulative)
  sizes = list(plan.stages)
  if plan.demos:
    for p in parts:
      p["in_group"] = np.ones(p["rewards"].shape, bool)
    parts.append(_demo_part(batch, plan.demos, parts[0]["tokens"].shape[1], stage=len(plan.stages)))
    sizes.append(len(plan.demos))
  # Stage-major -> prompt-major.
  offsets = np.cumsum([0] + [g * size for size in sizes[:-1]])
  order = np.concatenate([
      np.concatenate([offset + i * size + np.arange(size) for offset, size in zip(offsets, sizes)])
      for i in range(g)])
  merged = {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
  n = plan.n
  in_group = merged.pop("in_group", None)
  if in_group is not None:
    in_group = in_group.astype(bool)
  rb = RolloutBatch(prompt_ids=np.repeat(batch.prompt_ids, n, 0), prompt_lens=np.repeat(batch.prompt_lens, n),
                    group_ids=np.repeat(np.arange(g, dtype=np.int32), n), levels=np.stack(level_log, 1),
                    kind=row_kinds(merged["ratio"]), in_group=in_group, sampled_rows=sampled, decode_passes=passes,
                    **merged)
  return gate(plan, batch, rb) if plan.gate >= 0 else rb


def collect_one_pass(plan: microgroup.Plan, batch, sample_fn: SharedSampleFn, grade_fn: GradeFn,
                     split_ids: np.ndarray, first_prompt: int = 0, pad_id: int = 0,
                     rng: np.random.Generator | None = None) -> RolloutBatch:
  """The rows of `collect` from one sampler call (docs/algorithm.md#one-pass).

  Every alternative of every stage (`microgroup.alternatives`) is sampled at once, each prompt's bare prompt and
  prefixes prefilled once for all its rows; all rows (the whole demonstrations too) are graded in one call; then
  `microgroup.select_levels` walks the thresholds and each prompt keeps the rows of the levels it reached, in the
  same order, with the same masks, as `collect`; appended demonstrations and the gate follow as there. pad_id fills
  a whole demonstration's row after its end, as the sampler does. Plans that draw their prefixes (`rng`) draw them
  in stage order, as `collect` does, and keep every stage's rows: there is nothing to choose.
  """
  g = batch.prompt_ids.shape[0]
  alts = microgroup.alternatives(plan)
  inputs = [microgroup.stage_inputs(plan, a.stage, np.full((g,), a.level, np.int32), batch.demo_ids, batch.demo_lens,
                                    split_ids, rng, prompt_lens=batch.prompt_lens) for a in alts]
  # Each prefix a prompt's rows continue is prefilled once per prompt, after the bare prompt.
  sources, branches = microgroup.one_pass_contexts(plan)
  prefixes = (np.stack([inputs[k].prefix_ids for k in sources], 1) if sources else np.zeros((g, 0, 1), np.int32))
  prefix_lens = (np.stack([inputs[k].prefix_lens for k in sources], 1) if sources else np.zeros((g, 0), np.int32))
  ids, samples = [], []
  for a, inp in zip(alts, inputs):
    if a.generated:
      ids += [row_ids(first_prompt, g, a.stage, inp.ratios > 0, len(plan.stages))] * a.size
      samples += list(range(a.size))
  tokens, prefix_mask, response_mask, *extra = sample_fn(
      batch.prompt_ids, batch.prompt_lens, prefixes, prefix_lens, branches, np.stack(ids, 1),
      np.tile(np.asarray(samples, np.int32), (g, 1)))
  r = len(branches)
  logprobs, eos = extra if extra else (np.zeros(tokens.shape, np.float32), np.ones((tokens.shape[0],), bool))
  generated = [np.asarray(x).reshape((g, r) + np.shape(x)[1:]) for x in (tokens, prefix_mask, response_mask,
                                                                           logprobs, ~np.asarray(eos, bool))]
  width = generated[0].shape[2]
  # Every alternative's rows [G, size, ...], in alternatives order: sampled, or the whole demonstration as it is.
  blocks, at = [], 0
  for a, inp in zip(alts, inputs):
    if a.generated:
      blocks.append([x[:, at:at + a.size] for x in generated])
      at += a.size
    else:
      blocks.append([np.repeat(x[:, None], a.size, 1) for x in _whole_demos(inp, width, pad_id)])
  tokens, prefix_mask, response_mask, logprobs, truncated = (np.concatenate([b[i] for b in blocks], 1)
                                                             for i in range(5))
  rows = tokens.shape[1]
  answers = [ans for ans in batch.answers for _ in range(rows)]
  graded = response_mask if plan.grade_given else response_mask & ~prefix_mask
  rewards = np.asarray(grade_fn(tokens.reshape(g * rows, width), graded.reshape(g * rows, width), answers),
                       np.float32).reshape(g, rows)
  starts = np.cumsum([0] + [a.size for a in alts])
  if plan.guidance.draws:  # every stage's rows; a stage's level is 1 where it continues a prefix
    levels = np.stack([(inp.ratios > 0).astype(np.int32) for inp in inputs], 1)
    pick = np.tile(np.arange(rows), (g, 1))
  else:
    levels = microgroup.select_levels(plan, [rewards[:, starts[k]:starts[k + 1]] for k in range(len(alts))])
    pick = microgroup.selected_rows(plan, levels)
  # Per-row constants of each alternative, then each prompt's chosen rows.
  loss_rows = np.concatenate([microgroup.prefix_loss_rows(plan, a.stage, inp.ratios > 0)
                              for a, inp in zip(alts, inputs)], 1)
  stage = np.concatenate([np.full((g, a.size), a.stage, np.int32) for a in alts], 1)
  ratio = np.concatenate([np.repeat(inp.ratios[:, None], a.size, 1) for a, inp in zip(alts, inputs)], 1)
  take = lambda x: np.take_along_axis(x, pick.reshape(pick.shape + (1,) * (x.ndim - 2)), 1)
  chosen = dict(tokens=take(tokens), prefix_mask=take(prefix_mask), response_mask=take(response_mask),
                rewards=take(rewards), off_loss_mask=take(prefix_mask & loss_rows[:, :, None]), stage=take(stage),
                ratio=take(ratio), logprobs=take(logprobs), truncated=take(truncated))
  if plan.demos:
    chosen["in_group"] = np.ones(pick.shape, bool)
    demos = _demo_part(batch, plan.demos, width, stage=len(plan.stages))
    for k, v in demos.items():
      chosen[k] = np.concatenate([chosen[k], v.reshape((g, len(plan.demos)) + v.shape[1:])], 1)
  n = plan.n
  merged = {k: v.reshape((g * n,) + v.shape[2:]) for k, v in chosen.items()}
  in_group = merged.pop("in_group", None)
  rb = RolloutBatch(prompt_ids=np.repeat(batch.prompt_ids, n, 0), prompt_lens=np.repeat(batch.prompt_lens, n),
                    group_ids=np.repeat(np.arange(g, dtype=np.int32), n), levels=levels,
                    kind=row_kinds(merged["ratio"]), in_group=in_group, sampled_rows=g * r, decode_passes=1,
                    **merged)
  return gate(plan, batch, rb) if plan.gate >= 0 else rb


def _whole_demos(inp: microgroup.StageInputs, width: int, pad_id: int):
  """A stage's whole demonstrations [G, Ld] as responses [G, L]: (tokens, prefix_mask, response_mask, logprobs,
  truncated), nothing generated; what the sampler returns for a row it does not generate."""
  lens = np.minimum(inp.prefix_lens, width)
  mask = np.arange(width)[None] < lens[:, None]
  tokens = np.full(mask.shape, pad_id, np.int32)
  k = min(inp.prefix_ids.shape[1], width)
  tokens[:, :k] = np.where(mask[:, :k], inp.prefix_ids[:, :k], pad_id)
  # The sampler's rows of a whole demonstration end with its EOS unless it was cut at L.
  return tokens, mask, mask, np.zeros(mask.shape, np.float32), inp.prefix_lens > width


def _demo_part(batch, which: tuple[int, ...], width: int, stage: int) -> dict[str, np.ndarray]:
  """A stage's part of whole demonstrations `which` of every prompt (prompt-major), ungraded, outside the groups."""
  demos = demo_batch(batch, which, max_len=width)
  part = {f: getattr(demos, f) for f in ("tokens", "prefix_mask", "off_loss_mask", "response_mask", "rewards", "ratio")}
  part["stage"] = np.full(demos.rewards.shape, stage, np.int32)
  part["in_group"] = np.zeros(demos.rewards.shape, bool)
  part["logprobs"] = np.zeros(demos.tokens.shape, np.float32)  # nothing sampled
  part["truncated"] = np.zeros(demos.rewards.shape, bool)
  return part


def gate(plan: microgroup.Plan, batch, rb: RolloutBatch) -> RolloutBatch:
  """HPT's switch (docs/algorithm.md#hpt): a prompt whose rollouts have at most `plan.gate` correct ones has them
  dropped: its first row becomes the whole demonstration `plan.gate_demo` (ungraded, outside the group, reward 0),
  its other rows are emptied (no response token: no term sees them; their rewards stay for the metrics)."""
  n = plan.n
  g = len(batch.prompt_ids)
  correct = rb.rewards.reshape(g, n)[:, :sum(plan.stages)].sum(1)
  gated = np.flatnonzero(correct <= plan.gate)
  if not gated.size:
    return rb
  demos = demo_batch(batch, (plan.gate_demo,), max_len=rb.tokens.shape[1])
  out = {f.name: getattr(rb, f.name) for f in dataclasses.fields(rb) if f.name not in COUNTS}
  out = {k: np.ones((g * n,), bool) if v is None else np.array(v) for k, v in out.items()}
  for i in gated:
    rows = slice(i * n + 1, (i + 1) * n)
    for f in ("prefix_mask", "off_loss_mask", "response_mask"):
      out[f][rows] = False
    out["tokens"][rows] = 0
    first = i * n
    for f in ("tokens", "prefix_mask", "off_loss_mask", "response_mask", "ratio", "kind"):
      out[f][first] = getattr(demos, f)[i]
    out["rewards"][first] = 0.0
    out["in_group"][first] = False
  return RolloutBatch(**out, **{k: getattr(rb, k) for k in COUNTS})


def demo_batch(batch, which: tuple[int, ...] = (0,), max_len: int | None = None) -> RolloutBatch:
  """Expert demos as whole responses, nothing sampled (SFT): every token is an expert token chosen for imitation.

  `which`: the demonstrations of each prompt that become rows, in this order.
  """
  g, _, width = batch.demo_ids.shape
  max_len = max_len or width
  k = len(which)
  tokens = np.zeros((g * k, max_len), np.int32)
  lens = np.zeros((g * k,), np.int32)
  for i in range(g):
    for j, d in enumerate(which):
      n = min(int(batch.demo_lens[i, d]), max_len)
      tokens[i * k + j, :n] = batch.demo_ids[i, d, :n]
      lens[i * k + j] = n
  mask = np.arange(max_len)[None] < lens[:, None]
  return RolloutBatch(prompt_ids=np.repeat(batch.prompt_ids, k, 0), prompt_lens=np.repeat(batch.prompt_lens, k),
                      tokens=tokens, prefix_mask=mask, off_loss_mask=mask, response_mask=mask,
                      rewards=np.zeros((g * k,), np.float32), group_ids=np.repeat(np.arange(g, dtype=np.int32), k),
                      stage=np.zeros((g * k,), np.int32), ratio=np.ones((g * k,), np.float32),
                      levels=np.zeros((g, 1), np.int32), kind=np.full((g * k,), losses.ROW_DEMO, np.int32))


# ----------------------------------------------------------------------------------------------------------------
# RL options on rollouts (docs/algorithm.md#rl-options).


def informative_groups(rb: RolloutBatch) -> np.ndarray:
  """[G] bool: groups whose rewards are not all equal (all solved or all failed groups have zero advantages)."""
  g = rb.levels.shape[0]
  low = np.full((g,), np.inf)
  high = np.full((g,), -np.inf)
  np.minimum.at(low, rb.group_ids, rb.rewards)
  np.maximum.at(high, rb.group_ids, rb.rewards)
  return high > low


def select_groups(batches: list[RolloutBatch], picks: list[tuple[int, int]]) -> RolloutBatch:
  """The rows of the groups `picks` [(batch index, group id)], in that order, as one batch with groups 0, 1, ..."""
  rows = [np.flatnonzero(batches[b].group_ids == g) for b, g in picks]
  width = max(batches[b].prompt_ids.shape[1] for b, _ in picks)
  out = {}
  for f in dataclasses.fields(RolloutBatch):
    parts = [getattr(batches[b], f.name) for b, _ in picks]
    if f.name in COUNTS:  # the work behind the batches the groups come from
      out[f.name] = sum(getattr(batches[b], f.name) for b in sorted({b for b, _ in picks}))
    elif f.name == "levels":
      out[f.name] = np.stack([p[g] for p, (_, g) in zip(parts, picks)])
    elif f.name == "group_ids":
      out[f.name] = np.concatenate([np.full((len(r),), i, np.int32) for i, r in enumerate(rows)])
    elif any(p is None for p in parts):
      out[f.name] = None
    elif f.name == "prompt_ids":  # prompt widths differ between prompt batches: right-pad to the widest
      out[f.name] = np.concatenate([np.pad(p[r], ((0, 0), (0, width - p.shape[1]))) for p, r in zip(parts, rows)])
    else:
      out[f.name] = np.concatenate([p[r] for p, r in zip(parts, rows)])
  return RolloutBatch(**out)


def dynamic_sampling(first: RolloutBatch, more: Callable[[], RolloutBatch], *, groups: int, max_rounds: int,
                     all_done: Callable[[bool], bool] = lambda done: done) -> tuple[RolloutBatch, dict]:
  """DAPO's dynamic sampling: keep the informative groups of `first` and roll out further prompts (`more()`, one
  prompt batch each) until `groups` informative groups are kept or `max_rounds` extra rounds were made.

  The batch keeps `groups` groups: the first informative ones in the order drawn, topped up, when the rounds run
  out, by uninformative ones in the same order (their own-token advantages are 0). all_done(local) -> whether
  every process has its groups, so that all processes make the same rounds. -> (batch, counts for the metrics).
  """
  batches = [first]
  keep = [informative_groups(first)]
  while not all_done(sum(int(k.sum()) for k in keep) >= groups) and len(batches) <= max_rounds:
    batches.append(more())
    keep.append(informative_groups(batches[-1]))
  found = [(b, int(g)) for b, k in enumerate(keep) for g in np.flatnonzero(k)]
  rest = [(b, int(g)) for b, k in enumerate(keep) for g in np.flatnonzero(~k)]
  picks = (found + rest)[:groups]
  stats = {"rounds": len(batches) - 1, "informative_groups": len(found), "filtered_groups": len(rest),
           "kept_uninformative": max(0, groups - len(found))}
  # Every round was sampled, whether its groups were kept or not.
  work = {k: sum(getattr(b, k) for b in batches) for k in COUNTS}
  return dataclasses.replace(select_groups(batches, picks), **work), stats


def overlong_penalty(lengths: np.ndarray, max_len: int, buffer: int, factor: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment [N]: 0 up to max_len - buffer tokens, then falling linearly to -factor at
  max_len (and beyond)."""
  over = np.asarray(lengths, np.float64) - (max_len - buffer)
  return (-factor * np.clip(over / buffer, 0.0, 1.0)).astype(np.float32)


def without_rows(rb: RolloutBatch, drop: np.ndarray) -> RolloutBatch:
  """The batch with rows `drop` [N] bool out of every loss term (their masks cleared); rewards, and so the group
  advantages of the other rows, unchanged."""
  keep = ~np.asarray(drop, bool)[:, None]
  return dataclasses.replace(rb, response_mask=rb.response_mask & keep, prefix_mask=rb.prefix_mask & keep,
                             off_loss_mask=rb.off_loss_mask & keep)
