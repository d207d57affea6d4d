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
  sampled_rows: int = 0  # rows the sampler generated for this batch, used or not
  decode_passes: int = 0  # sampler calls that generated anything

  @property
  def lengths(self) -> np.ndarray:
    return self.response_mask.sum(-1)


# sample_fn(prompt_ids [G,P], prompt_lens [G], prefix_ids [G,Ld], prefix_lens [G], active [G], n, row_ids [G]) ->
#   (tokens [G*n, L], prefix_mask, response_mask) as numpy, prompt-major; sample j of prompt i is keyed by
#   (row_ids[i], j) (Sampler.sample).
SampleFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
# shared_sample_fn(prompt_ids [G,P], prompt_lens [G], prefixes [G,X,Ld], prefix_lens [G,X], branches [R],
#   row_ids [G,R], sample_ids [G,R]) -> (tokens [G*R, L], prefix_mask, response_mask), prompt-major
#   (Sampler.sample_shared: each prompt's R rows continue from the bare prompt or one of its X prefixes).
SharedSampleFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
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


def collect(plan: microgroup.Plan, batch, sample_fn: SampleFn, grade_fn: GradeFn,
            split_ids: np.ndarray, first_prompt: int = 0) -> RolloutBatch:
  """Runs the plan's stages for a PromptBatch (prompt_ids, prompt_lens, demo_ids, demo_lens, answers), one sampler
  call per stage. first_prompt: the global position of the batch's first prompt (keys its rows)."""
  g = batch.prompt_ids.shape[0]
  levels = np.zeros((g,), np.int32)
  cumulative = np.zeros((g,), np.float32)
  parts = []
  level_log = []
  sampled = passes = 0
  for s, size in enumerate(plan.stages):
    inp = microgroup.stage_inputs(plan, s, levels, batch.demo_ids, batch.demo_lens, split_ids)
    ids = row_ids(first_prompt, g, s, inp.ratios > 0, len(plan.stages))
    tokens, prefix_mask, response_mask = sample_fn(batch.prompt_ids, batch.prompt_lens, inp.prefix_ids,
                                                   inp.prefix_lens, ~inp.expert_full, size, ids)
    sampled += int((~inp.expert_full).sum()) * size
    passes += bool((~inp.expert_full).any())
    answers = [a for a in batch.answers for _ in range(size)]
    rewards = np.asarray(grade_fn(tokens, response_mask, answers), np.float32)
    cumulative += rewards.reshape(g, size).sum(1)
    loss_rows = microgroup.prefix_loss_rows(plan, s, inp.ratios > 0).reshape(-1)
    parts.append(dict(tokens=tokens, prefix_mask=prefix_mask, response_mask=response_mask, rewards=rewards,
                      off_loss_mask=prefix_mask & loss_rows[:, None], stage=np.full((g * size,), s, np.int32),
                      ratio=np.repeat(inp.ratios, size)))
    level_log.append(levels.copy())
    if s + 1 < len(plan.stages):
      levels = microgroup.stage_levels(plan, s, cumulative)
  # Stage-major -> prompt-major.
  order = np.concatenate([
      np.concatenate([offset + i * size + np.arange(size) for offset, size in zip(_offsets(plan, g), plan.stages)])
      for i in range(g)])
  merged = {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
  n = plan.n
  return RolloutBatch(prompt_ids=np.repeat(batch.prompt_ids, n, 0), prompt_lens=np.repeat(batch.prompt_lens, n),
                      group_ids=np.repeat(np.arange(g, dtype=np.int32), n), levels=np.stack(level_log, 1),
                      kind=row_kinds(merged["ratio"]), sampled_rows=sampled, decode_passes=passes, **merged)


def collect_one_pass(plan: microgroup.Plan, batch, sample_fn: SharedSampleFn, grade_fn: GradeFn,
                     split_ids: np.ndarray, first_prompt: int = 0, pad_id: int = 0) -> RolloutBatch:
  """The rows of `collect` from one sampler call (docs/algorithm.md#one-pass).

  Every alternative of every stage (`microgroup.alternatives`) is sampled at once, each prompt's bare prompt and
  prefixes prefilled once for all its rows; all rows (the whole demonstrations too) are graded in one call; then
  `microgroup.select_levels` walks the thresholds and each prompt keeps the rows of the levels it reached, in the
  same order, with the same masks, as `collect`. pad_id fills a whole demonstration's row after its end, as the
  sampler does.
  """
  g = batch.prompt_ids.shape[0]
  alts = microgroup.alternatives(plan)
  inputs = [microgroup.stage_inputs(plan, a.stage, np.full((g,), a.level, np.int32), batch.demo_ids, batch.demo_lens,
                                    split_ids) for a in alts]
  # One sampler branch per distinct prefix ratio; branch 0 is the bare prompt.
  ratios = sorted({a.ratio for a in alts if a.generated and a.ratio > 0})
  first = {r: next(inp for a, inp in zip(alts, inputs) if a.ratio == r) for r in ratios}
  prefixes = np.stack([first[r].prefix_ids for r in ratios], 1) if ratios else np.zeros((g, 0, 1), np.int32)
  prefix_lens = np.stack([first[r].prefix_lens for r in ratios], 1) if ratios else np.zeros((g, 0), np.int32)
  branches, ids, samples = [], [], []
  for a in alts:
    if a.generated:
      branches += [ratios.index(a.ratio) + 1 if a.ratio > 0 else 0] * a.size
      ids += [row_ids(first_prompt, g, a.stage, np.full((g,), a.ratio > 0), len(plan.stages))] * a.size
      samples += list(range(a.size))
  generated = sample_fn(batch.prompt_ids, batch.prompt_lens, prefixes, prefix_lens, tuple(branches),
                        np.stack(ids, 1), np.tile(np.asarray(samples, np.int32), (g, 1)))
  generated = [np.asarray(x).reshape(g, len(branches), -1) for x in generated]
  width = generated[0].shape[2]
  # Every alternative's rows [G, size, L], in alternatives order: sampled, or the whole demonstration as it is.
  blocks, at = [], 0
  for a, inp in zip(alts, inputs):
    if a.generated:
      blocks.append([x[:, at:at + a.size] for x in generated])
      at += a.size
    else:
      blocks.append([np.repeat(x[:, None], a.size, 1) for x in _whole_demos(inp, width, pad_id)])
  tokens, prefix_mask, response_mask = (np.concatenate([b[i] for b in blocks], 1) for i in range(3))
  rows = tokens.shape[1]
  answers = [ans for ans in batch.answers for _ in range(rows)]
  rewards = np.asarray(grade_fn(tokens.reshape(g * rows, width), response_mask.reshape(g * rows, width), answers),
                       np.float32).reshape(g, rows)
  starts = np.cumsum([0] + [a.size for a in alts])
  levels = microgroup.select_levels(plan, [rewards[:, starts[k]:starts[k + 1]] for k in range(len(alts))])
  # Per-row constants of each alternative, then each prompt's chosen rows.
  loss_rows = np.concatenate([microgroup.prefix_loss_rows(plan, a.stage, np.full((g,), a.ratio > 0)) for a in alts], 1)
  stage = np.concatenate([np.full((g, a.size), a.stage, np.int32) for a in alts], 1)
  ratio = np.concatenate([np.full((g, a.size), a.ratio, np.float32) for a in alts], 1)
  pick = microgroup.selected_rows(plan, levels)
  take = lambda x: np.take_along_axis(x, pick.reshape(pick.shape + (1,) * (x.ndim - 2)), 1).reshape(
      (g * plan.n,) + x.shape[2:])
  merged = dict(tokens=take(tokens), prefix_mask=take(prefix_mask), response_mask=take(response_mask),
                rewards=take(rewards), off_loss_mask=take(prefix_mask & loss_rows[:, :, None]), stage=take(stage),
                ratio=take(ratio))
  n = plan.n
  return RolloutBatch(prompt_ids=np.repeat(batch.prompt_ids, n, 0), prompt_lens=np.repeat(batch.prompt_lens, n),
                      group_ids=np.repeat(np.arange(g, dtype=np.int32), n), levels=levels,
                      kind=row_kinds(merged["ratio"]), sampled_rows=g * len(branches),
                      decode_passes=1, **merged)


def _whole_demos(inp: microgroup.StageInputs, width: int, pad_id: int):
  """A stage's whole demonstrations [G, Ld] as responses [G, L]: (tokens, prefix_mask, response_mask), nothing
  generated; what the sampler returns for a row it does not generate."""
  lens = np.minimum(inp.prefix_lens, width)
  mask = np.arange(width)[None] < lens[:, None]
  tokens = np.full(mask.shape, pad_id, np.int32)
  k = min(inp.prefix_ids.shape[1], width)
  tokens[:, :k] = np.where(mask[:, :k], inp.prefix_ids[:, :k], pad_id)
  return tokens, mask, mask


def _offsets(plan: microgroup.Plan, g: int) -> list[int]:
  sizes = [g * s for s in plan.stages]
  return list(np.cumsum([0] + sizes[:-1]))


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
