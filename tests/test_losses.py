"""Loss kernels against float64 numpy references (values and gradients), a hand-computed TRAPO batch, sharding."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers import np_policy_gradient
from trapo_jax import losses
from trapo_jax import reduction

jax.config.update("jax_enable_x64", False)
RNG = np.random.default_rng(0)


def _logp(shape, low=-6.0, high=-0.01):
  return RNG.uniform(low, high, shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------- token_logprobs

def _naive(hidden, unembed, targets, temperature):
  logits = jnp.einsum("btd,dv->btv", hidden, unembed) / temperature
  logp = jax.nn.log_softmax(logits, -1)
  ent = -jnp.sum(jnp.exp(logp) * logp, -1)
  return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], ent


@pytest.mark.parametrize("t, chunk, temperature, v", [
    (13, 4, 1.0, 37), (16, 16, 0.7, 37), (5, 8, 1.0, 37),
    (64, 8, 1.0, 131),  # a prime vocabulary larger than one backward chunk: padded vocabulary chunks
    (60, 8, 1.0, 512),  # several exact vocabulary chunks
])
def test_token_logprobs_equal_naive(t, chunk, temperature, v):
  b, d = 3, 8
  hidden = jnp.asarray(RNG.normal(size=(b, t, d)), jnp.float32)
  unembed = jnp.asarray(RNG.normal(size=(d, v)) * 0.5, jnp.float32)
  targets = jnp.asarray(RNG.integers(0, v, (b, t)))
  mask = jnp.asarray(np.arange(t)[None] < np.array([[t], [t - 3], [1]]))  # padded tokens
  # Jitted, as the trainer runs them: one program each rather than one per operation.
  logp, ent = jax.jit(lambda h, w: losses.token_logprobs(h, w, targets, chunk_size=chunk,
                                                         temperature=temperature))(hidden, unembed)
  ref_logp, ref_ent = jax.jit(lambda h, w: _naive(h, w, targets, temperature))(hidden, unembed)
  np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, atol=1e-5)
  # float64 numpy reference of the same quantities.
  logits = np.einsum("btd,dv->btv", np.float64(hidden), np.float64(unembed)) / temperature
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  np.testing.assert_allclose(logp, np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0] - lse,
                             atol=1e-5)

  def f(fn):
    def loss(h, w):
      lp, en = fn(h, w)
      return jnp.sum(jnp.where(mask, lp * 1.3 + en * 0.7, 0.0))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(hidden, unembed)

  g = f(lambda h, w: losses.token_logprobs(h, w, targets, chunk_size=chunk, temperature=temperature))
  g_ref = f(lambda h, w: _naive(h, w, targets, temperature))
  for a, r in zip(g, g_ref):
    np.testing.assert_allclose(a, r, atol=1e-4)


def test_token_logprobs_bf16_inputs_give_fp32():
  hidden = jnp.asarray(RNG.normal(size=(2, 6, 8)), jnp.bfloat16)
  unembed = jnp.asarray(RNG.normal(size=(8, 11)), jnp.bfloat16)
  logp, ent = losses.token_logprobs(hidden, unembed, jnp.zeros((2, 6), jnp.int32), chunk_size=4)
  assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
  ref, _ = _naive(hidden.astype(jnp.float32), unembed.astype(jnp.float32), jnp.zeros((2, 6), jnp.int32), 1.0)
  np.testing.assert_allclose(logp, ref, atol=0.05)


# ---------------------------------------------------------------------------------------------- per-token losses

def test_trsft_value_and_gradient():
  alpha = 0.1
  logp = np.log(np.array([[0.9, 0.5, 0.1, 0.09, 0.01, 0.3]], np.float32))
  p = np.exp(np.float64(logp))
  inside = p >= alpha
  value = losses.trsft_loss(jnp.asarray(logp), alpha)
  np.testing.assert_allclose(value, np.where(inside, -1.0, -p / alpha), rtol=1e-6)
  grad = jax.grad(lambda x: losses.trsft_loss(x, alpha).sum())(jnp.asarray(logp))
  # d/dlogp: inside the trust region -1 (the SFT gradient -d log p); outside -p/alpha (= -dp/alpha).
  np.testing.assert_allclose(grad, np.where(inside, -1.0, -p / alpha), rtol=1e-5)
  sft_grad = jax.grad(lambda x: losses.sft_loss(x).sum())(jnp.asarray(logp))
  np.testing.assert_allclose(np.asarray(grad)[inside], np.asarray(sft_grad)[inside])


def test_trsft_gradient_through_logits():
  """With respect to the logits, outside the region TrSFT's gradient is the gradient of -p / alpha."""
  logits = jnp.asarray(RNG.normal(size=(7,)) * 3, jnp.float32)
  for target in range(7):
    f = lambda z: losses.trsft_loss(jax.nn.log_softmax(z)[target], 0.1)
    p = float(jax.nn.softmax(logits)[target])
    g = jax.grad(f)(logits)
    ref = (jax.grad(lambda z: -jax.nn.log_softmax(z)[target])(logits) if p >= 0.1
           else jax.grad(lambda z: -jax.nn.softmax(z)[target] / 0.1)(logits))
    np.testing.assert_allclose(g, ref, atol=1e-6)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_policy_gradient_loss(clip_eps):
  logp, old = _logp((4, 9)), _logp((4, 9))
  old = np.where(RNG.random((4, 9)) < 0.5, logp + RNG.uniform(-0.5, 0.5, (4, 9)).astype(np.float32), old)
  adv = RNG.normal(size=(4, 1)).astype(np.float32)
  r = np.exp(np.float64(logp) - old)
  a = np.float64(adv)
  if clip_eps is None:
    ref, dref = -a * r, -a * r
  else:
    unclipped, clipped = -a * r, -a * np.clip(r, 1 - clip_eps, 1 + clip_eps)
    ref = np.maximum(unclipped, clipped)
    # The gradient flows through the unclipped branch when it is the max, else zero (clipped ratio is constant).
    in_range = (r > 1 - clip_eps) & (r < 1 + clip_eps)
    dref = np.where((unclipped >= clipped) | in_range, -a * r, 0.0)
  value = losses.policy_gradient_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), clip_eps=clip_eps)
  np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda x: losses.policy_gradient_loss(x, jnp.asarray(old), jnp.asarray(adv),
                                                        clip_eps=clip_eps).sum())(jnp.asarray(logp))
  np.testing.assert_allclose(grad, dref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip_eps, clip_eps_high, dual_clip", [(0.2, 0.28, None), (None, None, 3.0),
                                                                 (0.2, 0.28, 3.0), (0.1, None, 2.0)])
