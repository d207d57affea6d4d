"""The official objective and train step as they were before the RL options (docs/algorithm.md, "RL options"),
frozen: with every option off, the library must compute these bit for bit (tests/test_rl_options.py).

A copy of trapo_jax/losses.py (per-token losses, selectors, aggregation, objective_loss) and trapo_jax/train/step.py
(loss_fn, accumulate_gradients, train_step) at the commit before the options. Only the token log-probs and the
model forward are shared with the library, since no option touches them. Never edit this to follow the library:
it is what the library is held to.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from trapo_jax import losses
from trapo_jax.models import transformer as tfm


def trsft_loss(logp, alpha=0.1):
  p = jnp.exp(logp)
  return -p / jax.lax.stop_gradient(jnp.maximum(p, alpha))


def policy_gradient_loss(logp, old_logp, advantages, *, clip_eps=None):
  ratio = jnp.exp(logp - old_logp)
  loss = -advantages * ratio
  if clip_eps is None:
    return loss
  return jnp.maximum(loss, -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps))


def luffy_offpolicy_loss(logp, advantages, gamma=0.1):
  p = jnp.exp(logp)
  return -advantages * p / (p + gamma)


def group_advantages(rewards, group_ids, *, use_std=False, eps=1e-6):
  rewards = rewards.astype(jnp.float32)
  n = rewards.shape[0]
  count = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_segments=n)
  mean = jax.ops.segment_sum(rewards, group_ids, num_segments=n) / jnp.maximum(count, 1.0)
  centred = rewards - mean[group_ids]
  size = count[group_ids]
  std = jnp.ones_like(rewards)
  if use_std:
    var = jax.ops.segment_sum(centred ** 2, group_ids, num_segments=n)[group_ids] / jnp.maximum(size - 1.0, 1.0)
    std = jnp.where(size > 1, jnp.sqrt(var), 1.0)
    centred = centred / (std + eps)
  return jnp.where(size > 1, centred, rewards / (std + eps) if use_std else rewards)


def aggregate(per_token, mask, mode, max_len):
  mask = mask.astype(jnp.float32)
  total = per_token * mask
  if mode == "seq_sum_over_max_len":
    return jnp.sum(total) / (max_len * per_token.shape[0])
  if mode == "token_mean":
    return jnp.sum(total) / jnp.maximum(jnp.sum(mask), 1.0)
  if mode == "seq_mean_token_mean":
    tokens = jnp.sum(mask, axis=-1)
    seq = jnp.sum(total, axis=-1) / jnp.maximum(tokens, 1.0)
    has = (tokens > 0).astype(jnp.float32)
    return jnp.sum(seq * has) / jnp.maximum(jnp.sum(has), 1.0)
  raise ValueError(mode)


SELECTORS = {
    "own": lambda x: x.response_mask & ~x.prefix_mask,
    "imitated": lambda x: x.response_mask & x.prefix_mask & x.off_loss_mask,
    "response": lambda x: x.response_mask,
    "demo_rows": lambda x: x.response_mask & (x.kind == losses.ROW_DEMO)[:, None],
}

TOKEN_LOSSES = {
    "policy_gradient": lambda x, clip_eps=None: policy_gradient_loss(x.logp, x.old_logp, x.advantages[:, None],
                                                                     clip_eps=clip_eps),
    "trsft": lambda x, alpha: trsft_loss(x.logp, alpha),
    "nll": lambda x: -x.logp,
    "luffy_shaped": lambda x, gamma: luffy_offpolicy_loss(x.logp, x.advantages[:, None], gamma),
    "entropy": lambda x: x.entropy,
}


def term_value(x, term, max_len, seq_scale):
  selected = SELECTORS[term.tokens](x)
  per_token = TOKEN_LOSSES[term.loss](x, **dict(term.params))
  scale = seq_scale if term.aggregation == "seq_sum_over_max_len" else 1.0
  over = x.response_mask if term.over == "response" else selected
  return scale * aggregate(jnp.where(selected, per_token, 0.0), over, term.aggregation, max_len)


def _masked_mean(x, mask):
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def objective_loss(x, objective, weights):
  x = dataclasses.replace(x, prefix_mask=x.prefix_mask.astype(bool) & x.response_mask.astype(bool),
                          off_loss_mask=x.off_loss_mask.astype(bool), response_mask=x.response_mask.astype(bool))
  loss = None
  metrics = {}
  for i, term in enumerate(objective.terms):
    value = term_value(x, term, objective.max_len, objective.seq_scale)
    metrics[f"loss/{term.name}"] = value
    loss = weights[i] * value if loss is None else loss + weights[i] * value
  imitated, own = SELECTORS["imitated"](x), SELECTORS["own"](x)
  p = jnp.exp(jax.lax.stop_gradient(x.logp))
  metrics.update({
      "loss": loss,
      "entropy": jax.lax.stop_gradient(_masked_mean(x.entropy, x.response_mask)),
      "expert_prob": _masked_mean(p, imitated),
      "own_prob": _masked_mean(p, own),
      "num_prefix_tokens": jnp.sum(imitated.astype(jnp.float32)),
      "num_own_tokens": jnp.sum(own.astype(jnp.float32)),
  })
  alphas = [dict(t.params)["alpha"] for t in objective.terms if t.loss == "trsft"]
  if alphas:
    metrics["expert_frac_below_alpha"] = _masked_mean((p < alphas[0]).astype(jnp.float32), imitated)
  return loss, metrics


def response_logprobs(params, model_cfg, mb, chunk_size, temperature=1.0):
  hidden = tfm.forward(params, model_cfg, mb["seq_tokens"], mb["seq_mask"])
  t = hidden.shape[1]
  lb = mb["resp_tokens"].shape[1]
  idx = jnp.clip(mb["resp_start"][:, None] - 1 + jnp.arange(lb)[None], 0, t - 1)
  h = jnp.take_along_axis(hidden, idx[..., None], axis=1)
  return losses.token_logprobs(h, tfm.unembed(params, model_cfg), mb["resp_tokens"], chunk_size=chunk_size,
                               temperature=temperature)


def loss_fn(params, mb, weights, *, model_cfg, objective, chunk_size, temperature=1.0):
  logp, entropy = response_logprobs(params, model_cfg, mb, chunk_size, temperature)
  inputs = losses.TokenInputs(
      logp=logp, old_logp=jax.lax.stop_gradient(logp), entropy=entropy, advantages=mb["advantages"],
      rewards=mb["rewards"], kind=mb["kind"], prefix_mask=mb["prefix_mask"], off_loss_mask=mb["off_loss_mask"],
      response_mask=mb["response_mask"])
  return objective_loss(inputs, objective, weights)


_TOKEN_WEIGHTED = {"expert_prob": "num_prefix_tokens", "expert_frac_below_alpha": "num_prefix_tokens",
                   "own_prob": "num_own_tokens"}
_TOTALS = ("num_prefix_tokens", "num_own_tokens")


def combine_metrics(summed, num_micro):
  out = {}
  for k, v in summed.items():
    if k in _TOKEN_WEIGHTED:
      count = summed[_TOKEN_WEIGHTED[k]]
      out[k] = jnp.where(count > 0, v / jnp.maximum(count, 1.0), jnp.nan)
    else:
      out[k] = v if k in _TOTALS else v / num_micro
  return out


def accumulate_gradients(params, batch, weights, *, model_cfg, objective, chunk_size, temperature=1.0):
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model_cfg=model_cfg, objective=objective,
                                                 chunk_size=chunk_size, temperature=temperature), has_aux=True)
  num_micro = batch["advantages"].shape[0]

  def accumulate(carry, mb):
    grads, metrics = carry
    (_, m), g = grad_fn(params, mb, weights)
    m = {k: v * m[_TOKEN_WEIGHTED[k]] if k in _TOKEN_WEIGHTED else v for k, v in m.items()}
    return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  first = jax.tree.map(lambda x: x[0], batch)
  metric_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                              jax.eval_shape(grad_fn, params, first, weights)[0][1])
  (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, metric_zeros), batch)
  return jax.tree.map(lambda g: g / num_micro, grads), combine_metrics(metrics, num_micro)


def train_step(state, batch, weights, *, tx, model_cfg, objective, chunk_size, temperature=1.0):
  grads, metrics = accumulate_gradients(state.params, batch, weights, model_cfg=model_cfg, objective=objective,
                                        chunk_size=chunk_size, temperature=temperature)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32))
  return state.replace(step=state.step + 1, params=keep(params, state.params),
                       opt_state=keep(opt_state, state.opt_state)), metrics
