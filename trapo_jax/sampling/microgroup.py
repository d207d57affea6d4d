"""Micro-group adaptive prefixes (docs/algorithm.md#trapo): which samples of a prompt get which expert prefix, and which get TrSFT.

Per prompt, samples come in stages (default 4, 2, 1, 1). After stage s the cumulative reward S of the prompt sets
the guidance level of stage s+1: level s if S < thresholds[s-1], else 0 (so a prompt may jump 0 -> 2). A stage at
level l continues from a prefix of prefix_ratios[l-1] of demo #0; a ratio of 1.0 is the whole of demo #1, taken as
the response with no generation. Inside a guided stage only the last sample's prefix gets the prefix loss, so a
prefix is imitated once (the official `off_seq_loss_mask`: [0, 1] for the two 25% samples, [1] for the single ones).

All functions here are pure and host-side (numpy); the trainer calls them between sampler and grader calls.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def split_token_ids(tokenizer) -> np.ndarray:
  """Every vocabulary id whose token string contains "\\n\\n" (byte-level "ĊĊ"), as the official `cc_set`."""
  vocab = tokenizer.get_vocab()
  ids = [i for tok, i in vocab.items() if "ĊĊ" in tok or "\n\n" in tok]
  return np.asarray(sorted(ids), np.int32)


def prefix_cut(demo_ids: Sequence[int], ratio: float, split_token_ids: Sequence[int], window: float = 0.3) -> int:
  """Number of demo tokens in a `ratio` prefix (docs/algorithm.md#trapo, official get_prefix_end_idx).

  thr = floor(len * ratio); the prefix ends just after the first "\\n\\n"-token at an index j > thr if
  j < len * (ratio + window), so it ends on a step boundary; otherwise it is cut at thr.
  """
  n = len(demo_ids)
  thr = int(n * ratio)
  is_split = np.isin(np.asarray(demo_ids, np.int64)[thr + 1:], np.asarray(split_token_ids, np.int64))
  if is_split.any():
    j = thr + 1 + int(np.argmax(is_split))
    if j < n * (ratio + window):
      return j + 1
  return thr


def next_level(stage: int, cumulative_correct: float, thresholds: Sequence[int] = (2, 4, 7)) -> int:
  """Level of the stage after `stage` (1-based) given the cumulative reward so far: `stage` if below its threshold."""
  return stage if cumulative_correct < thresholds[stage - 1] else 0


@dataclasses.dataclass(frozen=True)
class Plan:
  """A rollout plan: stage sizes and how guidance is chosen. One type covers every algorithm.

  mode "adaptive": TRAPO levels from thresholds; "fixed": every prompt is guided after stage 1 at `fixed_ratio`
  (the ablation without adaptive levels; only the last guided sample gets the prefix loss); "none": no prefixes.
  """
  stages: tuple[int, ...] = (4, 2, 1, 1)
  mode: str = "adaptive"
  thresholds: tuple[int, ...] = (2, 4, 7)
  prefix_ratios: tuple[float, ...] = (0.25, 0.5, 1.0)
  fixed_ratio: float = 0.5
  window: float = 0.3

  @property
  def n(self) -> int:
    return sum(self.stages)


@dataclasses.dataclass(frozen=True)
class DemoRows:
  """Rows that are demonstrations as whole responses, nothing sampled or graded (SFT): `which` of each prompt."""
  which: tuple[int, ...] = (0,)

  @property
  def n(self) -> int:
    return len(self.which)


def stage_ratios(plan: Plan, stage: int, levels: np.ndarray) -> np.ndarray:
  """Prefix ratio per prompt for 0-based `stage` given current levels [G]; 0 means a pure rollout."""
  if stage == 0 or plan.mode == "none":
    return np.zeros(levels.shape, np.float32)
  if plan.mode == "fixed":
    return np.full(levels.shape, plan.fixed_ratio, np.float32)
  table = np.asarray((0.0,) + tuple(plan.prefix_ratios), np.float32)
  return table[levels]


def update_levels(plan: Plan, stage: int, cumulative: np.ndarray) -> np.ndarray:
  """Levels [G] for stage+1 after 0-based `stage` from cumulative rewards [G]."""
  return np.asarray([next_level(stage + 1, s, plan.thresholds) for s in cumulative], np.int32)


@dataclasses.dataclass
class StageInputs:
  """What the sampler needs for one stage: per prompt, the forced prefix (from demo #0 or all of demo #1)."""
  ratios: np.ndarray  # [G]
  prefix_ids: np.ndarray  # [G, Lmax] right-padded
  prefix_lens: np.ndarray  # [G]
  expert_full: np.ndarray  # [G] bool: the whole demo #1 is the response; nothing is generated


def stage_inputs(plan: Plan, stage: int, levels: np.ndarray, demo_ids: np.ndarray, demo_lens: np.ndarray,
                 split_ids: np.ndarray) -> StageInputs:
  """demo_ids [G, 2, Ld], demo_lens [G, 2] (EOS included) -> the stage's prefixes."""
  ratios = stage_ratios(plan, stage, levels)
  g, _, width = demo_ids.shape
  prefix = np.zeros((g, width), np.int32)
  lens = np.zeros((g,), np.int32)
  full = ratios >= 1.0
  for i in range(g):
    if ratios[i] <= 0:
      continue
    which = 1 if full[i] else 0
    demo = demo_ids[i, which, :demo_lens[i, which]]
    k = len(demo) if full[i] else prefix_cut(demo, float(ratios[i]), split_ids, plan.window)
    prefix[i, :k] = demo[:k]
    lens[i] = k
  return StageInputs(ratios=ratios, prefix_ids=prefix, prefix_lens=lens, expert_full=full)


def prefix_loss_rows(plan: Plan, stage: int, guided: np.ndarray) -> np.ndarray:
  """[G, stage size] bool: which samples' prefix tokens get the prefix loss.

  The last sample of a guided stage; in "fixed" mode only in the last stage, so each prompt imitates one prefix.
  """
  rows = np.zeros((guided.shape[0], plan.stages[stage]), bool)
  if plan.mode != "fixed" or stage == len(plan.stages) - 1:
    rows[:, -1] = guided
  return rows