def test_policy_gradient_clip_higher_and_dual_clip(clip_eps, clip_eps_high, dual_clip):
  """DAPO's clip-higher (separate upper bound) and dual-clip PPO (the loss of A < 0 capped at -c A)."""
  rng = np.random.default_rng(4)
  logp = rng.uniform(-6.0, -0.01, (6, 40)).astype(np.float32)
  old = logp + rng.uniform(-1.5, 1.5, logp.shape).astype(np.float32)  # ratios from 0.22 to 4.5
  adv = np.abs(rng.normal(size=(6, 1))).astype(np.float32) + 0.1
  adv[:3] *= -1  # negative advantages on half the rows: the dual clip's side
  r, a = np.exp(np.float64(logp) - old), np.float64(adv)
  # The batch reaches every branch: both clip bounds, and the dual clip's cap.
  if clip_eps is not None:
    high = clip_eps if clip_eps_high is None else clip_eps_high
    assert ((a > 0) & (r > 1 + high)).any() and ((a < 0) & (r < 1 - clip_eps)).any()
  if dual_clip is not None:
    assert ((a < 0) & (r > dual_clip)).any()
  x = dict(logp=np.float64(logp), old_logp=np.float64(old), response_mask=np.ones(logp.shape, bool),
           prefix_mask=np.zeros(logp.shape, bool))
  value, grad = np_policy_gradient(x, a, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip)
  f = lambda x: losses.policy_gradient_loss(x, jnp.asarray(old), jnp.asarray(adv), clip_eps=clip_eps,
                                            clip_eps_high=clip_eps_high, dual_clip=dual_clip)
  np.testing.assert_allclose(f(jnp.asarray(logp)), value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: f(x).sum())(jnp.asarray(logp)), grad, rtol=1e-5, atol=1e-6)


