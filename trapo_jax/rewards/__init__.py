"""Rewards: the math answer grader (math-verify with a boxed-answer fallback) and its worker pool."""

from __future__ import annotations

from trapo_jax.rewards.grader import close, grade, grade_batch, last_stats

__all__ = ["close", "grade", "grade_batch", "last_stats"]
