"""The evaluation benchmarks shipped in `trapo_jax/data/benchmarks/` (origin and protocol: its README.md)."""

from __future__ import annotations

import importlib.resources
import json
import os

BENCHMARKS: dict[str, str] = {
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "amc": "amc.jsonl",
    "math500": "math500.jsonl",
    "minerva": "minerva.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
}
FIELDS = ("id", "source", "problem", "answer")


def load_jsonl(path: str | os.PathLike[str]) -> list[dict]:
  """Rows of a benchmark file: one JSON object a line with string fields `FIELDS`."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {line_number}: not valid JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(row).__name__}")
      for field in FIELDS:
        if not isinstance(row.get(field), str):
          raise ValueError(f"{path}, line {line_number}: field {field!r} missing or not a string")
      rows.append(row)
  return rows


def load_benchmark(name: str) -> list[dict]:
  """Rows (`id`, `source`, `problem`, `answer`) of the shipped benchmark `name` (a key of `BENCHMARKS`)."""
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
  resource = importlib.resources.files("trapo_jax.data").joinpath("benchmarks", BENCHMARKS[name])
  with importlib.resources.as_file(resource) as path:
    return load_jsonl(path)
