"""Accumulation as a method declares it (docs/algorithm.md#accumulation): HPT, SRFT and ReLIFT sum the losses of a
mini-batch's K micro-batches and take two AdamW steps per batch, as their verl-0.2 actors; the parameters after the
trainer's update are checked against an independent float64 numpy reference of that accumulation.

The model is a position-wise logit table theta [L, V] (response_logprobs replaced), so the reference computes the
official per-micro-batch losses in numpy and their gradients by central differences, without any of the project's
loss or step code. AdamW runs with eps = 1 on both sides: then its update is a smooth function of the gradients
(m_hat / (sqrt(v_hat) + 1) changes by at most 2 |dg| in the first two steps: m_hat's weights on the gradients are
at most 1, the denominator is at least 1 and moves by at most |dg|), so the float32 rounding of the gradient reaches
the parameters at most doubled and times lr, instead of being amplified to up to lr where a gradient is near 0
(tests/numerics.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default
from tests import numerics
from trapo_jax import algorithms
from trapo_jax import losses
from trapo_jax.train import programs
from trapo_jax.train import state as state_lib
from trapo_jax.train import step as step_lib

L, V = 6, 5  # response width (= data.max_response_len, the official L_max), vocabulary
K, MINI, MB = 2, 2, 4  # micro-batches per mini-batch, mini-batches, rows per micro-batch
LR, ENTROPY_COEF, TEMPERATURE = 0.05, 0.05, 0.7


def _toy_logprobs(params, model_cfg, mb, chunk_size, temperature=1.0):
  """The stand-in model: logits theta[t] at response position t, whatever the row."""
  del model_cfg, chunk_size
  logp_all = jax.nn.log_softmax(params["theta"] / temperature, axis=-1)  # [L, V]
  rows = mb["resp_tokens"].shape[0]
  logp = jnp.take_along_axis(jnp.broadcast_to(logp_all, (rows, L, V)), mb["resp_tokens"][..., None], -1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, jnp.broadcast_to(entropy, (rows, L))


def _config(name: str):
  cfg = default.get_config()
  cfg.algo = name
  cfg.data.max_response_len = L
  cfg.rollout.temperature = TEMPERATURE
  cfg.loss.entropy_coef = ENTROPY_COEF  # larger than the official 0.001, so the entropy's accumulation shows
  cfg.loss.seq_scale = float(MB)  # one GPU holding the micro-batch: the official sum / L_max per micro-batch
  cfg.optim.update(lr=LR, eps=1.0, grad_clip=1e9, weight_decay=0.01)
  cfg[name].micro_batches = K
  cfg[name].mini_batches = MINI
  return cfg


def _rows(name: str, seed: int) -> dict[str, np.ndarray]:
  """K x MINI micro-batches of MB rows as the method's plan makes them: own rollouts and (HPT, SRFT) a
  demonstration row; HPT empties the other rows of a gated prompt. The last micro-batch has no demonstration."""
  rng = np.random.default_rng(seed)
  n = K * MINI * MB
  lens = rng.integers(2, L + 1, n)
  response = np.arange(L)[None] < lens[:, None]
  kind = np.full(n, losses.ROW_OWN, np.int32)
  if name in ("hpt", "srft"):
    kind[0:n - MB:MB] = losses.ROW_DEMO  # the first row of every micro-batch but the last
  if name == "hpt":
    response[1:n - MB:MB] = False  # a gated prompt's emptied row
  demo = kind == losses.ROW_DEMO
  rewards = rng.integers(0, 2, n).astype(np.float32)
  rewards[demo] = 1.0
  advantages = rng.normal(0, 1, n).astype(np.float32)
  if name == "hpt":
    advantages[demo] = 0.0  # outside the GRPO group
  prefix = response & demo[:, None]
  rows = dict(seq_tokens=np.zeros((n, 2), np.int32), seq_mask=np.ones((n, 2), bool), resp_start=np.ones(n, np.int32),
              resp_tokens=rng.integers(0, V, (n, L)).astype(np.int32), prefix_mask=prefix, off_loss_mask=prefix,
              response_mask=response, advantages=advantages, rewards=rewards, kind=kind)
  return {k: v.reshape(K * MINI, MB, *v.shape[1:]) for k, v in rows.items()}


# ---------------------------------------------------------------------------------------------- float64 reference

def _np_logprobs(theta: np.ndarray, tokens: np.ndarray):
  z = theta / TEMPERATURE
  z = z - z.max(-1, keepdims=True)
  logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
  entropy = -(np.exp(logp_all) * logp_all).sum(-1)
  return logp_all[np.arange(L)[None], tokens], np.broadcast_to(entropy, tokens.shape)


def _token_mean(x, mask):
  return float(np.where(mask, x, 0.0).sum() / max(mask.sum(), 1))


def _official_micro_loss(name: str, theta: np.ndarray, mb: dict, old_logp: np.ndarray, theta_sg: np.ndarray) -> float:
  """One micro-batch's loss as the official actor back-propagates it (mix_actor.py / ReLIFT's actor.py): the policy
  terms summed over tokens / L_max, the SFT and entropy terms token means over the micro-batch. theta_sg: the
  parameters of the detached quantities (SRFT's row entropies), held where the gradient is taken."""
  logp, entropy = _np_logprobs(theta, mb["resp_tokens"])
  resp = mb["response_mask"]
  own = resp & ~mb["prefix_mask"]
  demo = resp & (mb["kind"] == losses.ROW_DEMO)[:, None]
  a = mb["advantages"][:, None].astype(np.float64)
  ent = _token_mean(entropy, resp)
  if name in ("hpt", "relift"):
    pg = np.where(own, -a * np.exp(logp - old_logp), 0.0).sum() / L
    sft = _token_mean(-logp, demo) if name == "hpt" else 0.0  # hpt.sft_coef = 1
    return pg + sft - ENTROPY_COEF * ent
  # SRFT (compute_token_on_off_policy_srft_loss, srft_type="paper"): H the row's mean token entropy.
  entropy_sg = _np_logprobs(theta_sg, mb["resp_tokens"])[1]
  h = (np.where(resp, entropy_sg, 0.0).sum(-1) / np.maximum(resp.sum(-1), 1))[:, None]
  sft = 0.5 * _token_mean(-np.exp(-h) * logp, demo)
  p = np.exp(logp)
  off = np.where(demo, -a * p / (p + 0.1), 0.0).sum() / L
  w = np.where((mb["rewards"] == 1.0)[:, None], 0.1 * np.exp(h), -1.0)
  on = np.where(own, -w * logp, 0.0).sum() / L
  return sft + off + on - ENTROPY_COEF * ent


def _fd_grad(f, theta: np.ndarray, h: float = 1e-6) -> np.ndarray:
  g = np.zeros_like(theta)
  for i in np.ndindex(theta.shape):
    e = np.zeros_like(theta)
    e[i] = h
    g[i] = (f(theta + e) - f(theta - e)) / (2 * h)
  return g


def _reference(name: str, theta: np.ndarray, batch: dict, *, micro: str = "sum", mini: int = MINI):
  """The official update in float64: old log-probs before any update; per mini-batch the micro-batch gradients
  summed (or averaged: micro="mean"), then one AdamW step (optax.adamw's form, eps = 1).
  -> (theta after, the gradients [mini] of the updates and their magnitudes)."""
  theta = theta.astype(np.float64)
  old = _np_logprobs(theta, batch["resp_tokens"])[0]
  m, v = np.zeros_like(theta), np.zeros_like(theta)
  per = (K * MINI) // mini
  grads = []
  for t in range(1, mini + 1):
    gs = [_fd_grad(lambda th: _official_micro_loss(name, th, {k: x[j] for k, x in batch.items()}, old[j], theta),
                   theta) for j in range((t - 1) * per, t * per)]
    g = np.sum(gs, 0) / (len(gs) if micro == "mean" else 1)
    grads.append((g, np.sum(np.abs(gs), 0)))
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    u = (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1.0) + 0.01 * theta
    theta = theta - LR * u
  return theta, grads


@pytest.mark.parametrize("name", ["hpt", "srft", "relift"])
def test_update_sums_micro_batches_and_steps_per_mini_batch_as_the_official_actor(name, monkeypatch):
  monkeypatch.setattr(step_lib, "response_logprobs", _toy_logprobs)
  cfg = _config(name)
  phase = algorithms.from_config(cfg).phase_at(cfg, 0)
  updates = programs.updates_of(cfg, phase)
  assert (updates.micro_reduce, updates.micro_batches, updates.mini_batches) == ("sum", K, MINI)
  assert step_lib.layout_rows(K * MINI * MB, 8, 1 << 20, 1, updates.mini_batches, updates.micro_batches) == MB
  batch = _rows(name, seed=3)
  theta0 = np.random.default_rng(0).normal(0, 1, (L, V)).astype(np.float32)
  tx = state_lib.make_optimizer(cfg.optim)
  params = {"theta": jnp.asarray(theta0)}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(0))
  new, metrics = step_lib.train_step(state, {k: jnp.asarray(v) for k, v in batch.items()},
                                     phase.objective.weights_at(0), tx=tx, model_cfg=None, objective=phase.objective,
                                     chunk_size=1, temperature=phase.temperature, updates=updates)
  assert float(metrics["skipped"]) == 0.0
  got = np.asarray(new.params["theta"], np.float64)
  ref, grads = _reference(name, theta0, batch)
  # Each float32 gradient entry is a sum of at most (rows x L x V) token terms bounded by the micro-batches'
  # magnitudes (+1 for the softmax's own terms); AdamW (eps = 1) passes an error of the gradients on at most doubled
  # (module docstring), the first step's error summed with the second's.
  count = K * MINI * MB * L * V
  tol = LR * 2 * sum(numerics.float32_sum_bound(mag + 1.0, count) for _, mag in grads)
  np.testing.assert_allclose(got, ref, rtol=0, atol=float(np.max(tol)))
  # What the check tells apart: averaging the micro-batches, or one update for the whole batch.
  for other in (_reference(name, theta0, batch, micro="mean")[0], _reference(name, theta0, batch, mini=1)[0]):
    assert np.abs(other - ref).max() > 100 * np.max(tol)


