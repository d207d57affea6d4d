"""Micro-group adaptive prefixes (docs/algorithm.md#trapo): which samples of a prompt get which expert prefix, and which get TrSFT.

Per prompt, samples come in stages (default 4, 2, 1, 1). After stage s the cumulative reward S of the prompt sets
the guidance level of stage s+1: level s if S < thresholds[s-1], else 0 (so a prompt may jump 0 -> 2). A stage at
level l continues from a prefix of prefix_ratios[l-1] of demo #0; a ratio of 1.0 is the whole of demo #1, taken as
the response with no generation. Inside a guided stage only the last sample's prefix gets the prefix loss, so a
prefix is imitated once (the official `off_seq_loss_mask`: [0, 1] for the two 25% samples, [1] for the single ones).

A plan (`Plan`) holds what every method's rows have: the stages, whose prefixes are imitated and graded, and what
follows the grading. How the stages continue expert prefixes is its `guidance`, one class per kind (`Guidance`):
none (`Unguided`), TRAPO's adaptive levels (`AdaptiveLevels`), one fixed ratio (`FixedRatio`: TRAPO's ablation,
LUFFY's and SRFT's demonstration row), and in the methods' own modules Prefix-RFT's drawn ratio
(`algorithms.prefix_rft.DrawnRatio`) and UFT's hints (`algorithms.uft.Hints`), both drawn at random (`Drawn`). The
stages (`rollout.collect`), one decode pass (`rollout.collect_one_pass`) and the compile mode (`programs.rollout_calls`)
ask the guidance and never its kind: a new rollout shape is one class.

All functions here are pure and host-side (numpy); the trainer calls them between sampler and grader calls.
"""

from __future__ import annotations

import dataclasses
import math
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


@dataclasses.dataclass
class StageInputs:
  """What the sampler needs for one stage: per prompt, the forced prefix (from demo #0 or all of demo #1)."""
  ratios: np.ndarray  # [G]
  prefix_ids: np.ndarray  # [G, Lmax] right-padded
  prefix_lens: np.ndarray  # [G]
  expert_full: np.ndarray  # [G] bool: the whole demo #1 is the response; nothing is generated


def given_inputs(prefixes: list[np.ndarray], ratios: Sequence[float], width: int) -> StageInputs:
  """A stage's inputs from one given prefix per prompt ([k] tokens each, none a whole demonstration), right-padded
  to `width`; `ratios` [G] as recorded."""
  g = len(prefixes)
  ids = np.zeros((g, width), np.int32)
  lens = np.asarray([len(p) for p in prefixes], np.int32)
  for i, p in enumerate(prefixes):
    ids[i, :len(p)] = p
  return StageInputs(ratios=np.asarray(ratios, np.float32), prefix_ids=ids, prefix_lens=lens,
                     expert_full=np.zeros((g,), bool))


@dataclasses.dataclass(frozen=True)
class Alternative:
  """`size` rows of 0-based `stage` at guidance `level` (0: the model's own); `ratio` is their prefix ratio (NaN
  where the guidance draws it per prompt)."""
  stage: int
  level: int
  size: int
  ratio: float

  @property
  def generated(self) -> bool:
    """A ratio of 1 is the whole demonstration, taken as the response: nothing to sample."""
    return not self.ratio >= 1.0


# ----------------------------------------------------------------------------------------------------------------
# Guidance: how a plan's stages continue expert prefixes, one class (a frozen dataclass) per kind.


