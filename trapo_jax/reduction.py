"""Metrics that carry their reduction: a value, the weight it was measured with, and how a step combines it.

A loss term or the update step measures each metric on one micro-batch; the step folds the micro-batches of an update
(`fold`, then `finish`) and the updates of a step (`over_updates`) by each metric's own tag, never by its name.
Devices need nothing of their own: a micro-batch's value is already over all its rows, wherever they are placed.

  mean        the mean over micro-batches and over updates (a loss value: each micro-batch counts once)
  token_mean  a masked mean over tokens, weighted by its tokens across micro-batches, so the update reports the mean
              over all of them (NaN where it has none: expert tokens under GRPO); across updates the mean of the
              defined ones
  sum         a total over the micro-batches of one update, and over the updates of one epoch (a token count)
  max         the largest over micro-batches and updates
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

MEAN, TOKEN_MEAN, SUM, MAX = "mean", "token_mean", "sum", "max"
REDUCTIONS = (MEAN, TOKEN_MEAN, SUM, MAX)


@flax.struct.dataclass
class Metric:
  """One measurement: value [] (float32), weight [] (the tokens a token mean is over; 1 otherwise) and the
  reduction, a REDUCTIONS tag. A pytree whose leaves are value and weight, so it scans and stacks like an array."""
  value: jax.Array
  weight: jax.Array
  reduce: str = flax.struct.field(pytree_node=False, default=MEAN)


def mean(value: jax.Array) -> Metric:
  return Metric(value, jnp.ones((), jnp.float32), MEAN)


def total(value: jax.Array) -> Metric:
  return Metric(value, jnp.ones((), jnp.float32), SUM)


def maximum(value: jax.Array) -> Metric:
  return Metric(value, jnp.ones((), jnp.float32), MAX)


def token_mean(x: jax.Array, mask: jax.Array) -> Metric:
  """x, mask [B, T] -> the mean of x over the masked tokens (0 without any), weighted by their number."""
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask)
  return Metric(jnp.sum(x * mask) / jnp.maximum(count, 1.0), count, TOKEN_MEAN)


def weighted(value: jax.Array, tokens: jax.Array) -> Metric:
  """A token mean already computed: `value` over `tokens` tokens."""
  return Metric(value, jnp.asarray(tokens, jnp.float32), TOKEN_MEAN)


def empty(metrics: dict[str, Metric]) -> dict[str, Metric]:
  """The accumulation of no micro-batch for metrics like these (arrays or shapes): -inf for maxima, else 0."""
  return {k: Metric(jnp.full(m.value.shape, -jnp.inf if m.reduce == MAX else 0.0, jnp.float32),
                    jnp.zeros(m.weight.shape, jnp.float32), m.reduce) for k, m in metrics.items()}


def fold(acc: dict[str, Metric], metrics: dict[str, Metric]) -> dict[str, Metric]:
  """One micro-batch's metrics into the running accumulation: token means add value x weight and their weights,
  maxima keep the larger value, the others add their values (and weights, the micro-batches counted)."""
  out = {}
  for k, m in metrics.items():
    a = acc[k]
    if m.reduce == TOKEN_MEAN:
      out[k] = Metric(a.value + m.value * m.weight, a.weight + m.weight, m.reduce)
    elif m.reduce == MAX:
      out[k] = Metric(jnp.maximum(a.value, m.value), a.weight + m.weight, m.reduce)
    elif m.reduce in (MEAN, SUM):
      out[k] = Metric(a.value + m.value, a.weight + m.weight, m.reduce)
    else:
      raise ValueError(f"metric {k!r}: reduction {m.reduce!r} is unknown (known: {', '.join(REDUCTIONS)})")
  return out


def finish(acc: dict[str, Metric], num_micro: int) -> dict[str, Metric]:
  """An update's accumulation over its `num_micro` micro-batches -> its metrics: token means divided by their tokens
  (NaN without any), means by num_micro, sums and maxima as they are."""
  out = {}
  for k, a in acc.items():
    if a.reduce == TOKEN_MEAN:
      out[k] = Metric(jnp.where(a.weight > 0, a.value / jnp.maximum(a.weight, 1.0), jnp.nan), a.weight, a.reduce)
    elif a.reduce == MEAN:
      # By the static count, not the summed weights: XLA multiplies by a constant's reciprocal, which can round
      # differently from a division by a computed value, and the reported means are those of the constant.
      out[k] = Metric(a.value / num_micro, a.weight, a.reduce)
    else:
      out[k] = a
  return out


def over_updates(per_update: dict[str, Metric], mini_batches: int) -> dict[str, Metric]:
  """Per-update metrics, each leaf [U] (U updates, `mini_batches` per epoch) -> the step's: sums over one epoch
  (every token once), maxima over all updates, token means the mean of the updates where they are defined, means
  the mean."""
  out = {}
  for k, m in per_update.items():
    if m.reduce == SUM:
      value = jnp.sum(m.value[:mini_batches])
    elif m.reduce == MAX:
      value = jnp.max(m.value)
    elif m.reduce == TOKEN_MEAN:
      value = jnp.nanmean(m.value)
    else:
      value = jnp.mean(m.value)
    out[k] = Metric(value, jnp.sum(m.weight[:mini_batches]), m.reduce)
  return out


def values(metrics: dict[str, Metric]) -> dict[str, jax.Array]:
  """The numbers a step reports."""
  return {k: m.value for k, m in metrics.items()}
