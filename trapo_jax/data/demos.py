"""Expert-demonstration data: problems, reference answers and ≥2 DeepSeek-R1 solutions each (docs/algorithm.md).

`Demos` is a TFDS builder over a local parquet or jsonl file, or a directory of them, in one of two layouts
(detected per file):
- TRAPO/verl: `prompt` (chat messages, the last user message is the problem; or a plain string),
  `reward_model.ground_truth`, `extra_info.answer_list` (the R1 solutions), optional `extra_info.uuid`;
- OpenR1-Math: `problem`, `answer`, `generations` (the R1 solutions), optional `correctness_math_verify` (only the
  generations it marks correct are kept), optional `uuid`.

Solutions are stored whole; a method takes the part it trains on (`demo_text`) when batches are built. A row's `uid`
is its index in the source (rows numbered across files in name order for a directory): unique per prompt, so GRPO
groups never merge. Rows that cannot be used (a missing field, too few solutions, a line that is not JSON or not
UTF-8) are skipped and reported together in one warning per build; a source without a usable row, or a file that
cannot be read at all, is a `DataError` naming the file (and the row, where there is one).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import json
import re
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from trapo_jax import errors
from trapo_jax import paths

SPLIT = "train"
MIN_SOLUTIONS = 2  # demo #0 gives the partial prefixes, demo #1 the full expert sample (docs/algorithm.md#trapo)
SUFFIXES = (".parquet", ".jsonl")
LAYOUTS = {
    "TRAPO/verl": ("prompt", "reward_model.ground_truth", "extra_info.answer_list"),
    "OpenR1-Math": ("problem", "answer", "generations"),
}
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_MAX_LISTED_IDS = 20


class DataError(errors.UserError, ValueError):
  """The demonstration data cannot be used; the message names the file (and the row, where there is one)."""


class DataNotFound(errors.UserError, FileNotFoundError):
  """The demonstration path does not exist or holds no data file."""


class LayoutError(DataError):
  """A source file has neither layout; the message names the file and the missing field."""


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder):
  """A generator builder that writes array_record files, read with `as_data_source` (no TensorFlow needed)."""

  def __init__(self, **kwargs: Any):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS locates a packaged builder through `importlib_resources`, which is not a dependency here; the module file
    # is the same path (TFDS only looks next to it for an optional checksums file).
    return epath.Path(inspect.getfile(cls))


def extract_thought(solution: str) -> str:
  """The reasoning of an R1 solution: the text inside `<think>…</think>`, stripped; what follows `</think>` is dropped.

  Without a match the whole string is used, as in the official code; beyond it, an unclosed leading `<think>` and an
  unopened `</think>` are tolerated (truncated or tag-less generations).
  """
  match = _THINK.search(solution)
  if match:
    return match.group(1).strip()
  return solution.split("</think>", 1)[0].strip().removeprefix("<think>").strip()


DEMO_FORMS = ("thought", "response", "response_after_think")
_THINK_OPEN = "<think>\n"


def demo_text(solution: str, form: str) -> str:
  """The text of a demonstration that a method's rows hold (docs/algorithm.md, "Demonstrations").

  thought: `extract_thought` (TRAPO's prefixes and full expert sample); response: the whole solution, thought and
  what follows it (LUFFY's target); response_after_think: the same without a leading "<think>\n" (the SFT target,
  and LUFFY's when the prompt already opens the thought).
  """
  if form == "thought":
    return extract_thought(solution)
  if form == "response":
    return solution
  if form == "response_after_think":
    return solution.removeprefix(_THINK_OPEN)
  raise ValueError(f"demonstration form {form!r} is unknown (known: {', '.join(DEMO_FORMS)})")


def source_files(path: str) -> list[str]:
  """The parquet/jsonl files of `path` (a file, or a directory read in name order; local or gs://)."""
  if paths.isdir(path):
    files = [paths.join(path, n) for n in paths.listdir(path) if n.endswith(SUFFIXES)]
    if not files:
      raise DataNotFound(f"{path}: directory has no {' or '.join(SUFFIXES)} files")
    return files
  if not paths.isfile(path):
    raise DataNotFound(f"{path}: demonstration data not found")
  if not path.endswith(SUFFIXES):
    raise DataError(f"{path}: expected a {' or '.join(SUFFIXES)} file")
  return [path]


def config_name(path: str) -> str:
  """A TFDS config name that changes when `path` or any of its files changes, so two sources never share data."""
  path = paths.absolute(path)
  digest = hashlib.sha256(path.encode())
  for f in source_files(path):
    size, version = paths.signature(f)  # locally the mtime, on GCS the object's generation
    digest.update(f"\0{f}\0{size}\0{version}".encode())
  stem = re.sub(r"[^a-z0-9]+", "_", paths.basename(path).lower()).strip("_")[:40]
  return f"{stem}_{digest.hexdigest()[:16]}"


class _BadRow(Exception):
  """A row that cannot be used; `args[0]` is the reason it is reported under."""


def _field(row: dict, dotted: str) -> Any:
  value: Any = row
  for key in dotted.split("."):
    if value is None:
      return None
    if not isinstance(value, dict):
      raise _BadRow("wrong type")
    value = value.get(key)
  return value


def _has_field(tree: dict, dotted: str) -> bool:
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def _detect_layout(path: str, tree: dict) -> str:
  """The layout whose fields `tree` (nested field names) has; LayoutError names the first missing field."""
  layout = "TRAPO/verl" if "prompt" in tree else "OpenR1-Math" if "problem" in tree else None
  if layout is None:
    raise LayoutError(f"{path}: missing field 'prompt' (TRAPO/verl layout) or 'problem' (OpenR1-Math layout); "
                      f"fields: {sorted(tree)}")
  for name in LAYOUTS[layout]:
    if not _has_field(tree, name):
      raise LayoutError(f"{path}: missing field {name!r} of the {layout} layout")
  return layout


def _schema_tree(fields) -> dict:
  return {f.name: _schema_tree(f.type) if pa.types.is_struct(f.type) else None for f in fields}


def _row_tree(row: dict) -> dict:
  return {k: _row_tree(v) if isinstance(v, dict) else None for k, v in row.items()}


def _last_user_message(prompt: Any) -> Any:
  if isinstance(prompt, str):
    return prompt
  if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
    raise _BadRow("wrong type")
  users = [m.get("content") for m in prompt if m.get("role") == "user"]
  return users[-1] if users else None


def _text(value: Any, missing: str) -> str:
  if value is None or (isinstance(value, str) and not value.strip()):
    raise _BadRow(missing)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)  # a numeric ground truth written as a number
  if not isinstance(value, str):
    raise _BadRow("wrong type")
  return value


def _solutions(value: Any, correct: Any) -> list[str]:
  if value is None:
    value = []
  if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
    raise _BadRow("wrong type")
  if correct is not None:
    if not isinstance(correct, list) or len(correct) != len(value) or not all(isinstance(c, bool) for c in correct):
      raise _BadRow("wrong type")
    value = [s for s, ok in zip(value, correct) if ok]
  if len(value) < MIN_SOLUTIONS:
    raise _BadRow(f"fewer than {MIN_SOLUTIONS} solutions")
  if not all(extract_thought(s) for s in value):
    raise _BadRow("empty solution")
  return list(value)


def _source_id(value: Any) -> str:
  return "" if value is None else str(value)


def parse_row(row: Any, layout: str) -> dict:
  """The record of one source row (without `uid`); raises _BadRow with the reason it cannot be used."""
  if not isinstance(row, dict):
    raise _BadRow("wrong type")
  if layout == "TRAPO/verl":
    problem = _last_user_message(row.get("prompt"))
    answer = _field(row, "reward_model.ground_truth")
    solutions, correct = _field(row, "extra_info.answer_list"), None
    source_id = _field(row, "extra_info.uuid")
  else:
    problem, answer = row.get("problem"), row.get("answer")
    solutions, correct = row.get("generations"), row.get("correctness_math_verify")
    source_id = row.get("uuid")
  return dict(source_id=_source_id(source_id), problem=_text(problem, "missing problem"),
              answer=_text(answer, "missing answer"), demos=_solutions(solutions, correct))


def _jsonl_rows(path: str) -> Iterator[tuple[str | None, Any]]:
  """(layout, row) for each non-blank line of a jsonl file; the row is a `_BadRow` for a line that is not UTF-8 or
  not JSON.

  The first object decides the layout of the file.
  """
  layout = None
  with paths.open(path, "rb") as f:
    for raw in f:
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        yield None, _BadRow("not UTF-8")
        continue
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        yield None, _BadRow("unparsable")
        continue
      if layout is None and isinstance(row, dict):
        layout = _detect_layout(path, _row_tree(row))
      yield layout, row


def _parquet_rows(path: str) -> Iterator[tuple[str, Any]]:
  """(layout, row) for each row of a parquet file; the schema decides the layout. A file or row group that cannot be
  read is a DataError naming the file (and the first row of the unreadable batch)."""
  try:
    file = pq.ParquetFile(paths.local_copy(path))
  except (pa.ArrowException, OSError) as e:
    raise DataError(f"{path}: not a readable parquet file ({_first_line(e)})") from e
  layout = _detect_layout(path, _schema_tree(file.schema_arrow))
  batches, row = file.iter_batches(batch_size=256), 0
  while True:
    try:
      batch = next(batches, None)
    except (pa.ArrowException, OSError) as e:
      raise DataError(f"{path}: rows from {row} on cannot be read ({_first_line(e)})") from e
    if batch is None:
      return
    for record in batch.to_pylist():
      yield layout, record
    row += batch.num_rows


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def read_demonstrations(path: str) -> Iterator[tuple[int, dict]]:
  """(uid, record) for every usable row of `path`; one warning lists the skipped rows by uid and reason."""
  files = source_files(path)
  skipped: dict[str, list[int]] = collections.defaultdict(list)
  uid = 0
  ranges = []
  for file in files:
    first = uid
    rows = _parquet_rows(file) if file.endswith(".parquet") else _jsonl_rows(file)
    for layout, row in rows:
      try:
        if isinstance(row, _BadRow):
          raise row
        record = parse_row(row, layout)
      except _BadRow as bad:
        skipped[bad.args[0]].append(uid)
      else:
        yield uid, dict(uid=uid, **record)
      uid += 1
    ranges.append(f"{paths.basename(file)} {first}-{uid - 1}")
  ranges = ranges if len(files) > 1 else []
  usable = uid - sum(len(ids) for ids in skipped.values())
  if not usable:
    reasons = _reasons(skipped, ranges) if skipped else "it has no rows"
    raise DataError(f"0 of {uid} rows usable in {path}: {reasons}")
  if skipped:
    logging.warning("%s", f"skipped {uid - usable} of {uid} rows of {path}: {_reasons(skipped, ranges)}")


def _reasons(skipped: dict[str, list[int]], ranges: list[str]) -> str:
  """`reason: [row ids]; ...`, the first ids of each reason (and how rows are numbered across files)."""
  def listed(ids: list[int]) -> str:
    more = len(ids) - _MAX_LISTED_IDS
    return str(ids[:_MAX_LISTED_IDS]) + (f" (+{more} more)" if more > 0 else "")
  text = "; ".join(f"{r}: {listed(ids)}" for r, ids in skipped.items())
  if ranges:
    text += f" (rows numbered across files: {', '.join(ranges)})"
  return text


@dataclasses.dataclass
class DemosConfig(tfds.core.BuilderConfig):
  path: str = ""


def demos_config(path: str) -> DemosConfig:
  return DemosConfig(name=config_name(path), path=paths.absolute(path), description=f"demonstrations of {path}")


class Demos(ArrayRecordBuilder):
  """Problems with ≥2 expert solutions from a local parquet/jsonl source; one split, "train"."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "TRAPO/verl and OpenR1-Math layouts; thoughts extracted from <think> tags.",
                   "2.0.0": "Whole solutions stored (thought and answer); the thought is taken when batches are built."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "uid": tfds.features.Scalar(dtype=np.int64),
        "source_id": tfds.features.Text(),
        "problem": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "demos": tfds.features.Sequence(tfds.features.Text()),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager  # the source is local
    return {SPLIT: self._generate_examples(self.builder_config.path)}

  def _generate_examples(self, path: str):
    yield from read_demonstrations(path)


def demos_builder(path: str, *, data_dir: str) -> Demos:
  """The builder of the demonstrations at `path`, prepared under `data_dir` (DataNotFound names a missing path)."""
  return Demos(config=demos_config(path), data_dir=data_dir)
