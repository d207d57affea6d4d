"""Rollout collection: stages of sampling and grading per the micro-group plan, assembled into a training batch.

Host-side orchestration only; the sampler and the grader are passed in, so the schedule is testable with scripted
rewards. Rows are prompt-major: prompt i owns rows i*n .. i*n+n-1, in stage order; one GRPO group = one prompt.
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

  @property
  def lengths(self) -> np.ndarray:
    return self.response_mask.sum(-1)


# sample_fn(prompt_ids [G,P], prompt_lens [G], prefix_ids [G,Ld], prefix_lens [G], active [G], n) ->
#   (tokens [G*n, L], prefix_mask, response_mask) as numpy, prompt-major.
SampleFn = Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]
# grade_fn(tokens [M, L], response_mask [M, L], answers list[str] of length M) -> rewards [M]
GradeFn = Callable[[np.ndarray, np.ndarray, list], np.ndarray]


def row_kinds(ratio: np.ndarray) -> np.ndarray:
  """[N] prefix ratios -> row kinds: 0 is the model's own rollout, a ratio >= 1 a whole demonstration."""
  return np.where(ratio <= 0, losses.ROW_OWN, np.where(ratio >= 1, losses.ROW_DEMO, losses.ROW_GUIDED)).astype(np.int32)


def collect(plan: microgroup.Plan, batch, sample_fn: SampleFn, grade_fn: GradeFn,
            split_ids: np.ndarray) -> RolloutBatch:
  """Runs the plan's stages for a PromptBatch (prompt_ids, prompt_lens, demo_ids, demo_lens, answers)."""
  g = batch.prompt_ids.shape[0]
  levels = np.zeros((g,), np.int32)
  cumulative = np.zeros((g,), np.float32)
  parts = []
  level_log = []
  for s, size in enumerate(plan.stages):
    inp = microgroup.stage_inputs(plan, s, levels, batch.demo_ids, batch.demo_lens, split_ids)
    tokens, prefix_mask, response_mask = sample_fn(batch.prompt_ids, batch.prompt_lens, inp.prefix_ids,
                                                   inp.prefix_lens, ~inp.expert_full, size)
    answers = [a for a in batch.answers for _ in range(size)]
    rewards = np.asarray(grade_fn(tokens, response_mask, answers), np.float32)
    cumulative += rewards.reshape(g, size).sum(1)
    loss_rows = microgroup.prefix_loss_rows(plan, s, inp.ratios > 0).reshape(-1)
    parts.append(dict(tokens=tokens, prefix_mask=prefix_mask, response_mask=response_mask, rewards=rewards,
                      off_loss_mask=prefix_mask & loss_rows[:, None], stage=np.full((g * size,), s, np.int32),
                      ratio=np.repeat(inp.ratios, size)))
    level_log.append(levels.copy())
    if s + 1 < len(plan.stages):
      levels = (microgroup.update_levels(plan, s, cumulative) if plan.mode == "adaptive"
                else np.full((g,), 1 if plan.mode == "fixed" else 0, np.int32))
  # Stage-major -> prompt-major.
  order = np.concatenate([
      np.concatenate([offset + i * size + np.arange(size) for offset, size in zip(_offsets(plan, g), plan.stages)])
      for i in range(g)])
  merged = {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
  n = plan.n
  return RolloutBatch(prompt_ids=np.repeat(batch.prompt_ids, n, 0), prompt_lens=np.repeat(batch.prompt_lens, n),
                      group_ids=np.repeat(np.arange(g, dtype=np.int32), n), levels=np.stack(level_log, 1),
                      kind=row_kinds(merged["ratio"]), **merged)


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
