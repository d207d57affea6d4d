r"""Checks the grader against every shipped benchmark answer.

  python -m benchmarks.grade_benchmarks [--workers=2] [--timeout_s=10]

For each row: its own answer in a `\boxed{}` must grade 1.0 (self check), and the answer of the next row with a
different answer string must grade 0.0 (cross check). Prints the per-benchmark rates, every row that fails either
check (row id and answers) and the grading time.
"""

from __future__ import annotations

import time

from absl import app, flags

from trapo_jax.data.benchmark_files import BENCHMARKS, load_benchmark
from trapo_jax.rewards import grader

_WORKERS = flags.DEFINE_integer("workers", 2, "Grading processes.")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 10.0, "Wall-clock limit per graded item.")


def boxed_response(answer: str) -> str:
  return "So the final answer is \\boxed{" + answer + "}."


def next_different(answers: list[str], i: int) -> int | None:
  """Index of the first row after i (cyclically) whose answer string differs from row i's."""
  for step in range(1, len(answers)):
    j = (i + step) % len(answers)
    if answers[j] != answers[i]:
      return j
  return None


def check_benchmark(rows: list[dict], workers: int,
                    timeout_s: float) -> tuple[list[float], list[tuple[int, int, float]]]:
  """Self scores `[N]`, and (row, other row, score) of the cross check for rows with a differently answered row."""
  answers = [row["answer"] for row in rows]
  pairs = [(i, j) for i in range(len(rows)) if (j := next_different(answers, i)) is not None]
  responses = [boxed_response(a) for a in answers] + [boxed_response(answers[j]) for _, j in pairs]
  references = answers + [answers[i] for i, _ in pairs]
  scores = grader.grade_batch(responses, references, timeout_s=timeout_s, workers=workers)
  return scores[:len(rows)], [(i, j, score) for (i, j), score in zip(pairs, scores[len(rows):])]


def main(argv: list[str]) -> None:
  del argv
  exceptions = []
  start = time.monotonic()
  print(f"{'benchmark':<14} {'rows':>5} {'self=1':>8} {'cross=0':>8} {'timeouts':>9}")
  for name in BENCHMARKS:
    rows = load_benchmark(name)
    self_scores, cross = check_benchmark(rows, _WORKERS.value, _TIMEOUT_S.value)
    timeouts = grader.last_stats().timeouts
    self_rate = sum(self_scores) / len(rows)
    cross_rate = sum(score == 0.0 for _, _, score in cross) / len(cross)
    print(f"{name:<14} {len(rows):>5} {self_rate:>8.2%} {cross_rate:>8.2%} {timeouts:>9}")
    for row, score in zip(rows, self_scores):
      if score != 1.0:
        exceptions.append(f"self  {row['id']}: answer {row['answer']!r} does not grade as itself")
    for i, j, score in cross:
      if score != 0.0:
        exceptions.append(f"cross {rows[i]['id']}: answer {rows[i]['answer']!r} accepts "
                          f"{rows[j]['id']}'s {rows[j]['answer']!r}")
  print(f"graded in {time.monotonic() - start:.1f} s with {_WORKERS.value} workers")
  print(f"{len(exceptions)} exceptions" + (":" if exceptions else ""))
  for line in exceptions:
    print("  " + line)


if __name__ == "__main__":
  app.run(main)