class Guidance:
  """How a plan's stages continue expert prefixes. A stage's level is 0 (the model's own) or a guidance level; a
  subclass says what each stage's prefixes are (`inputs`), how the levels follow the rewards (`next_levels`), which
  blocks of rows one decode pass samples (`alternatives`) and which of them continue one prefix (`prefix_key`),
  whose prefix a plan imitating "last" imitates (`imitates`), which stages may continue a prefix (`guides`) and the
  longest prefix a row holds (`longest_prefix`, the compile mode's buffers)."""
  draws = False  # prefixes drawn at random per prompt and stage: `collect` needs an rng, and no level is chosen
  one_pass = True  # a stage's rows depend on its level's prefix alone: every stage can be sampled up front
  prompt_budget = 0  # > 0: the prefix sits in the prompt's budget, not the response's (response_width)

  def inputs(self, stage: int, levels: np.ndarray, demo_ids: np.ndarray, demo_lens: np.ndarray,
             split_ids: np.ndarray, rng: np.random.Generator | None = None,
             prompt_lens: np.ndarray | None = None) -> StageInputs:
    """demo_ids [G, 2, Ld], demo_lens [G, 2] (EOS included), levels [G] of 0-based `stage` -> its prefixes (`rng`:
    where they are drawn; prompt_lens [G]: where they sit in the prompt's budget)."""
    raise NotImplementedError

  def next_levels(self, stage: int, cumulative: np.ndarray) -> np.ndarray:
    """Levels [G] of stage+1 after 0-based `stage` with cumulative rewards [G]."""
    return np.zeros(cumulative.shape, np.int32)

  def alternatives(self, stages: tuple[int, ...]) -> tuple[Alternative, ...]:
    """Every block of rows a prompt may use, in one-pass order (see the module function `alternatives`)."""
    raise NotImplementedError

  def prefix_key(self, a: Alternative) -> float | int:
    """Which prefix an alternative's rows continue: alternatives at one ratio continue one prefix."""
    return a.ratio

  def imitates(self, stage: int, num_stages: int) -> bool:
    """Whether the last row of guided 0-based `stage` gets the prefix loss (Plan.imitate = "last")."""
    del stage, num_stages
    return True

  def guides(self, stage: int) -> bool:
    """Whether 0-based `stage` may continue a prefix."""
    return stage > 0

  def longest_prefix(self, max_response_len: int) -> int:
    """The most prefix tokens a row generated behind one holds, for demonstrations of up to max_response_len."""
    del max_response_len
    return 0


def cut_room(ratios: Sequence[float], window: float, max_response_len: int) -> int:
  """The longest prefix cut (prefix_cut) at one of `ratios` holds: up to (ratio + window) of a demonstration of
  max_response_len tokens. A ratio of 1 is a whole demonstration, which is not generated behind."""
  guided = [r for r in ratios if 0 < r < 1]
  if not guided:
    return 0
  return min(max_response_len, math.ceil((max(guided) + window) * max_response_len))


class ByLevel(Guidance):
  """Guidance by levels: a stage at a level continues a prefix of its ratio (`ratios`) of demo #0 cut on a step
  boundary within `window` (prefix_cut), or at a ratio of 1 the whole of demo #1, taken as the response."""
  window = 0.3

  def ratios(self, stage: int, levels: np.ndarray) -> np.ndarray:
    """Prefix ratio per prompt [G] of 0-based `stage` at levels [G]; 0 means a pure rollout."""
    raise NotImplementedError

  def levels(self, stage: int) -> tuple[int, ...]:
    """The levels 0-based `stage` may take."""
    raise NotImplementedError

  def inputs(self, stage, levels, demo_ids, demo_lens, split_ids, rng=None, prompt_lens=None) -> StageInputs:
    del rng, prompt_lens
    ratios = self.ratios(stage, levels)
    g, _, width = demo_ids.shape
    prefix = np.zeros((g, width), np.int32)
    lens = np.zeros((g,), np.int32)
    full = ratios >= 1.0
    for i in range(g):
      if ratios[i] <= 0:
        continue
      which = 1 if full[i] else 0
      demo = demo_ids[i, which, :demo_lens[i, which]]
      k = len(demo) if full[i] else prefix_cut(demo, float(ratios[i]), split_ids, self.window)
      prefix[i, :k] = demo[:k]
      lens[i] = k
    return StageInputs(ratios=ratios, prefix_ids=prefix, prefix_lens=lens, expert_full=full)

  def alternatives(self, stages):
    """Per stage, a block of rows at each level it may take, at that level's ratio."""
    return tuple(Alternative(stage=s, level=level, size=size, ratio=float(self.ratios(s, np.asarray([level]))[0]))
                 for s, size in enumerate(stages) for level in self.levels(s))


