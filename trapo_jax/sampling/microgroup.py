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


SAMPLED_MODES = ("random", "hint")  # modes whose prefixes are drawn at random (collect needs an rng)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A rollout plan: stage sizes and how guidance is chosen. One type covers every algorithm.

  mode "adaptive": TRAPO levels from thresholds; "fixed": every prompt is guided after stage 1 at `fixed_ratio`
  (the ablation without adaptive levels; only the last guided sample gets the prefix loss); "none": no prefixes;
  "random": after `unguided_stages` stages, each stage of each prompt continues a prefix of a randomly chosen
  demonstration at a ratio drawn from `ratio_bounds` (Prefix-RFT, `random_prefixes`); "hint": every stage continues
  the first k of up to `hint_segments` step-aligned segments of demo #0, k ~ Binomial(segments, `hint_prob`) per
  prompt (UFT, `hint_prefixes`).

  What happens after grading: `demos` appends whole demonstrations to each prompt's rows, ungraded and outside its
  GRPO group (CHORD); `gate` >= 0 replaces the rollouts of a prompt with at most `gate` correct ones by its
  demonstration `gate_demo` (HPT: its first row becomes the demonstration, the others are emptied).

  Where a prefix sits: `prompt_budget` 0, in the response's budget (prefix + continuation <= the response width);
  > 0, in the prompt's, as Prefix-RFT's dataset appends it to the prompt (prompt + prefix <= prompt_budget tokens,
  the prefix cut to fit) and the continuation gets a whole response budget of its own (`response_width`).
  """
  stages: tuple[int, ...] = (4, 2, 1, 1)
  mode: str = "adaptive"
  thresholds: tuple[int, ...] = (2, 4, 7)
  prefix_ratios: tuple[float, ...] = (0.25, 0.5, 1.0)
  fixed_ratio: float = 0.5
  window: float = 0.3
  unguided_stages: int = 1  # "random": the first stages are the model's own
  ratio_bounds: tuple[float, float] = (0.0, 1.0)  # "random": ratio = low + (high - low) * Beta(ratio_beta)
  ratio_beta: tuple[float, float] = (1.0, 1.0)
  min_prefix: int = 1  # "random": fewest prefix tokens
  hint_prob: float = 0.0  # "hint": the probability of keeping each segment
  hint_segments: int = 5
  imitate: str = "last"  # whose given prefix is imitated: the "last" row of a guided stage, or "all" its rows
  grade_given: bool = True  # the grader reads the given prefix too (False: only what the model generated)
  demos: tuple[int, ...] = ()
  gate: int = -1
  gate_demo: int = 0
  prompt_budget: int = 0  # "random": > 0, prompt + prefix tokens at most this, the continuation its own budget

  @property
  def n(self) -> int:
    return sum(self.stages) + len(self.demos)

  @property
  def one_pass_rows(self) -> int:
    """Rows per prompt of a step's largest sampler call with `rollout.one_pass` on (the sampling batch is prompts x
    this): every stage's alternatives where one pass applies (11 for TRAPO's 4, 2, 1, 1), else the largest stage."""
    if not one_pass_applies(self):
      return max(self.stages)
    return len(one_pass_contexts(self)[1])


def response_width(plan, max_response_len: int) -> tuple[int, int]:
  """(width, continuation) of a plan's rows: the response buffer's width and the most tokens a row generates behind
  its prefix (0: up to the width, prefix + continuation <= the width). A plan whose prefix sits in the prompt's
  budget (Plan.prompt_budget) gets rows of prompt_budget + max_response_len tokens, each continuation at most
  max_response_len: a row's prompt and response together stay within prompt_budget + max_response_len."""
  budget = getattr(plan, "prompt_budget", 0)
  if budget > 0:
    return budget + max_response_len, max_response_len
  return max_response_len, 0


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
                 split_ids: np.ndarray, rng: np.random.Generator | None = None,
                 prompt_lens: np.ndarray | None = None) -> StageInputs:
  """demo_ids [G, 2, Ld], demo_lens [G, 2] (EOS included) -> the stage's prefixes (`rng` for SAMPLED_MODES;
  prompt_lens [G] for a plan whose prefix sits in the prompt's budget)."""
  if plan.mode in SAMPLED_MODES:
    if rng is None:
      raise ValueError(f"a plan in mode {plan.mode!r} draws its prefixes at random: pass an rng")
    if plan.mode == "random":
      return random_prefixes(plan, stage, demo_ids, demo_lens, split_ids, rng, prompt_lens)
    return hint_prefixes(plan, stage, demo_ids, demo_lens, split_ids, rng)
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
  With `imitate="all"`, every sample of a guided stage.
  """
  rows = np.zeros((guided.shape[0], plan.stages[stage]), bool)
  if plan.imitate == "all":
    rows[:] = guided[:, None]
  elif plan.mode != "fixed" or stage == len(plan.stages) - 1:
    rows[:, -1] = guided
  return rows


def _given(prefixes: list[np.ndarray], ratios: np.ndarray, width: int) -> StageInputs:
  g = len(prefixes)
  ids = np.zeros((g, width), np.int32)
  lens = np.asarray([len(p) for p in prefixes], np.int32)
  for i, p in enumerate(prefixes):
    ids[i, :len(p)] = p
  return StageInputs(ratios=np.asarray(ratios, np.float32), prefix_ids=ids, prefix_lens=lens,
                     expert_full=np.zeros((g,), bool))


def random_prefixes(plan: Plan, stage: int, demo_ids: np.ndarray, demo_lens: np.ndarray, split_ids: np.ndarray,
                    rng: np.random.Generator, prompt_lens: np.ndarray | None = None) -> StageInputs:
  """Prefix-RFT's prefixes (docs/algorithm.md#prefix-rft, official `PrefixRFTDataset.__getitem__`/`_get_prefix`).

  Per prompt: one of its demonstrations at random, r = low + (high - low) * Beta(a, b), and its first
  max(floor(r * m), min_prefix) tokens, at most m - 1, m the demonstration's length without EOS (at least one
  of its tokens is left to generate). With plan.prompt_budget > 0 the prefix is then cut to the prompt's room,
  prompt_budget - prompt length (the official right truncation of prompt + prefix at max_prompt_length; none left:
  no prefix). The ratio recorded is the prefix length over m.
  """
  del split_ids
  g, _, width = demo_ids.shape
  if stage < plan.unguided_stages:
    return _given([np.zeros(0, np.int32)] * g, np.zeros(g), width)
  if plan.prompt_budget > 0 and prompt_lens is None:
    raise ValueError("a plan whose prefix sits in the prompt's budget needs the prompt lengths")
  low, high = min(plan.ratio_bounds), max(plan.ratio_bounds)
  prefixes, ratios = [], []
  for i in range(g):
    have = np.flatnonzero(demo_lens[i] > 1)
    which = int(rng.choice(have)) if have.size else 0
    r = low + (high - low) * rng.beta(*plan.ratio_beta)
    m = int(demo_lens[i, which]) - 1  # without EOS
    k = min(max(int(r * m), plan.min_prefix), m - 1) if m > 1 else 0
    if plan.prompt_budget > 0:
      k = max(0, min(k, plan.prompt_budget - int(prompt_lens[i])))
    prefixes.append(demo_ids[i, which, :k])
    ratios.append(k / m if m > 0 else 0.0)
  return _given(prefixes, ratios, width)


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


def hint_prefixes(plan: Plan, stage: int, demo_ids: np.ndarray, demo_lens: np.ndarray, split_ids: np.ndarray,
                  rng: np.random.Generator) -> StageInputs:
  """UFT's hints (docs/algorithm.md#uft, official `RLHFDataset.__getitem__`): per prompt and stage, the first k of
  the num segments of demo #0, k ~ Binomial(num, hint_prob); every row of the stage continues the same hint (UFT
  has one stage, so one hint per prompt). The ratio recorded is the hint's share of the demonstration."""
  del stage
  g, _, width = demo_ids.shape
  prefixes, ratios = [], []
  for i in range(g):
    demo = demo_ids[i, 0, :max(int(demo_lens[i, 0]) - 1, 0)]
    ends = segment_ends(demo, split_ids, plan.hint_segments)
    k = int((rng.random(len(ends) - 1) < plan.hint_prob).sum())
    prefixes.append(demo[:ends[k]])
    ratios.append(ends[k] / int(demo_lens[i, 0]) if demo_lens[i, 0] else 0.0)
  return _given(prefixes, ratios, width)


