"""Benchmark metrics: avg@n and the unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code")."""

from __future__ import annotations

import math
from typing import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
  """P(at least one of k samples drawn without replacement from n, c of them correct, is correct).

  = 1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the
  (huge) binomial coefficients.
  """
  if not 0 <= c <= n:
    raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
  if not 1 <= k <= n:
    raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
  if n - c < k:
    return 1.0
  return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _check_scores(correct_per_problem: Sequence[Sequence[float]]) -> None:
  if not correct_per_problem:
    raise ValueError("no problems given")
  for p, samples in enumerate(correct_per_problem):
    if not samples:
      raise ValueError(f"problem {p} has no samples")
    for s, score in enumerate(samples):
      if score not in (0, 1):
        raise ValueError(f"problem {p}, sample {s}: score {score!r} is not 0 or 1")


def avg_at_n(correct: Sequence[Sequence[float]]) -> float:
  """Mean 0/1 score over all samples of all problems (`[P][n]`; avg@32 for AIME, accuracy for n = 1)."""
  _check_scores(correct)
  return sum(sum(samples) for samples in correct) / sum(len(samples) for samples in correct)


def pass_at_k_table(correct_per_problem: Sequence[Sequence[float]],
                    ks: Sequence[int] | None = None) -> dict[int, float]:
  """{k: mean over problems of pass@k} for `[P][n]` 0/1 scores; ks defaults to 1, 2, 4, ... <= n.

  Every problem must have the same number of samples n.
  """
  _check_scores(correct_per_problem)
  n = len(correct_per_problem[0])
  for p, samples in enumerate(correct_per_problem):
    if len(samples) != n:
      raise ValueError(f"problem {p} has {len(samples)} samples, problem 0 has {n}: all must have the same n")
  if ks is None:
    ks = [2**i for i in range(n.bit_length())]
  counts = [int(sum(samples)) for samples in correct_per_problem]
  return {k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks}
