"""Tolerances that follow from float32 arithmetic, not from the machine a test last passed on.

CI runs on whatever CPU it is given (Intel or AMD, AVX2 or AVX-512), and XLA sums in an order that depends on it.
So a test compares two computations of the same quantity within the rounding that arithmetic allows, and never
compares what an optimizer's normalisation, an argmax or a sampling draw has already amplified: a near-zero
gradient's last bits become an AdamW update anywhere between 0 and lr, and a near-tie between two logits becomes a
different token and a different sequence after it.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)


def float32_sum_bound(magnitudes, count: int):
  """How far two float32 evaluations of one sum may differ.

  Recursive summation of `count` values in any order rounds within (count - 1) eps times the sum of their magnitudes
  (the standard forward error bound), so two orders differ by at most twice that. `magnitudes`: an array (or a list
  of arrays, summed) standing for the sum of the absolute values added up, elementwise.
  """
  if isinstance(magnitudes, (list, tuple)):
    magnitudes = sum(np.abs(np.asarray(m, np.float64)) for m in magnitudes)
  return 2 * (count - 1) * EPS32 * np.abs(np.asarray(magnitudes, np.float64))


def top2_margin(logits) -> np.ndarray:
  """[..., V] -> [...]: how far the largest logit is above the second."""
  top = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -2:]
  return top[..., 1] - top[..., 0]


def assert_greedy_agrees(tokens, ref_tokens, ref_logits, tol: float, *, forced=None, min_compared: float = 0.5) -> None:
  """Greedy tokens [B, L] against a reference computation's tokens [B, L] and its logits [B, L, V] at each step.

  Two computations whose logits differ by at most `tol` must pick the same token wherever the reference's top-2
  margin exceeds 2 * tol; at the first step where it does not, either choice is right and everything after it may
  differ, so a row is compared up to there. At least `min_compared` of all positions must be compared, so that a
  model full of near-ties cannot pass by comparing nothing. `forced` [B, L] marks given tokens (prefixes): no
  choice is made there.
  """
  tokens, ref_tokens = np.asarray(tokens), np.asarray(ref_tokens)
  assert tokens.shape == ref_tokens.shape, (tokens.shape, ref_tokens.shape)
  ambiguous = top2_margin(ref_logits) <= 2 * tol
  if forced is not None:
    ambiguous &= ~np.asarray(forced, bool)
  compared = 0
  for i in range(tokens.shape[0]):
    stop = int(np.argmax(ambiguous[i])) if ambiguous[i].any() else tokens.shape[1]
    np.testing.assert_array_equal(tokens[i, :stop], ref_tokens[i, :stop], err_msg=f"row {i}, first {stop} steps")
    compared += stop
  assert compared >= min_compared * tokens.size, f"only {compared} of {tokens.size} greedy steps are unambiguous"