@dataclasses.dataclass(frozen=True)
class Unguided(ByLevel):
  """No prefixes: every row is the model's own (GRPO, and CHORD's and HPT's rollouts)."""

  def ratios(self, stage, levels):
    return np.zeros(levels.shape, np.float32)

  def levels(self, stage):
    return (0,)

  def guides(self, stage):
    return False


@dataclasses.dataclass(frozen=True)
class AdaptiveLevels(ByLevel):
  """TRAPO's micro-group levels (module docstring): after 0-based stage s a prompt whose cumulative reward is below
  thresholds[s] is at level s+1 in the next stage, else at level 0; level l continues prefix_ratios[l-1]."""
  thresholds: tuple[int, ...] = (2, 4, 7)
  prefix_ratios: tuple[float, ...] = (0.25, 0.5, 1.0)
  window: float = 0.3

  def ratios(self, stage, levels):
    if stage == 0:
      return np.zeros(levels.shape, np.float32)
    return np.asarray((0.0,) + tuple(self.prefix_ratios), np.float32)[levels]

  def levels(self, stage):
    """0 or the stage's own index: the thresholds either guide a stage at its level or not at all."""
    return (0,) if stage == 0 else (0, stage)

  def next_levels(self, stage, cumulative):
    return np.asarray([next_level(stage + 1, s, self.thresholds) for s in cumulative], np.int32)

  def longest_prefix(self, max_response_len):
    return cut_room(self.prefix_ratios, self.window, max_response_len)


@dataclasses.dataclass(frozen=True)
class FixedRatio(ByLevel):
  """Every prompt guided after its first stage at one `ratio` (TRAPO's ablation without adaptive levels; 1.0 is
  LUFFY's and SRFT's whole demonstration row). The guided stages continue one prefix, imitated once: by the last
  row of the last stage."""
  ratio: float = 0.5
  window: float = 0.3

  def ratios(self, stage, levels):
    return np.full(levels.shape, self.ratio if stage else 0.0, np.float32)

  def levels(self, stage):
    return (0,) if stage == 0 else (1,)

  def next_levels(self, stage, cumulative):
    return np.ones(cumulative.shape, np.int32)

  def imitates(self, stage, num_stages):
    return stage == num_stages - 1

  def longest_prefix(self, max_response_len):
    return cut_room((self.ratio,), self.window, max_response_len)


class Drawn(Guidance):
  """Guidance whose prefixes are drawn at random per prompt and stage, in stage order, from the rng `collect` is
  given: no level follows the rewards, so every stage's rows are kept, a stage's recorded level being 1 where it
  continues a prefix. In one pass each stage is one alternative (level 1 where it `guides`, its ratio drawn per
  prompt: NaN), its prefix its own context."""
  draws = True

  def alternatives(self, stages):
    return tuple(Alternative(stage=s, level=int(self.guides(s)), size=size,
                             ratio=float("nan") if self.guides(s) else 0.0) for s, size in enumerate(stages))

  def prefix_key(self, a):
    return a.stage

  def longest_prefix(self, max_response_len):
    """A drawn prefix may be all of a demonstration but its last token."""
    return max_response_len


# ----------------------------------------------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class Plan:
  """A rollout plan: stage sizes, how the stages continue expert prefixes (`guidance`: Guidance), and what every plan
  may do with their rows. One type covers every algorithm.

  `imitate`: whose given prefix gets the prefix loss, the "last" row of a guided stage (where the guidance
  `imitates` it) or "all" its rows; `grade_given`: the grader reads the given prefix too (False: only what the model
  generated). What happens after grading: `demos` appends whole demonstrations to each prompt's rows, ungraded and
  outside its GRPO group (CHORD); `gate` >= 0 replaces the rollouts of a prompt with at most `gate` correct ones by
  its demonstration `gate_demo` (HPT: its first row becomes the demonstration, the others are emptied).

  Where a prefix sits (the guidance's `prompt_budget`): 0, in the response's budget (prefix + continuation <= the
  response width); > 0, in the prompt's, as Prefix-RFT's dataset appends it to the prompt (prompt + prefix <=
  prompt_budget tokens, the prefix cut to fit) and the continuation gets a whole response budget of its own
  (`response_width`).
  """
  stages: tuple[int, ...] = (4, 2, 1, 1)
  guidance: Guidance = AdaptiveLevels()
  imitate: str = "last"  # whose given prefix is imitated: the "last" row of a guided stage, or "all" its rows
  grade_given: bool = True  # the grader reads the given prefix too (False: only what the model generated)
  demos: tuple[int, ...] = ()
  gate: int = -1
  gate_demo: int = 0

  @property
  def n(self) -> int:
    return sum(self.stages) + len(self.demos)

  @property
  def prompt_budget(self) -> int:
    return self.guidance.prompt_budget

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


