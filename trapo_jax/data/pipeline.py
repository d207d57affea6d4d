"""Examples from the TFDS builders, and fixed-shape prompt batches (prompt + 2 demonstrations) for the trainer.

Shapes are padded to power-of-two buckets so that a run compiles a handful of programs, not one per batch.
The order of epoch e is a permutation drawn from `np.random.default_rng((seed, e))`, so `state()`/`restore()`
resume a run on exactly the batches it would have seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import numpy as np

from trapo_jax import paths
from trapo_jax.data import demos as demos_lib
from trapo_jax.data.templates import format_prompt
from trapo_jax.shapes import bucket

_READ_CHUNK = 1024
_COMPLETE = "dataset_info.json"  # TFDS writes it last: a data dir with it is prepared
_MAX_LISTED_UIDS = 20


@dataclasses.dataclass(frozen=True)
class Example:
  uid: int
  problem: str
  answer: str
  demos: tuple[str, ...] = ()  # whole solutions (demos.demo_text takes a part); empty for benchmark rows
  level: int = 0  # difficulty, where the dataset has one (synthetic task)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _example(record: dict) -> Example:
  return Example(uid=int(record["uid"]), problem=_text(record["problem"]), answer=_text(record["answer"]),
                 demos=tuple(_text(d) for d in record.get("demos", ())), level=int(record.get("level", 0)))


@contextlib.contextmanager
def _exclusive(directory: str) -> Iterator[None]:
  """One process at a time on this machine (runs sharing a data_dir would race in TFDS's preparation)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ".prepare.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepared(make_builder: Callable[[str], Any], data_dir: str):
  """`make_builder(data_dir)`, prepared under data_dir if it is not yet; one process at a time (a builder made while
  another process prepares the same data would not see it).

  A gs:// data_dir is mirrored in the local cache (paths.cache_dir): TFDS's array_record files are written and read
  by a C++ library that opens local files only. A dataset already in the bucket is copied down; one prepared here is
  copied up (its dataset_info.json last, which is what marks a TFDS dataset complete).
  """
  local = data_dir
  if paths.is_remote(data_dir):
    local = os.path.join(paths.cache_dir(), "tfds", hashlib.sha256(data_dir.encode()).hexdigest()[:16])
  with _exclusive(local):
    builder = make_builder(local)
    remote = paths.join(data_dir, os.path.relpath(str(builder.data_dir), local)) if local != data_dir else None
    # TFDS's own test (is_prepared() warns about the folder it looks for).
    if remote is not None and paths.exists(paths.join(remote, _COMPLETE)) and not builder.data_path.exists():
      paths.download_dir(remote, str(builder.data_dir), last=_COMPLETE)
      builder = make_builder(local)
    if not builder.data_path.exists():
      _prepare(builder)
    if remote is not None and not paths.exists(paths.join(remote, _COMPLETE)):
      paths.upload_dir(str(builder.data_dir), remote, last=_COMPLETE)
  return builder


def _prepare(builder) -> None:
  """TFDS's preparation, announced in one log line: its own banner says "Downloading" (the builders read local
  files) and its progress bars would interleave with the run's log."""
  import tensorflow_datasets as tfds
  logging.info("preparing %s in %s from local files", builder.info.full_name, builder.data_dir)
  start = time.perf_counter()
  builder._log_download_bytes = builder._log_download_done = lambda: None  # pylint: disable=protected-access
  tfds.display_progress_bar(False)
  builder.download_and_prepare()
  logging.info("prepared %s in %.0f s", builder.info.full_name, time.perf_counter() - start)


def read_split(builder, split: str) -> list[Example]:
  """Every example of `split` of a prepared TFDS builder, in uid order."""
  if split not in builder.info.splits:
    raise demos_lib.DataError(f"split {split!r} is not in {builder.name}/{builder.builder_config.name} "
                     f"(splits: {', '.join(builder.info.splits)})")
  source = builder.as_data_source(split)
  records = []
  for start in range(0, len(source), _READ_CHUNK):
    records.extend(source.__getitems__(range(start, min(start + _READ_CHUNK, len(source)))))
  # TFDS stores records in hashed-key order; uid order is the source order.
  return sorted((_example(r) for r in records), key=lambda e: e.uid)


def load_examples(data_cfg, split: str, *, data_dir: str) -> list[Example]:
  """The examples of `split` of the dataset `data_cfg` names (`source`: demos | synthetic), prepared under data_dir."""
  if data_cfg.source == "demos":
    if not data_cfg.path:
      raise demos_lib.DataError("data.path: empty; the demos source needs a parquet/jsonl file or directory")
    make = lambda d: demos_lib.demos_builder(data_cfg.path, data_dir=d)
  elif data_cfg.source == "synthetic":
    from trapo_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    make = lambda d: synthetic.Synthetic(data_dir=d)
  else:
    raise demos_lib.DataError(f"data.source: {data_cfg.source!r} is unknown (known: demos, synthetic)")
  return read_split(prepared(make, data_dir), split)


def load_benchmark_examples(name: str, *, data_dir: str) -> list[Example]:
  """The problems of benchmark `name` (aime24, math500, ...) in file order, prepared under data_dir."""
  from trapo_jax.data import benchmarks_tfds  # pylint: disable=g-import-not-at-top
  builder = prepared(lambda d: benchmarks_tfds.benchmarks_builder(name, data_dir=d), data_dir)
  return read_split(builder, benchmarks_tfds.SPLIT)


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Rows of token ids [N, L] and their masks -> the texts the grader reads (special tokens dropped)."""
  return tokenizer.batch_decode([row[m].tolist() for row, m in zip(tokens, mask)], skip_special_tokens=True)


def pad_id(tokenizer) -> int:
  """The id padding is written with: the tokenizer's pad token, else its EOS (masked out wherever it pads)."""
  return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def _listed(uids: list[int]) -> str:
  more = len(uids) - _MAX_LISTED_UIDS
  return str(uids[:_MAX_LISTED_UIDS]) + (f" (+{more} more)" if more > 0 else "")


@dataclasses.dataclass
class PromptBatch:
  """G prompts with their two demonstrations, right-padded with the pad id."""
  uids: np.ndarray  # [G] int64
  prompt_ids: np.ndarray  # [G, P] int32
  prompt_lens: np.ndarray  # [G] int32
  demo_ids: np.ndarray  # [G, 2, Ld] int32: demos #0 and #1 in the run's form (demos.demo_text), EOS appended
  demo_lens: np.ndarray  # [G, 2] int32, EOS included; 0 where an example has no such demo
  answers: list[str]
  problems: list[str]

  def take(self, rows) -> "PromptBatch":
    """The batch of the prompts at `rows` (a slice or an index array), in that order."""
    rows = np.arange(len(self.uids))[rows]
    return PromptBatch(uids=self.uids[rows], prompt_ids=self.prompt_ids[rows], prompt_lens=self.prompt_lens[rows],
                       demo_ids=self.demo_ids[rows], demo_lens=self.demo_lens[rows],
                       answers=[self.answers[i] for i in rows], problems=[self.problems[i] for i in rows])


class PromptLoader:
  """Batches of `batch_size` prompts: infinite shuffled epochs for training, or one pass for evaluation.

  Training (`drop_remainder=True`): each epoch is a fresh permutation and its last incomplete batch is dropped.
  Evaluation (`require_demos=False, drop_remainder=False`): one pass; in source order when `seed` is None; the last
  batch may be smaller. `demo_form`: the part of each demonstration the batches hold (demos.demo_text).
  """

  def __init__(self, examples: Sequence[Example], tokenizer, *, batch_size: int, max_prompt_len: int,
               max_response_len: int, template: str, seed: int | None, require_demos: bool = True,
               drop_remainder: bool = True, demo_form: str = "thought"):
    if batch_size < 1 or max_prompt_len < 1 or max_response_len < 1:
      raise ValueError(f"batch_size ({batch_size}), max_prompt_len ({max_prompt_len}) and max_response_len "
                       f"({max_response_len}) must be positive")
    self.eos_id = tokenizer.eos_token_id
    if self.eos_id is None:
      raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}: "
                       "has no eos_token_id")
    self.pad_id = pad_id(tokenizer)
    if require_demos:
      for e in examples:
        if len(e.demos) < 2:
          raise demos_lib.DataError(f"example uid {e.uid}: has {len(e.demos)} demonstrations, needs 2")
    if demo_form not in demos_lib.DEMO_FORMS:
      raise ValueError(f"demo_form {demo_form!r} is unknown (known: {', '.join(demos_lib.DEMO_FORMS)})")
    self.demo_form = demo_form
    self._tokenizer = tokenizer
    self.batch_size = batch_size
    self.max_prompt_len = max_prompt_len
    self.max_response_len = max_response_len
    self.seed = seed
    self.drop_remainder = drop_remainder

    texts = [format_prompt(e.problem, template) for e in examples]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    keep = [i for i, row in enumerate(ids) if len(row) <= max_prompt_len]
    if len(keep) < len(ids):
      dropped = sorted(set(range(len(ids))) - set(keep))
      logging.info("filtered %d of %d prompts longer than %d tokens, uids %s", len(dropped), len(ids), max_prompt_len,
                   _listed([examples[i].uid for i in dropped]))
    self.examples: tuple[Example, ...] = tuple(examples[i] for i in keep)
    self._prompts = [np.asarray(ids[i], np.int32) for i in keep]
    self._row_of_uid = {e.uid: i for i, e in enumerate(self.examples)}
    if drop_remainder and len(self.examples) < batch_size:
      raise demos_lib.DataError(f"batch_size {batch_size}: only {len(self.examples)} examples fit max_prompt_len "
                       f"{max_prompt_len}; a training loader needs at least one full batch")
    self._epoch = 0
    self._index = 0
    self._order_cache: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    if self._order_cache is None or self._order_cache[0] != epoch:
      n = len(self.examples)
      order = np.arange(n) if self.seed is None else np.random.default_rng((self.seed, epoch)).permutation(n)
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def state(self) -> dict:
    return {"epoch": self._epoch, "index": self._index}

  def restore(self, state: dict) -> None:
    for key in ("epoch", "index"):
      if not isinstance(state.get(key), int) or state[key] < 0:
        raise ValueError(f"loader state {key}: expected a non-negative int, got {state.get(key)!r}")
    if state["index"] > len(self.examples):
      raise ValueError(f"loader state index: {state['index']} is past the {len(self.examples)} examples")
    self._epoch, self._index = state["epoch"], state["index"]

  def __iter__(self) -> PromptLoader:
    return self

  def __next__(self) -> PromptBatch:
    n = len(self.examples)
    if self.drop_remainder and self._index + self.batch_size > n:
      self._epoch, self._index = self._epoch + 1, 0
    if self._index >= n:
      raise StopIteration
    rows = self._order(self._epoch)[self._index:self._index + self.batch_size]
    self._index += len(rows)
    return self._batch(rows)

  def prompts(self, uids: Sequence[int]) -> PromptBatch:
    """The batch of the examples with these uids, in this order (a method's replay of earlier prompts)."""
    missing = [u for u in uids if u not in self._row_of_uid]
    if missing or not len(uids):
      raise ValueError(f"uids {_listed(missing)}: not among this loader's examples" if missing else "no uids given")
    return self._batch(np.asarray([self._row_of_uid[u] for u in uids]))

  def _demo_ids(self, examples: Sequence[Example]) -> list[list[np.ndarray]]:
    """Per example, demos #0 and #1 in the loader's form, tokenised alone, truncated to max_response_len - 1, EOS
    appended."""
    texts = [demos_lib.demo_text(d, self.demo_form) for e in examples for d in e.demos[:2]]
    ids = iter(self._tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
    out = []
    for e in examples:
      # The official code truncates each hint to 8192 tokens before appending EOS, then truncates the assembled
      # response to 8192 again, which cuts that EOS from a full-length demo. Truncating to L - 1 first keeps it, so
      # the full expert response always ends in EOS.
      pair = [np.asarray(next(ids)[:self.max_response_len - 1] + [self.eos_id], np.int32) for _ in e.demos[:2]]
      out.append(pair + [np.zeros(0, np.int32)] * (2 - len(pair)))
    return out

  def _batch(self, rows: np.ndarray) -> PromptBatch:
    examples = [self.examples[i] for i in rows]
    prompts = [self._prompts[i] for i in rows]
    demos = self._demo_ids(examples)
    g = len(examples)
    p = bucket(max(len(x) for x in prompts), cap=self.max_prompt_len)
    ld = bucket(max(len(d) for pair in demos for d in pair), cap=self.max_response_len)
    prompt_ids = np.full((g, p), self.pad_id, np.int32)
    demo_ids = np.full((g, 2, ld), self.pad_id, np.int32)
    for i, (prompt, pair) in enumerate(zip(prompts, demos)):
      prompt_ids[i, :len(prompt)] = prompt
      for j, demo in enumerate(pair):
        demo_ids[i, j, :len(demo)] = demo
    return PromptBatch(
        uids=np.array([e.uid for e in examples], np.int64),
        prompt_ids=prompt_ids,
        prompt_lens=np.array([len(x) for x in prompts], np.int32),
        demo_ids=demo_ids,
        demo_lens=np.array([[len(d) for d in pair] for pair in demos], np.int32),
        answers=[e.answer for e in examples],
        problems=[e.problem for e in examples])