def test_global_token_mean_is_the_token_mean_of_the_whole_batch(monkeypatch):
  """loss.aggregation = "global_token_mean" (DAPO in current verl): the step's gradient over micro-batches of unequal
  token counts is that of the policy-gradient sum over the whole batch / its token count (float64, central
  differences); "token_mean" (the mean of the micro-batches' means) is not."""
  monkeypatch.setattr(step_lib, "response_logprobs", _toy_logprobs)
  cfg = _config("grpo")
  cfg.loss.update(aggregation="global_token_mean", entropy_coef=0.0)
  phase = algorithms.from_config(cfg).phase_at(cfg, 0)
  batch = _rows("grpo", seed=5)
  batch["response_mask"][0] = np.arange(L)[None] < np.array([[1], [1], [2], [1]])  # few tokens in micro-batch 0
  theta0 = np.random.default_rng(1).normal(0, 1, (L, V))
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}

  def grads(objective):
    return np.asarray(step_lib.accumulate_gradients(
        {"theta": jnp.asarray(theta0, jnp.float32)}, jbatch, objective.weights_at(0), model_cfg=None,
        objective=objective, chunk_size=1, temperature=TEMPERATURE)[0]["theta"], np.float64)

  resp, a = batch["response_mask"], batch["advantages"][..., None].astype(np.float64)
  old = _np_logprobs(theta0, batch["resp_tokens"])[0]
  pg = lambda th: np.where(resp, -a * np.exp(_np_logprobs(th, batch["resp_tokens"])[0] - old), 0.0)
  ref = _fd_grad(lambda th: pg(th).sum() / resp.sum(), theta0)
  got = grads(phase.objective)
  # Each entry sums per-token terms -A r (onehot - p) / N, |onehot - p| <= 1 and r = 1 here: magnitudes sum(|A|) / N.
  mag = np.where(resp, np.abs(a), 0.0).sum() / resp.sum()
  tol = numerics.float32_sum_bound(np.full(ref.shape, mag), resp.size * V)
  np.testing.assert_array_less(np.abs(got - ref), tol)
  cfg.loss.aggregation = "token_mean"
  per_micro = grads(algorithms.from_config(cfg).phase_at(cfg, 0).objective)
  assert np.abs(per_micro - ref).max() > 100 * tol.max()