# ----------------------------------------------------------------------------------------------------------------
# One decode pass (docs/algorithm.md#one-pass): every alternative of every stage is sampled at once, all are graded,
# and the thresholds are walked afterwards to keep exactly the rows the sequential schedule would have used.


def stage_levels(plan: Plan, stage: int, cumulative: np.ndarray) -> np.ndarray:
  """Levels [G] of stage+1 after 0-based `stage` with cumulative rewards [G]: the plan's rule, whatever its mode."""
  if plan.mode == "adaptive":
    return update_levels(plan, stage, cumulative)
  return np.full(cumulative.shape, 1 if plan.mode == "fixed" else 0, np.int32)


@dataclasses.dataclass(frozen=True)
class Alternative:
  """`size` rows of 0-based `stage` at guidance `level` (0: the model's own); `ratio` is their prefix ratio (NaN in
  the SAMPLED_MODES, which draw it per prompt)."""
  stage: int
  level: int
  size: int
  ratio: float

  @property
  def generated(self) -> bool:
    """A ratio of 1 is the whole demonstration, taken as the response: nothing to sample."""
    return not self.ratio >= 1.0


# Modes whose stages can all be sampled up front: a stage's rows depend on its level's prefix alone, and its level
# on the rewards before it (adaptive) or on nothing (the others; the SAMPLED_MODES draw a prefix per prompt and stage
# on the host, in stage order either way).
ONE_PASS_MODES = ("adaptive", "fixed", "none") + SAMPLED_MODES


