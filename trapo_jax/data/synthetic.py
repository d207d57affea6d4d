r"""The embedded synthetic reasoning task: chained two-digit arithmetic, solved step by step.

  Start with 38. Add 7, subtract 3, add 12, subtract 25. What is the result?

  38 + 7 = 45\n\n45 - 3 = 42\n\n42 + 12 = 54\n\n54 - 25 = 29\n\nThe answer is \boxed{29}.

Every intermediate value stays in 0..99. The level is the number of operations; a small model computes one
operation per step reliably, but not a chain of them at once, so long chains need the written-out steps. Each
problem has two different correct solutions with "\n\n" between steps: demo #0 (one equation per step, used for
prefixes) and demo #1 (a running total in words, the full-expert sample). Train and test problems are disjoint: a
problem's identity (start value and operations) decides its split by hash, whatever the seed.

  python -m trapo_jax.data.synthetic                      # three example problems with their solutions
  python -m trapo_jax.data.synthetic --lengths            # longest prompt and solution per level, in tokens
  python -m trapo_jax.data.synthetic --build_tokenizer    # regenerate trapo_jax/assets/synthetic_tokenizer
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from trapo_jax.data.demos import ArrayRecordBuilder

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TOKENIZER_DIR = os.path.join(ASSETS, "synthetic_tokenizer")
BASE_POLICY_DIR = os.path.join(ASSETS, "synthetic_base")
LEVELS = (1, 2, 3, 4, 5, 6)
# The levels the shipped base policy solves 5-30 % of the time (experiments/configs/synthetic_base.py): where a 25 %
# or 50 % expert prefix, which writes some of the steps, has the most to teach.
HARD_LEVELS = (4, 5, 6)
SPLITS = ("train", "test")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, turn start, EOS (end of the assistant turn)
_TEST_EVERY = 8  # one problem identity in 8 belongs to the test split
# Consecutive draws that all miss (wrong split or already drawn) before `generate_split` gives up: far beyond the runs
# of misses met while a usable share of the split's problems is still undrawn.
_MAX_MISSES = 100_000


@dataclasses.dataclass(frozen=True)
class Problem:
  start: int
  ops: tuple[tuple[str, int], ...]  # ("+", 7), ("-", 3), ...

  @property
  def level(self) -> int:
    return len(self.ops)

  def values(self) -> list[int]:
    out = [self.start]
    for op, x in self.ops:
      out.append(out[-1] + x if op == "+" else out[-1] - x)
    return out

  @property
  def answer(self) -> int:
    return self.values()[-1]

  def text(self) -> str:
    words = [f"{'add' if op == '+' else 'subtract'} {x}" for op, x in self.ops]
    steps = ", ".join(words)
    return f"Start with {self.start}. {steps[0].upper()}{steps[1:]}. What is the result?"

  def solution_equations(self) -> str:
    v = self.values()
    lines = [f"{v[i]} {op} {x} = {v[i + 1]}" for i, (op, x) in enumerate(self.ops)]
    return "\n\n".join(lines + [f"The answer is \\boxed{{{self.answer}}}."])

  def solution_running_total(self) -> str:
    v = self.values()
    lines = [f"Start: {v[0]}"]
    for i, (op, x) in enumerate(self.ops):
      lines.append(f"After {'adding' if op == '+' else 'subtracting'} {x}: {v[i + 1]}")
    return "\n\n".join(lines + [f"So the result is \\boxed{{{self.answer}}}."])

  def key(self) -> str:
    return f"{self.start}|" + ",".join(f"{op}{x}" for op, x in self.ops)


def make_problem(rng: np.random.Generator, level: int) -> Problem:
  """A random problem with `level` operations whose every intermediate value lies in 0..99."""
  value = int(rng.integers(0, 100))
  start, ops = value, []
  for _ in range(level):
    add = bool(rng.integers(0, 2)) if 0 < value < 99 else value == 0
    x = int(rng.integers(1, (99 - value if add else value) + 1))
    ops.append(("+" if add else "-", x))
    value = value + x if add else value - x
  return Problem(start, tuple(ops))


def split_of(problem: Problem) -> str:
  digest = hashlib.sha1(problem.key().encode()).digest()
  return "test" if digest[0] % _TEST_EVERY == 0 else "train"


def record(p: Problem) -> dict:
  """The example of a problem: problem text, answer, (demo #0, demo #1) and level."""
  return {"problem": p.text(), "answer": str(p.answer), "demos": (p.solution_equations(), p.solution_running_total()),
          "level": p.level}


def make_example(rng: np.random.Generator, level: int) -> dict:
  """A random example of `level` operations (either split; `generate_split` keeps a split's own)."""
  return record(make_problem(rng, level))


def _check_split_args(split: str, num: int, levels: Sequence[int]) -> None:
  if split not in SPLITS:
    raise ValueError(f"split: {split!r} is unknown (known: {', '.join(SPLITS)})")
  if num < 0:
    raise ValueError(f"num: {num} is negative")
  if not levels or any(int(level) < 1 for level in levels):
    raise ValueError(f"levels: {tuple(levels)} must be a non-empty list of numbers of operations >= 1")


def generate_split(split: str, num: int, levels: Sequence[int] = LEVELS, seed: int = 0) -> list[dict]:
  """`num` distinct problems of `split`, each level drawn uniformly from `levels`; deterministic in the seed.

  Draws that land in the other split or repeat a problem are redrawn (level included), so levels with few distinct
  problems (level 1 has about 10k, most of them train) are somewhat under-represented in large splits.
  """
  _check_split_args(split, num, levels)
  rng = np.random.default_rng([seed, SPLITS.index(split)])
  seen, out, misses = set(), [], 0
  while len(out) < num:
    p = make_problem(rng, int(rng.choice(levels)))
    if split_of(p) != split or p.key() in seen:
      misses += 1
      if misses > _MAX_MISSES:
        raise ValueError(f"num: {num} {split} problems requested, but levels {tuple(levels)} only gave "
                         f"{len(out)} distinct ones")
      continue
    misses = 0
    seen.add(p.key())
    out.append(record(p))
  return out


# ----------------------------------------------------------------------------------------------------------------
# TFDS builder.


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  """A non-default configuration needs its own `name`: it names the directory the data is prepared in."""
  num_train: int = 20000
  num_test: int = 600
  train_levels: tuple[int, ...] = LEVELS
  test_levels: tuple[int, ...] = LEVELS
  seed: int = 0


class Synthetic(ArrayRecordBuilder):
  """Chained arithmetic with step-by-step solutions (see the module docstring).

  Splits "train" and "test"; `uid` is the problem's index in its split (unique per problem within a split).
  """

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [SyntheticConfig(name="default", description="levels 1-6, 20k train / 600 test")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "uid": np.int64, "problem": tfds.features.Text(), "answer": tfds.features.Text(),
        "demos": tfds.features.Sequence(tfds.features.Text()), "level": np.int32}))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train, c.train_levels),
            "test": self._generate_examples("test", c.num_test, c.test_levels)}

  def _generate_examples(self, split: str, num: int, levels: Sequence[int]):
    for uid, ex in enumerate(generate_split(split, num, levels, self.builder_config.seed)):
      yield uid, {"uid": uid, **ex, "demos": list(ex["demos"])}


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer.


