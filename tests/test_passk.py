"""pass@k and avg@n against brute-force enumeration of all k-subsets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from trapo_jax.eval.metrics import avg_at_n, pass_at_k, pass_at_k_table


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
  """Fraction of all k-subsets of n samples (the first c correct) that contain a correct one."""
  correct = np.arange(n) < c
  subsets = np.array(list(itertools.combinations(range(n), k)))
  return float(np.mean(correct[subsets].any(axis=1)))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_enumeration(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      np.testing.assert_allclose(pass_at_k(n, c, k), brute_force_pass_at_k(n, c, k), rtol=1e-12, atol=1e-15)


def test_edge_cases():
  assert pass_at_k(8, 0, 1) == 0.0
  assert pass_at_k(8, 0, 8) == 0.0
  assert pass_at_k(8, 8, 1) == 1.0
  assert pass_at_k(8, 1, 8) == 1.0  # k = n: every draw holds the one correct sample
  assert pass_at_k(8, 7, 2) == 1.0
  np.testing.assert_allclose(pass_at_k(8, 3, 1), 3 / 8, rtol=1e-15)


def test_large_n_is_stable():
  # Binomials of this size overflow float64; the exact value comes from Python integers.
  n, c, k = 2000, 7, 500
  exact = 1 - math.comb(n - c, k) / math.comb(n, k)
  np.testing.assert_allclose(pass_at_k(n, c, k), exact, rtol=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
  with pytest.raises(ValueError):
    pass_at_k(n, c, k)


def test_avg_at_n_is_mean_over_all_samples():
  rng = np.random.default_rng(0)
  scores = (rng.random((7, 32)) < 0.3).astype(np.float64)
  np.testing.assert_allclose(avg_at_n(scores.tolist()), scores.mean(), rtol=1e-15)
  assert avg_at_n([[1.0]]) == 1.0


def test_pass_at_k_table():
  rng = np.random.default_rng(1)
  scores = (rng.random((5, 8)) < 0.4).astype(np.float64)
  table = pass_at_k_table(scores.tolist())
  assert list(table) == [1, 2, 4, 8]
  for k, value in table.items():
    expected = np.mean([brute_force_pass_at_k(8, int(row.sum()), k) for row in scores])
    np.testing.assert_allclose(value, expected, rtol=1e-12)
  np.testing.assert_allclose(table[1], scores.mean(), rtol=1e-12)  # pass@1 is avg@n
  assert list(pass_at_k_table([[1, 0, 0, 1, 1, 0]])) == [1, 2, 4]
  assert list(pass_at_k_table([[1, 0, 0]], ks=[3])) == [3]


def test_pass_at_k_table_rejects_bad_input():
  with pytest.raises(ValueError, match="problem 2 has 3 samples"):
    pass_at_k_table([[1, 0], [0, 0], [1, 1, 1]])
  with pytest.raises(ValueError, match="problem 1, sample 0"):
    pass_at_k_table([[1, 0], [0.5, 0]])
  with pytest.raises(ValueError, match="k <= n"):
    pass_at_k_table([[1, 0]], ks=[4])
  with pytest.raises(ValueError, match="no problems"):
    avg_at_n([])