def one_pass_applies(plan: Plan) -> bool:
  """Whether one decode pass replaces the plan's stages: it has more than one, of a mode whose levels are known."""
  return len(plan.stages) > 1 and plan.mode in ONE_PASS_MODES


def alternatives(plan: Plan) -> tuple[Alternative, ...]:
  """Every block of rows a prompt may use, in one-pass order: stage 1, then per later stage the levels it can take.

  A later stage's level is 0 or its own index (adaptive), always 1 (fixed) or always 0 (none), and its rows depend
  only on the prompt and that level's prefix, not on earlier rows: so every alternative can be sampled up front. In
  the SAMPLED_MODES each stage is one alternative, guided (level 1) after `unguided_stages` ("random") or always
  ("hint": a hint of no segments is no prefix).
  """
  if plan.mode not in ONE_PASS_MODES:
    raise ValueError(f"plan mode {plan.mode!r}: its stages cannot be sampled in one pass (modes {ONE_PASS_MODES})")
  out = []
  for s, size in enumerate(plan.stages):
    if plan.mode in SAMPLED_MODES:
      guided = plan.mode == "hint" or s >= plan.unguided_stages
      out.append(Alternative(stage=s, level=int(guided), size=size, ratio=float("nan") if guided else 0.0))
      continue
    levels = (0,) if s == 0 or plan.mode == "none" else (1,) if plan.mode == "fixed" else (0, s)
    for level in levels:
      ratio = float(stage_ratios(plan, s, np.asarray([level]))[0])
      out.append(Alternative(stage=s, level=level, size=size, ratio=ratio))
  return tuple(out)


def one_pass_contexts(plan: Plan) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(sources, branches): the prefixes a prompt's one-pass rows continue, each prefilled once after the bare
  prompt's, named by the index in `alternatives(plan)` of the first alternative continuing it; and the context of
  each generated row (0: the bare prompt, b: the prefix of sources[b - 1]), in `alternatives` order. Alternatives
  at one ratio continue one prefix (the fixed ratio's stages); a drawn prefix is its stage's own."""
  alts = alternatives(plan)
  key = lambda a: a.stage if plan.mode in SAMPLED_MODES else a.ratio
  sources, keys, branches = [], [], []
  for k, a in enumerate(alts):
    if not a.generated:
      continue
    if a.level == 0 or a.ratio == 0:  # the model's own rows (a ratio of 0 is no prefix)
      branches += [0] * a.size
      continue
    if key(a) not in keys:
      sources.append(k)
      keys.append(key(a))
    branches += [keys.index(key(a)) + 1] * a.size
  return tuple(sources), tuple(branches)


def select_levels(plan: Plan, rewards: Sequence[np.ndarray]) -> np.ndarray:
  """The levels [G, stages] the sequential schedule takes, from every alternative's rewards.

  rewards: one [G, size] array per entry of `alternatives(plan)`, in that order. Pure: the same walk over the
  thresholds as `rollout.collect`, only the rewards of the level not taken are never looked at.
  """
  by_choice = {(a.stage, a.level): np.asarray(r, np.float32) for a, r in zip(alternatives(plan), rewards)}
  g = next(iter(by_choice.values())).shape[0]
  levels = np.zeros((g, len(plan.stages)), np.int32)
  cumulative = np.zeros((g,), np.float32)
  for s in range(len(plan.stages)):
    if s:
      levels[:, s] = stage_levels(plan, s - 1, cumulative)
    taken = np.zeros((g, plan.stages[s]), np.float32)
    for (stage, level), r in by_choice.items():
      if stage == s:
        taken = np.where((levels[:, s] == level)[:, None], r, taken)
    cumulative += taken.sum(1)
  return levels


def selected_rows(plan: Plan, levels: np.ndarray) -> np.ndarray:
  """[G, n] indices into a prompt's one-pass rows (`alternatives(plan)` blocks laid end to end) of the rows it uses,
  in stage order, given its levels [G, stages]."""
  starts = np.cumsum([0] + [a.size for a in alternatives(plan)])
  cols = []
  for k, a in enumerate(alternatives(plan)):
    take = levels[:, a.stage] == a.level
    cols.append((a.stage, np.where(take[:, None], starts[k] + np.arange(a.size)[None], -1)))
  rows = [np.max(np.stack([c for s, c in cols if s == stage]), axis=0) for stage in range(len(plan.stages))]
  out = np.concatenate(rows, 1)
  if (out < 0).any():
    raise ValueError(f"levels {levels[(out < 0).any(1)][0].tolist()} name no alternative of the plan")
  return out