def stage_inputs(plan: Plan, stage: int, levels: np.ndarray, demo_ids: np.ndarray, demo_lens: np.ndarray,
                 split_ids: np.ndarray, rng: np.random.Generator | None = None,
                 prompt_lens: np.ndarray | None = None) -> StageInputs:
  """demo_ids [G, 2, Ld], demo_lens [G, 2] (EOS included) -> the stage's prefixes (`rng` for guidance that draws
  them; prompt_lens [G] for a plan whose prefix sits in the prompt's budget)."""
  if plan.guidance.draws and rng is None:
    raise ValueError(f"{type(plan.guidance).__name__} draws its prefixes at random: pass an rng")
  return plan.guidance.inputs(stage, levels, demo_ids, demo_lens, split_ids, rng, prompt_lens)


def prefix_loss_rows(plan: Plan, stage: int, guided: np.ndarray) -> np.ndarray:
  """[G, stage size] bool: which samples' prefix tokens get the prefix loss.

  The last sample of a guided stage where the guidance imitates it (a fixed ratio: only in the last stage, so each
  prompt imitates one prefix). With `imitate="all"`, every sample of a guided stage.
  """
  rows = np.zeros((guided.shape[0], plan.stages[stage]), bool)
  if plan.imitate == "all":
    rows[:] = guided[:, None]
  elif plan.guidance.imitates(stage, len(plan.stages)):
    rows[:, -1] = guided
  return rows


# ----------------------------------------------------------------------------------------------------------------
# One decode pass (docs/algorithm.md#one-pass): every alternative of every stage is sampled at once, all are graded,
# and the thresholds are walked afterwards to keep exactly the rows the sequential schedule would have used.


def stage_levels(plan: Plan, stage: int, cumulative: np.ndarray) -> np.ndarray:
  """Levels [G] of stage+1 after 0-based `stage` with cumulative rewards [G]: the plan's rule, whatever its guidance."""
  return plan.guidance.next_levels(stage, cumulative)


def one_pass_applies(plan: Plan) -> bool:
  """Whether one decode pass replaces the plan's stages: it has more than one, and its guidance's levels are known
  (Guidance.one_pass)."""
  return len(plan.stages) > 1 and plan.guidance.one_pass


def alternatives(plan: Plan) -> tuple[Alternative, ...]:
  """Every block of rows a prompt may use, in one-pass order: stage 1, then per later stage the levels it can take.

  A later stage's level is 0 or its own index (adaptive levels), always 1 (a fixed ratio) or always 0 (unguided),
  and its rows depend only on the prompt and that level's prefix, not on earlier rows: so every alternative can be
  sampled up front. Where the guidance draws its prefixes each stage is one alternative, guided (level 1) where the
  guidance guides it (Prefix-RFT: after its unguided stages; UFT: always, a hint of no segments being no prefix).
  """
  if not plan.guidance.one_pass:
    raise ValueError(f"{type(plan.guidance).__name__}: its stages cannot be sampled in one pass")
  return plan.guidance.alternatives(plan.stages)


def one_pass_contexts(plan: Plan) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(sources, branches): the prefixes a prompt's one-pass rows continue, each prefilled once after the bare
  prompt's, named by the index in `alternatives(plan)` of the first alternative continuing it; and the context of
  each generated row (0: the bare prompt, b: the prefix of sources[b - 1]), in `alternatives` order. Alternatives
  with one key (Guidance.prefix_key) continue one prefix: one ratio's (the fixed ratio's stages); a drawn prefix is
  its stage's own."""
  alts = alternatives(plan)
  key = plan.guidance.prefix_key
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