# The templates the synthetic task's tokenizer was trained on. Named here, not read off templates.TEMPLATES, so that
# adding a template for a real model cannot change the shipped vocabulary (and every synthetic result with it).
CORPUS_TEMPLATES = ("train", "eval", "eval_official")


def tokenizer_corpus() -> list[str]:
  from trapo_jax.data.templates import format_prompt
  texts = [format_prompt("", t) for t in CORPUS_TEMPLATES]
  for ex in generate_split("train", 3000, LEVELS, seed=123):
    texts += [ex["problem"], *ex["demos"]]
  return texts


def build_tokenizer(out_dir: str, vocab_size: int = 384) -> None:
  """A byte-level BPE (exact decoding) with one token per digit and "\\n\\n" as a single token."""
  import transformers
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  # Digits apart, runs of newlines apart (so "\n\n" becomes one merged token), then byte-level words.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(tokenizer_corpus(), trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>", bos_token=None,
                                              additional_special_tokens=["<|im_start|>"])
  fast.save_pretrained(out_dir)


def max_lengths(tokenizer, examples: Sequence[dict], template: str = "train") -> dict[int, tuple[int, int]]:
  """level -> (longest prompt under `template`, longest demo + EOS), in tokens."""
  from trapo_jax.data.templates import format_prompt
  out = collections.defaultdict(lambda: (0, 0))
  for ex in examples:
    prompt = len(tokenizer.encode(format_prompt(ex["problem"], template), add_special_tokens=False))
    demo = max(len(tokenizer.encode(d, add_special_tokens=False)) + 1 for d in ex["demos"])
    out[ex["level"]] = tuple(map(max, out[ex["level"]], (prompt, demo)))
  return dict(sorted(out.items()))


def main(argv: Sequence[str]) -> None:
  if "--build_tokenizer" in argv:
    build_tokenizer(TOKENIZER_DIR)
    print(f"wrote {TOKENIZER_DIR}")
  elif "--lengths" in argv:
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    c = SyntheticConfig(name="default")
    examples = (generate_split("train", c.num_train, c.train_levels, c.seed)
                + generate_split("test", c.num_test, c.test_levels, c.seed))
    print("level  prompt(train template)  solution+EOS  total")
    for level, (prompt, demo) in max_lengths(tokenizer, examples).items():
      print(f"{level:5d}  {prompt:22d}  {demo:12d}  {prompt + demo:5d}")
  else:
    for ex in generate_split("train", 3, seed=0):
      print(ex["problem"], "\n---\n", ex["demos"][0], "\n---\n", ex["demos"][1], "\n")


if __name__ == "__main__":
  import sys
  main(sys.argv)
