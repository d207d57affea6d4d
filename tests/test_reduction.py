"""Metrics that carry their reduction (trapo_jax/reduction.py): the step's metrics over 2 micro-batches and over
updates against float64 numpy computed on the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default
from trapo_jax import algorithms
from trapo_jax import losses
from trapo_jax import reduction
from trapo_jax.train import step as step_lib

M, MB, L, V = 2, 4, 6, 5  # micro-batches, rows each, response tokens, vocabulary


def _standin_logprobs(params, model_cfg, mb, chunk_size, temperature=1.0):
  """The stand-in model: log-probs log_softmax(theta) at each response token, whatever the row or position."""
  del model_cfg, chunk_size
  logp_all = jax.nn.log_softmax(params["theta"] / temperature)
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all)
  return logp_all[mb["resp_tokens"]], jnp.full(mb["resp_tokens"].shape, entropy)


def _batch(seed: int) -> dict[str, np.ndarray]:
  """[M, MB, ...]: the two micro-batches hold different numbers of imitated and own tokens."""
  rng = np.random.default_rng(seed)
  lens = rng.integers(1, L + 1, (M, MB))
  response = np.arange(L)[None, None] < lens[..., None]
  prefix = np.zeros((M, MB, L), bool)
  prefix[0, :3, :2] = True  # micro-batch 0: 6 expert tokens
  prefix[1, :1, :4] = True  # micro-batch 1: up to 4
  return dict(resp_tokens=rng.integers(0, V, (M, MB, L)).astype(np.int32), prefix_mask=prefix & response,
              off_loss_mask=prefix & response, response_mask=response,
              advantages=rng.normal(size=(M, MB)).astype(np.float32), rewards=np.zeros((M, MB), np.float32),
              kind=np.where(prefix.any(-1), losses.ROW_GUIDED, losses.ROW_OWN).astype(np.int32),
              sampler_logp=np.where(response, rng.normal(-1.5, 0.5, (M, MB, L)), 0.0).astype(np.float32))


def test_metrics_over_two_micro_batches_are_those_of_the_whole_batch(monkeypatch):
  """Token means weighted by their tokens (not the mean of the micro-batches' means), sums, maxima and means of the
  micro-batches' values, as numpy computes them on the batch."""
  monkeypatch.setattr(step_lib, "response_logprobs", _standin_logprobs)
  cfg = default.get_config()
  objective = algorithms.from_config(cfg).phase_at(cfg, 0).objective
  alpha = objective.threshold
  assert alpha is not None  # TRAPO's TrSFT term declares it
  theta = np.random.default_rng(1).normal(0, 1.5, V)
  batch = _batch(seed=2)
  _, metrics = jax.jit(lambda b: step_lib.accumulate_gradients(
      {"theta": jnp.asarray(theta, jnp.float32)}, b, objective.weights_at(0), model_cfg=None, objective=objective,
      chunk_size=1, temperature=1.0))({k: jnp.asarray(v) for k, v in batch.items()})
  assert {m.reduce for m in metrics.values()} == set(reduction.REDUCTIONS)
  got = reduction.values(metrics)

  logp_all = theta - np.log(np.exp(theta).sum())
  logp = logp_all[batch["resp_tokens"]]
  p = np.exp(logp)
  resp, prefix = batch["response_mask"], batch["prefix_mask"]
  imitated, own = resp & prefix & batch["off_loss_mask"], resp & ~prefix
  gap = np.abs(logp - batch["sampler_logp"])
  entropy = -(np.exp(logp_all) * logp_all).sum()
  want = {
      "expert_prob": p[imitated].mean(), "own_prob": p[own].mean(),
      "expert_frac_below_alpha": (p[imitated] < alpha).mean(), "mismatch/abs_logp_mean": gap[own].mean(),
      "num_prefix_tokens": imitated.sum(), "num_own_tokens": own.sum(), "mismatch/abs_logp_max": gap[own].max(),
      # A loss value counts once per micro-batch: each micro-batch's token mean, then their mean.
      "entropy": entropy, "loss/entropy": entropy,
  }
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
  # What the check tells apart: the micro-batches' own means, averaged, are not the batch's token mean.
  per_micro = [p[i][imitated[i]].mean() for i in range(M)]
  assert abs(np.mean(per_micro) - want["expert_prob"]) > 1e-3


def test_fold_finish_and_updates_against_numpy():
  """reduction.fold / finish over 2 micro-batches as the step scans them, then over_updates, against numpy: a token
  mean without tokens is NaN and left out across updates; sums count one epoch; maxima take every update, whatever
  their sign."""
  rng = np.random.default_rng(0)
  x = rng.normal(-5.0, 1.0, (2, M, 3, L))  # [updates, micro-batches, rows, tokens]: negative, so a max is not 0
  mask = rng.random((2, M, 3, L)) < 0.4
  mask[1] = False  # the second update has no such tokens
  loss = rng.normal(size=(2, M))

  def measure(xm, mm, lm):
    return {"tm": reduction.token_mean(xm, mm), "count": reduction.total(jnp.sum(mm.astype(jnp.float32))),
            "top": reduction.maximum(jnp.max(jnp.where(mm, xm, -jnp.inf))), "loss": reduction.mean(lm)}

  def update(xu, mu, lu):
    first = measure(xu[0], mu[0], lu[0])
    acc, _ = jax.lax.scan(lambda acc, b: (reduction.fold(acc, measure(*b)), None), reduction.empty(first),
                          (xu, mu, lu))
    return reduction.finish(acc, M)

  per_update = jax.vmap(update)(jnp.asarray(x, jnp.float32), jnp.asarray(mask), jnp.asarray(loss, jnp.float32))
  u0 = reduction.values(jax.tree.map(lambda a: a[0], per_update))
  assert float(u0["tm"]) == pytest.approx(x[0][mask[0]].mean(), rel=1e-6)
  assert float(u0["count"]) == mask[0].sum()
  assert float(u0["top"]) == pytest.approx(x[0][mask[0]].max(), rel=1e-6)
  assert float(u0["loss"]) == pytest.approx(loss[0].mean(), rel=1e-6)
  assert np.isnan(float(per_update["tm"].value[1]))
  # Two updates of one mini-batch each (2 epochs): the count is the first epoch's.
  step = reduction.values(reduction.over_updates(per_update, mini_batches=1))
  assert float(step["tm"]) == pytest.approx(x[0][mask[0]].mean(), rel=1e-6)  # the defined update only
  assert float(step["count"]) == mask[0].sum()
  assert float(step["top"]) == pytest.approx(x[0][mask[0]].max(), rel=1e-6)
  assert float(step["loss"]) == pytest.approx(loss.mean(axis=1).mean(), rel=1e-6)


def test_an_unknown_reduction_names_the_metric():
  m = {"loss/x": reduction.Metric(jnp.ones(()), jnp.ones(()), "median")}
  with pytest.raises(ValueError, match="loss/x"):
    reduction.fold(reduction.empty(m), m)