def test_gspo_sequence_ratio_differentiates_like_the_sequence_objective():
  """GSPO: J = mean over rows of max(-A s, -A clip(s)), s = exp(mean over the row's tokens of log(p / p_old)),
  differentiated whole (dJ/dlogp_t = -A s / |y| on unclipped rows) equals the sequence mean of the GSPO-token
  per-token loss."""
  b, t, eps = 6, 10, 0.1
  rng = np.random.default_rng(6)
  logp = rng.uniform(-6.0, -0.01, (b, t)).astype(np.float32)
  # Per-row shifts put the sequence ratios inside and on both sides outside [1 - eps, 1 + eps].
  shift = np.array([-0.3, 0.3, 0.02, -0.5, 0.01, 0.2])[:, None] + rng.uniform(-0.05, 0.05, (b, t))
  old = (logp + shift).astype(np.float32)
  lens = np.array([10, 7, 3, 1, 10, 5])
  mask = np.arange(t)[None] < lens[:, None]
  adv = np.array([[1.0], [-0.5], [0.7], [-1.2], [0.3], [-0.8]], np.float32)
  x = losses.TokenInputs(logp=jnp.asarray(logp), old_logp=jnp.asarray(old), entropy=jnp.zeros((b, t)),
                         advantages=jnp.asarray(adv[:, 0]), rewards=jnp.zeros(b), kind=jnp.zeros(b, jnp.int32),
                         prefix_mask=jnp.zeros((b, t), bool), off_loss_mask=jnp.zeros((b, t), bool),
                         response_mask=jnp.asarray(mask))
  objective = losses.Objective((losses.Term("pg", "own", "policy_gradient", aggregation="seq_mean_token_mean",
                                            params=(("clip_eps", eps), ("ratio", "sequence"))),), max_len=t)
  f = lambda lp: losses.objective_loss(dataclasses.replace(x, logp=lp), objective, jnp.ones(1))[0]
  value, grad = jax.value_and_grad(f)(jnp.asarray(logp))
  d = np.where(mask, np.float64(logp) - old, 0.0)
  s = np.exp(d.sum(-1) / lens)
  a = np.float64(adv[:, 0])
  unclipped, clipped = -a * s, -a * np.clip(s, 1 - eps, 1 + eps)
  live = (unclipped >= clipped) | ((s > 1 - eps) & (s < 1 + eps))
  assert (~live).any() and live.any()  # both branches
  np.testing.assert_allclose(value, np.maximum(unclipped, clipped).mean(), rtol=1e-5)
  ref_grad = np.where(mask, (np.where(live, -a * s, 0.0) / lens / b)[:, None], 0.0)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_rollout_importance_weights(level, mode):
  """Truncated (min(rho, C)) and masked (rho, or 0 above C) importance sampling, per token or per row (the product
  over its masked tokens); a constant of the gradient."""
  cap = 1.5
  rng = np.random.default_rng(5)
  trainer = rng.uniform(-6.0, -0.01, (5, 6)).astype(np.float32)
  sampler = trainer + rng.uniform(-0.8, 0.8, (5, 6)).astype(np.float32)
  mask = np.arange(6)[None] < np.array([[6], [4], [2], [1], [0]])
  log_rho = np.where(mask, np.float64(trainer) - sampler, 0.0)
  if level == "sequence":
    log_rho = log_rho.sum(-1, keepdims=True)
  rho = np.exp(log_rho)
  ref = np.minimum(rho, cap) if mode == "truncate" else np.where(rho <= cap, rho, 0.0)
  assert (rho > cap).any() and (rho < cap).any()
  w = losses.rollout_is_weight(jnp.asarray(trainer), jnp.asarray(sampler), jnp.asarray(mask), cap=cap, level=level,
                               mode=mode)
  np.testing.assert_allclose(w, ref, rtol=1e-5)
  g = jax.grad(lambda t: losses.rollout_is_weight(t, jnp.asarray(sampler), jnp.asarray(mask), cap=cap, level=level,
                                                  mode=mode).sum())(jnp.asarray(trainer))
  assert not np.asarray(g).any()
  # A sequence's product of many ratios never overflows: far above the cap it is capped (or dropped), not inf/nan.
  big = losses.rollout_is_weight(jnp.full((1, 4), 60.0), jnp.zeros((1, 4)), jnp.ones((1, 4), bool), cap=cap,
                                 level=level, mode=mode)
  np.testing.assert_array_equal(big, cap if mode == "truncate" else 0.0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators(estimator):
  logp, ref = _logp((3, 7)), _logp((3, 7))
  log_r = np.float64(ref) - logp
  value, grad = {"k1": (-log_r, np.ones_like(log_r)), "k2": (0.5 * log_r ** 2, -log_r),
                 "k3": (np.exp(log_r) - 1 - log_r, 1 - np.exp(log_r))}[estimator]
  f = lambda x: losses.kl_estimate(x, jnp.asarray(ref), estimator)
  np.testing.assert_allclose(f(jnp.asarray(logp)), value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.grad(lambda x: f(x).sum())(jnp.asarray(logp)), grad, rtol=1e-5, atol=1e-6)
  if estimator == "k3":
    assert (np.asarray(f(jnp.asarray(logp))) >= 0).all()
  # From samples of pi, k1 and k3 average to KL(pi || ref) (here over a 5-token vocabulary, exactly in expectation).
  p, q = np.array([0.5, 0.2, 0.15, 0.1, 0.05]), np.array([0.3, 0.3, 0.2, 0.1, 0.1])
  kl = float(np.sum(p * np.log(p / q)))
  expect = float(np.sum(p * np.asarray(losses.kl_estimate(jnp.log(p), jnp.log(q), estimator))))
  if estimator in ("k1", "k3"):
    assert expect == pytest.approx(kl, rel=1e-5)


def test_clamped_k3_is_verls_low_var_kl():
  """UFT's KL (verl `low_var_kl`): k3 = r - 1 - log r clamped to [-10, 10], against float64 across the clamp, with
  no gradient where it clamps and a finite one far beyond (log r = +-60)."""
  log_r = np.array([[-60.0, -12.0, -11.0, -3.0, -0.5, 0.0, 0.4, 2.0, 2.5, 3.0, 60.0]])
  logp = np.full(log_r.shape, -1.0)
  ref = jnp.asarray(logp + log_r, jnp.float32)
  k3 = np.exp(log_r) - 1 - log_r
  value, grad = np.clip(k3, -10, 10), np.where(k3 < 10, 1 - np.exp(log_r), 0.0)
  assert (k3 > 10).sum() >= 4 and (k3 < 10).sum() >= 4  # both sides of the clamp are exercised
  f = lambda x: losses.kl_estimate(x, ref, "k3_clamped")
  np.testing.assert_allclose(f(jnp.asarray(logp, jnp.float32)), value, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda x: f(x).sum())(jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(g, grad, rtol=1e-5, atol=1e-5)
  # The token mean UFT takes, as a term of its objective, against the float64 mean.
  term = losses.Term("kl", tokens="own", loss="reference_kl", aggregation="token_mean", over="selected",
                     params=(("estimator", "k3_clamped"),))
  mask = np.array([[1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1]], bool)
  z = jnp.zeros(log_r.shape, jnp.float32)
  x = losses.TokenInputs(logp=jnp.asarray(logp, jnp.float32), old_logp=jnp.asarray(logp, jnp.float32), entropy=z,
                         advantages=jnp.zeros((1,)), rewards=jnp.zeros((1,)), kind=jnp.zeros((1,), jnp.int32),
                         prefix_mask=jnp.zeros(log_r.shape, bool), off_loss_mask=jnp.zeros(log_r.shape, bool),
                         response_mask=jnp.asarray(mask), ref_logp=ref)
  got = float(losses.term_value(x, term, max_len=11, seq_scale=8.0))
  assert got == pytest.approx(float(value[mask].mean()), rel=1e-5)


def test_luffy_offpolicy_loss():
  logp, adv, gamma = _logp((3, 5)), RNG.normal(size=(3, 1)).astype(np.float32), 0.1
  p, a = np.exp(np.float64(logp)), np.float64(adv)
  np.testing.assert_allclose(losses.luffy_offpolicy_loss(jnp.asarray(logp), jnp.asarray(adv), gamma),
                             -a * p / (p + gamma), rtol=1e-5)
  # d/dlogp [-A p/(p+g)] = -A * g p / (p+g)^2 (no stop-gradient in the denominator).
  grad = jax.grad(lambda x: losses.luffy_offpolicy_loss(x, jnp.asarray(adv), gamma).sum())(jnp.asarray(logp))
  np.testing.assert_allclose(grad, -a * gamma * p / (p + gamma) ** 2, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- advantages, aggregation

def _advantages_ref(rewards, groups, use_std, eps=1e-6):
  out = np.zeros(len(rewards))
  for g in set(groups.tolist()):
    idx = groups == g
    r = np.float64(rewards[idx])
    if len(r) == 1:  # the official estimator: mean 0, std 1
      out[idx] = r / (1 + eps) if use_std else r
      continue
    c = r - r.mean()
    out[idx] = c / (r.std(ddof=1) + eps) if use_std else c
  return out


@pytest.mark.parametrize("use_std", [False, True])
def test_group_advantages(use_std):
  groups = np.array([3, 0, 3, 5, 0, 3, 0, 7, 3, 0])  # arbitrary ids and order; group 5 and 7 have one member
  rewards = RNG.integers(0, 2, len(groups)).astype(np.float32)
  rewards[[0, 2, 5, 8]] = [1, 0, 1, 1]
  rewards[[3, 7]] = [1, 0]
  got = losses.group_advantages(jnp.asarray(rewards), jnp.asarray(groups), use_std=use_std)
  np.testing.assert_allclose(got, _advantages_ref(rewards, groups, use_std), rtol=1e-5, atol=1e-6)
  # A group of one keeps its reward as advantage (the official behaviour), not 0.
  assert float(got[3]) == pytest.approx(1.0, rel=1e-5) and float(got[7]) == 0.0
  assert jax.jit(lambda r, g: losses.group_advantages(r, g, use_std=use_std))(rewards, groups).shape == (10,)


@pytest.mark.parametrize("estimator", ["dr_grpo", "rloo"])
def test_advantage_estimators(estimator):
  groups = np.array([3, 0, 3, 5, 0, 3, 0, 7, 3, 0])
  rewards = RNG.uniform(0, 1, len(groups)).astype(np.float32)
  ref = np.zeros(len(groups))
  for g in set(groups.tolist()):
    idx = np.flatnonzero(groups == g)
    r = np.float64(rewards[idx])
    if len(r) == 1:
      ref[idx] = r  # no other member: the reward itself
    elif estimator == "dr_grpo":
      ref[idx] = r - r.mean()
    else:  # leave one out: the mean of the others
      ref[idx] = [r[i] - np.delete(r, i).mean() for i in range(len(r))]
  got = losses.advantages(estimator, jnp.asarray(rewards), jnp.asarray(groups), use_std=False)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # GRPO's estimator is the unchanged group_advantages.
  np.testing.assert_array_equal(losses.advantages("grpo", jnp.asarray(rewards), jnp.asarray(groups), use_std=True),
                                losses.group_advantages(jnp.asarray(rewards), jnp.asarray(groups), use_std=True))
  with pytest.raises(ValueError, match="'gae' is unknown"):
    losses.advantages("gae", jnp.asarray(rewards), jnp.asarray(groups))


def test_aggregate_modes():
  x = RNG.normal(size=(3, 6)).astype(np.float32)
  m = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
  xm = np.where(m, np.float64(x), 0.0)
  np.testing.assert_allclose(losses.aggregate(x, m, "seq_sum_over_max_len", 10), xm.sum() / (10 * 3), rtol=1e-6)
  np.testing.assert_allclose(losses.aggregate(x, m, "token_mean", 10), xm.sum() / m.sum(), rtol=1e-6)
  np.testing.assert_allclose(losses.aggregate(x, m, "seq_mean_token_mean", 10),
                             np.mean([xm[0].sum() / 3, xm[1].sum() / 6]), rtol=1e-6)
  with pytest.raises(ValueError, match="'sum'"):
    losses.aggregate(x, m, "sum", 10)


# ---------------------------------------------------------------------------------------------- the objective

L = 8
# One prompt, 8 samples: 4 pure, 2 with a 25% prefix (2 tokens; only the second imitated), 1 with a 50% prefix
# (4 tokens), 1 full expert (6 tokens). Response lengths per sample:
LENS = [8, 5, 8, 8, 8, 6, 7, 6]
PREFIX = [0, 0, 0, 0, 2, 2, 4, 6]
IMITATED = [False] * 5 + [True, True, True]
REWARDS = [1, 0, 0, 0, 0, 1, 1, 1]  # mean 0.5 -> advantages +-0.5
KINDS = [losses.ROW_OWN] * 4 + [losses.ROW_GUIDED] * 3 + [losses.ROW_DEMO]


def _hand_batch():
  pos = np.arange(L)[None]
  lens, pre = np.array(LENS)[:, None], np.array(PREFIX)[:, None]
  response = pos < lens
  prefix = pos < pre
  off = prefix & np.array(IMITATED)[:, None]
  # Fixed probabilities: expert tokens p = 0.5 on the 25% sample, 0.05 on the 50% sample, 0.2 on the expert; own
  # tokens p = 0.25 everywhere.
  p = np.full((8, L), 0.25)
  p[4:6, :2] = 0.5
  p[6, :4] = 0.05
  p[7, :6] = 0.2
  entropy = np.full((8, L), 2.0)
  entropy[0] = 1.0
  return (np.log(p).astype(np.float32), entropy.astype(np.float32), prefix, off, response,
          np.array(REWARDS, np.float32) - 0.5)


def _inputs(logp, entropy, prefix, off, response, adv, old=None):
  return losses.TokenInputs(logp=jnp.asarray(logp), old_logp=jax.lax.stop_gradient(jnp.asarray(logp if old is None
                                                                                                 else old)),
                            entropy=jnp.asarray(entropy), advantages=jnp.asarray(adv),
                            rewards=jnp.asarray(REWARDS, jnp.float32), kind=jnp.asarray(KINDS, jnp.int32),
                            prefix_mask=jnp.asarray(prefix), off_loss_mask=jnp.asarray(off),
                            response_mask=jnp.asarray(response))


def _trapo(prefix_term=None, aggregation="seq_sum_over_max_len", entropy_coef=0.001, clip_eps=None):
  prefix_term = prefix_term or losses.Term("trsft", "imitated", "trsft", params=(("alpha", 0.1),),
                                           aggregation=aggregation)
  return losses.Objective(terms=(prefix_term,
                                 losses.Term("pg", "own", "policy_gradient", aggregation=aggregation,
                                             params=(("clip_eps", clip_eps),)),
                                 losses.Term("entropy", "response", "entropy", weight=-entropy_coef,
                                             aggregation="token_mean")),
                          max_len=L, seq_scale=8.0)


def _loss(objective, *batch, step=0):
  loss, metrics = losses.objective_loss(_inputs(*batch), objective, objective.weights_at(step))
  return loss, reduction.values(metrics)


def test_trapo_objective_by_hand():
  logp, entropy, prefix, off, response, adv = batch = _hand_batch()
  loss, m = _loss(_trapo(), *batch)
  # PG part: -A on every own token (ratio 1). Own tokens per sample: 8, 5, 8, 8, 6, 4, 3, 0.
  own = [8, 5, 8, 8, 8 - 2, 6 - 2, 7 - 4, 0]
  pg_sum = sum(-a * n for a, n in zip(adv, own))  # = -(0.5*8) + 0.5*(5+8+8+6) - 0.5*(4+3) = -4 + 13.5 - 3.5 = 6
  assert pg_sum == pytest.approx(6.0)
  # TrSFT part: sample 5 (p=0.5 >= 0.1): 2 tokens of -1; sample 6 (p=0.05 < 0.1): 4 tokens of -0.05/0.1 = -0.5;
  # sample 7 (p=0.2): 6 tokens of -1. Sample 4's prefix gets nothing.
  prefix_sum = -2.0 - 4 * 0.5 - 6.0
  # Normaliser: sum / (L_max * B) * seq_scale = sum / (8 * 8) * 8 = sum / 8.
  assert float(m["loss/pg"]) == pytest.approx(pg_sum / 8, rel=1e-6)
  assert float(m["loss/trsft"]) == pytest.approx(prefix_sum / 8, rel=1e-6)
  # Entropy: token mean over all 56 response tokens (8 of sample 0 at 1.0, 48 at 2.0).
  mean_h = (8 * 1.0 + 48 * 2.0) / 56
  assert float(m["entropy"]) == pytest.approx(mean_h, rel=1e-6) == float(m["loss/entropy"])
  assert float(loss) == pytest.approx((pg_sum + prefix_sum) / 8 - 0.001 * mean_h, rel=1e-6)
  # Expert-token probability over the 12 imitated tokens: (2*0.5 + 4*0.05 + 6*0.2) / 12; below alpha: 4 of 12.
  assert float(m["expert_prob"]) == pytest.approx((1.0 + 0.2 + 1.2) / 12, rel=1e-5)
  assert float(m["expert_frac_below_alpha"]) == pytest.approx(4 / 12)
  assert float(m["num_prefix_tokens"]) == 12 and float(m["num_own_tokens"]) == sum(own)
  # Gradient w.r.t. logp: -A/8 on own tokens, TrSFT/8 on imitated tokens, 0 on sample 4's prefix and on padding
  # (the entropy is an input here, so it contributes no gradient).
  g = np.asarray(jax.grad(lambda x: _loss(_trapo(), x, *batch[1:])[0])(jnp.asarray(logp)))
  expected = np.zeros((8, L))
  for i in range(8):
    for t in range(LENS[i]):
      if t >= PREFIX[i]:
        expected[i, t] = -adv[i] / 8
      elif IMITATED[i]:
        p = np.exp(np.float64(logp[i, t]))
        expected[i, t] = (-1.0 if p >= 0.1 else -p / 0.1) / 8
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-7)


def test_objective_variants():
  logp, entropy, prefix, off, response, adv = batch = _hand_batch()
  # Plain SFT on the prefix (ablation): -log p on imitated tokens.
  _, m = _loss(_trapo(losses.Term("sft", "imitated", "nll")), *batch)
  ref = -(2 * np.log(0.5) + 4 * np.log(0.05) + 6 * np.log(0.2)) / 8
  assert float(m["loss/sft"]) == pytest.approx(ref, rel=1e-5)
  assert "expert_frac_below_alpha" not in m  # no trust region to be below
  # LUFFY shaping: -A p/(p+0.1) on imitated tokens (advantages +0.5 for samples 5, 6, 7).
  _, m = _loss(_trapo(losses.Term("luffy", "imitated", "luffy_shaped", params=(("gamma", 0.1),))), *batch)
  ref = -0.5 * (2 * 0.5 / 0.6 + 4 * 0.05 / 0.15 + 6 * 0.2 / 0.3) / 8
  assert float(m["loss/luffy"]) == pytest.approx(ref, rel=1e-5)
  # No prefixes at all (GRPO's rows) -> PG on every response token.
  no = np.zeros_like(prefix)
  grpo = losses.Objective(terms=_trapo().terms[1:], max_len=L, seq_scale=8.0)
  loss, m = _loss(grpo, logp, entropy, no, no, response, adv)
  assert float(loss) == pytest.approx(sum(-a * n for a, n in zip(adv, LENS)) / 8 - 0.001 * float(m["entropy"]), rel=1e-6)
  # Token-mean NLL on whole demonstrations (SFT): the mean over the 56 response tokens, no seq_scale.
  sft = losses.Objective(terms=(losses.Term("nll", "imitated", "nll", aggregation="token_mean"),), max_len=L)
  loss, _ = _loss(sft, logp, entropy, response, response, response, adv)
  assert float(loss) == pytest.approx(-np.float64(logp)[response].mean(), rel=1e-5)
  # The demonstration rows only, token mean over their own tokens ("over": "selected"): row 7's 6 tokens.
  demo = losses.Objective(terms=(losses.Term("d", "demo_rows", "nll", aggregation="token_mean", over="selected"),))
  loss, _ = _loss(demo, *batch)
  assert float(loss) == pytest.approx(-np.log(0.2), rel=1e-5)
  # PPO clip changes nothing when the ratio is 1.
  assert float(_loss(_trapo(clip_eps=0.2), *batch)[0]) == pytest.approx(float(_loss(_trapo(), *batch)[0]))


def test_weight_schedule_is_an_input_not_a_constant():
  """A scheduled weight is evaluated on the host per step and fed to one compiled function: no recompilation."""
  batch = _hand_batch()

  @dataclasses.dataclass(frozen=True)
  class Halving:
    def __call__(self, step):
      return 0.5 ** step

  obj = losses.Objective(terms=(losses.Term("sft", "imitated", "nll", weight=Halving()),), max_len=L)
  traces = []

  @jax.jit
  def f(w):
    traces.append(1)
    return losses.objective_loss(_inputs(*batch), obj, w)[0]

  values = [float(f(obj.weights_at(step))) for step in range(3)]
  assert len(traces) == 1
  np.testing.assert_allclose(values, [values[0], values[0] / 2, values[0] / 4], rtol=1e-6)


def test_a_scheduled_loss_parameter_is_an_input_behind_the_weights():
  """Term.inputs: a per-token loss parameter that follows the step (Prefix-RFT's entropy-mask share) comes after the
  weights in `weights_at`, is read there by its term, and gives the value the constant parameter gives, in one
  compiled function for every step."""
  batch = _hand_batch()

  @dataclasses.dataclass(frozen=True)
  class Share:
    def __call__(self, step):
      return (0.0, 0.5, 1 / 3)[step]

  clip = (("clip_eps", 0.2), ("dual_clip", 3.0))
  term = lambda **kw: losses.Term("prefix", "imitated", "prefix_rft_surrogate", aggregation="token_mean", **kw)
  scheduled = losses.Objective(terms=(term(params=clip, inputs=(("entropy_drop", Share()),)),
                                      losses.Term("nll", "imitated", "nll", weight=0.5)), max_len=L)
  assert scheduled.num_weights == 3
  np.testing.assert_allclose(scheduled.weights_at(1), [1.0, 0.5, 0.5])
  traces = []

  @jax.jit
  def f(w):
    traces.append(1)
    return losses.objective_loss(_inputs(*batch), scheduled, w)[0]

  # Distinct entropies, so that each share masks a different set of the 12 imitated tokens (0, 6 and 4 of them).
  rng = np.random.default_rng(1)
  batch = batch[:1] + (rng.uniform(0.0, 3.0, batch[1].shape).astype(np.float32),) + batch[2:]
  values = []
  for step in range(3):
    constant = losses.Objective(terms=(term(params=clip + (("entropy_drop", Share()(step)),)),
                                       losses.Term("nll", "imitated", "nll", weight=0.5)), max_len=L)
    want = losses.objective_loss(_inputs(*batch), constant, constant.weights_at(step))[0]
    values.append(float(f(scheduled.weights_at(step))))
    assert values[-1] == pytest.approx(float(want), rel=1e-6)
  assert len(traces) == 1 and len(set(values)) == 3
  with pytest.raises(ValueError, match="entropy_drop is both a constant and a scheduled input"):
    losses.check_term(term(params=clip + (("entropy_drop", 0.8),), inputs=(("entropy_drop", Share()),)))


def test_terms_that_cannot_be_evaluated_are_named():
  with pytest.raises(ValueError, match="term 'x': tokens 'nowhere' is unknown"):
    losses.check_term(losses.Term("x", "nowhere", "nll"))
  with pytest.raises(ValueError, match="term 'x': loss 'kl' is unknown"):
    losses.check_term(losses.Term("x", "own", "kl"))
  with pytest.raises(ValueError, match="term 'x': aggregation 'sum' is unknown"):
    losses.check_term(losses.Term("x", "own", "nll", aggregation="sum"))


def test_sharded_equals_unsharded():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  b, t, d, v = 8, 12, 16, 64
  hidden = jnp.asarray(RNG.normal(size=(b, t, d)), jnp.float32)
  unembed = jnp.asarray(RNG.normal(size=(d, v)) * 0.3, jnp.float32)
  targets = jnp.asarray(RNG.integers(0, v, (b, t)))
  prefix = jnp.asarray(np.arange(t)[None] < RNG.integers(0, 6, (b, 1)))
  response = jnp.asarray(np.arange(t)[None] < RNG.integers(6, t + 1, (b, 1)))
  off = prefix & jnp.asarray(RNG.random((b, 1)) < 0.5)
  adv = jnp.asarray(RNG.normal(size=(b,)), jnp.float32)
  objective = dataclasses.replace(_trapo(), max_len=t)

  def f(h, w):
    logp, ent = losses.token_logprobs(h, w, targets, chunk_size=5)
    x = losses.TokenInputs(logp=logp, old_logp=jax.lax.stop_gradient(logp), entropy=ent, advantages=adv,
                           rewards=jnp.zeros(b), kind=jnp.zeros(b, jnp.int32), prefix_mask=prefix, off_loss_mask=off,
                           response_mask=response)
    return losses.objective_loss(x, objective, objective.weights_at(0))[0]

  step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  ref_val, ref_grad = step(hidden, unembed)
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  sh = jax.device_put(hidden, rows)
  sw = jax.device_put(unembed, NamedSharding(mesh, P(None, "tensor")))
  with mesh:
    val, grad = step(sh, sw)
  assert len(sh.sharding.device_set) == 8
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for a, r in zip(grad, ref_grad):
    np.testing.assert_allclose(a, r, atol=1e-5)


def _gathers_with_axis(hlo: str, size: int) -> list[str]:
  """The all-gathers (and all-reduces, which can stand in for one) of compiled HLO text whose result has an axis of
  at least `size`."""
  found = []
  for line in hlo.splitlines():
    m = re.search(r"= \(?\w+\[([\d,]*)\][^ ]* (all-gather|all-reduce)(-start)?\(", line)
    if m and any(int(x) >= size for x in m.group(1).split(",") if x):
      found.append(line.strip()[:160])
  return found


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_vocab_parallel_gradient_gathers_no_vocabulary(mesh_shape):
  """With the vocabulary split over `tensor` (as the model shards the unembedding), the gradient of the chunked
  log-probs keeps it split: no collective's result holds the whole vocabulary axis."""
  mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  b, t, d, v = 8, 16, 32, 768  # V is larger than every other axis, so an axis >= V can only be the vocabulary

  def loss(h, w, y):
    logp, ent = losses.token_logprobs(h, w, y, chunk_size=32)
    return jnp.sum(logp) + 0.1 * jnp.sum(ent)

  rows = NamedSharding(mesh, P(("data", "fsdp")))
  unembed = NamedSharding(mesh, P("fsdp", "tensor"))  # ("embed", "vocab") under sharding.DEFAULT_RULES
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(rows, unembed, rows), out_shardings=(rows, unembed))
  with jax.set_mesh(mesh):
    hlo = grad.lower(jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
                     jax.ShapeDtypeStruct((b, t), jnp.int32)).compile().as_text()
  assert "all-gather" in hlo  # the FSDP gathers of the weight are there: the pattern below can match
  assert _gathers_with_axis(hlo, v) == []
