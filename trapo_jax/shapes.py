"""Padded shapes: every variable length is rounded up to a bucket, so a run compiles a handful of programs."""

from __future__ import annotations


def bucket(n: int, minimum: int = 16, cap: int | None = None) -> int:
  """The next power of two >= n (at least `minimum`, at most `cap`): few distinct shapes, few compiles."""
  b = max(minimum, 1 << max(0, int(n) - 1).bit_length())
  return min(b, cap) if cap is not None else b
