"""Loss kernels: pure functions of arrays, one per term of the objective (docs/algorithm.md).

Every per-token loss is [B, T] and response-aligned; masks select where it applies and `aggregate` reduces it.
Shapes: B sequences, T response tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------------------------------------------
# Token log-probabilities and entropy without ever holding fp32 [B, T, V].
#
# Forward: a scan over chunks of T computes each chunk's logits, keeping only logp, entropy and log Z per token.
# Backward (custom VJP): a scan over chunks of the VOCABULARY recomputes z = h W_c for all tokens, forms
# dz = -p (g_logp + g_H (log p + H)) + g_logp [target], writes the disjoint slice dW_c = h^T dz in place and
# accumulates dh += dz W_c^T. No [D, V] gradient is ever accumulated (a T-chunked backward would keep a second
# [D, V] buffer per chunk), so temporaries stay at about one chunk of logits.


def _vocab_chunk(n_tokens: int, vocab: int, chunk_size: int) -> int:
  """Columns per backward chunk: about as many logits as a forward chunk, dividing V exactly when it can.

  Among the divisors near the target, one that is a multiple of 128 (then of 8) is preferred: a chunk takes every
  (V / chunk)-th column, so a vocabulary split over up to that many devices splits every chunk the same way.
  """
  target = max(128, min(vocab, chunk_size * vocab // max(n_tokens, 1)))
  first = -(-vocab // target)
  counts = [k for k in range(first, min(vocab, 4 * first) + 1) if vocab % k == 0]
  for multiple in (128, 8, 1):
    for k in counts:
      if (vocab // k) % multiple == 0:
        return vocab // k
  return target


def _forward_stats(hidden, unembed, targets, chunk_size, temperature):
  """-> logp, entropy, log Z, each [B, T] fp32."""
  b, t, d = hidden.shape
  chunk = min(chunk_size, t)
  n = -(-t // chunk)
  pad = n * chunk - t
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

  def step(_, xs):
    hc, yc = xs
    z = jnp.einsum("bcd,dv->bcv", hc, unembed.astype(hc.dtype), preferred_element_type=jnp.float32) / temperature
    logz = jax.nn.logsumexp(z, axis=-1)
    # A masked sum, not a gather: with the vocabulary split over devices it reduces across them like log Z does,
    # where a gather along the split axis would collect every device's logits first.
    target_z = jnp.sum(jnp.where(jnp.arange(z.shape[-1]) == yc[..., None], z, 0.0), axis=-1)
    entropy = logz - jnp.sum(jnp.exp(z - logz[..., None]) * z, axis=-1)
    return None, (target_z - logz, entropy, logz)

  _, outs = jax.lax.scan(step, None, (h, y))
  return tuple(x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t] for x in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_logprobs(hidden, unembed, targets, chunk_size, temperature):
  logp, entropy, _ = _forward_stats(hidden, unembed, targets, chunk_size, temperature)
  return logp, entropy


def _token_logprobs_fwd(hidden, unembed, targets, chunk_size, temperature):
  logp, entropy, logz = _forward_stats(hidden, unembed, targets, chunk_size, temperature)
  return (logp, entropy), (hidden, unembed, targets, logz, entropy)


def _token_logprobs_bwd(chunk_size, temperature, residuals, cotangents):
  hidden, unembed, targets, logz, entropy = residuals
  g_logp, g_ent = (c.astype(jnp.float32) for c in cotangents)
  b, t, d = hidden.shape
  v = unembed.shape[1]
  n = b * t
  h = hidden.reshape(n, d)
  y, lz, ent = targets.reshape(n, 1), logz.reshape(n, 1), entropy.reshape(n, 1)
  gl, ge = g_logp.reshape(n, 1), g_ent.reshape(n, 1)
  vc = _vocab_chunk(n, v, chunk_size)
  nv = -(-v // vc)
  # Chunk j holds the columns j, j + nv, j + 2 nv, ...: [D, V] viewed as [D, vc, nv]. A vocabulary split over devices
  # in contiguous blocks is then a split of the vc axis, and taking chunk j (a slice of the unsplit nv axis) or
  # writing its gradient stays on each device: the unembedding is never gathered.
  w = jnp.pad(unembed, ((0, 0), (0, nv * vc - v))).reshape(d, vc, nv)

  def step(carry, j):
    dh, dw = carry
    wc = jax.lax.dynamic_index_in_dim(w, j, axis=2, keepdims=False).astype(h.dtype)
    col = jnp.arange(vc)[None] * nv + j
    logp = jnp.dot(h, wc, preferred_element_type=jnp.float32) / temperature - lz
    p = jnp.where(col < v, jnp.exp(logp), 0.0)
    dz = (jnp.where(col == y, gl, 0.0) - p * (gl + ge * (logp + ent))) / temperature
    dh = dh + jnp.dot(dz.astype(h.dtype), wc.T, preferred_element_type=jnp.float32)
    dwc = jnp.dot(h.T, dz.astype(h.dtype), preferred_element_type=jnp.float32).astype(dw.dtype)
    return (dh, jax.lax.dynamic_update_index_in_dim(dw, dwc, j, axis=2)), None

  init = (jnp.zeros((n, d), jnp.float32), jnp.zeros((d, vc, nv), unembed.dtype))
  (dh, dw), _ = jax.lax.scan(step, init, jnp.arange(nv))
  return dh.reshape(b, t, d).astype(hidden.dtype), dw.reshape(d, vc * nv)[:, :v], None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def token_logprobs(hidden: jax.Array, unembed: jax.Array, targets: jax.Array, *, chunk_size: int,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """hidden [B, T, D], unembed [D, V], targets [B, T] -> (logp [B, T], entropy [B, T]), both fp32.

  logp is log softmax(hidden @ unembed / temperature) at the target token, entropy that of the full softmax.
  Memory: about chunk_size * V fp32 logits at a time, forward and backward; gradients flow to hidden and unembed.
  """
  return _token_logprobs(hidden, unembed, targets.astype(jnp.int32), int(chunk_size), float(temperature))


# ----------------------------------------------------------------------------------------------------------------
# Per-token losses [B, T].


def trsft_loss(logp: jax.Array, alpha: float = 0.1) -> jax.Array:
  """TrSFT (docs/algorithm.md#trapo): -p / sg(max(p, alpha)).

  Value -1 where p >= alpha (gradient -grad log p, exactly SFT) and -p/alpha below (gradient -grad p / alpha: the
  SFT gradient scaled down by p/alpha, mode-seeking instead of mass-covering).
  """
  p = jnp.exp(logp)
  return -p / jax.lax.stop_gradient(jnp.maximum(p, alpha))


def sft_loss(logp: jax.Array) -> jax.Array:
  """Negative log-likelihood."""
  return -logp


def policy_gradient_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, *,
                         clip_eps: float | None = None) -> jax.Array:
  """-A * exp(logp - old_logp) (no clip by default, docs/algorithm.md); with clip_eps the PPO clipped surrogate."""
  ratio = jnp.exp(logp - old_logp)
  loss = -advantages * ratio
  if clip_eps is None:
    return loss
  return jnp.maximum(loss, -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps))


def luffy_offpolicy_loss(logp: jax.Array, advantages: jax.Array, gamma: float = 0.1) -> jax.Array:
  """LUFFY's policy shaping on demonstration tokens (docs/algorithm.md#luffy): -A * p / (p + gamma), no stop-gradient."""
  p = jnp.exp(logp)
  return -advantages * p / (p + gamma)


# ----------------------------------------------------------------------------------------------------------------
# Advantages and aggregation.


def group_advantages(rewards: jax.Array, group_ids: jax.Array, *, use_std: bool = False,
                     eps: float = 1e-6) -> jax.Array:
  """rewards [N], group ids [N] (ints in [0, N)) -> reward minus its group mean [N] (GRPO, docs/algorithm.md#advantages).

  With use_std, divided by (group std + eps); the std is unbiased (ddof=1) as torch.std in the official code. A
  group of one keeps its reward (the official estimator takes mean 0 and std 1 for it).
  """
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


AGGREGATIONS = ("seq_sum_over_max_len", "token_mean", "seq_mean_token_mean")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, max_len: int) -> jax.Array:
  """[B, T] losses and mask -> scalar.

  seq_sum_over_max_len: sum over tokens / (max_len * B) — each sequence's sum over the fixed L_max, averaged over
    sequences (the official normaliser is this times the sequences per GPU: see LossConfig.seq_scale);
  token_mean: sum / number of tokens; seq_mean_token_mean: per-sequence token mean, averaged over sequences that
    have tokens.
  """
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
  raise ValueError(f"aggregation mode {mode!r} is unknown")


# ----------------------------------------------------------------------------------------------------------------
# The objective: a sum of per-token terms (docs/algorithm.md, "The objective").
#
# A term is a token selector (which tokens of which rows), a per-token loss, a weight and an aggregation. Methods
# (trapo_jax/algorithms/) list their terms; this module evaluates them. Selectors read only data: the token masks
# and each row's kind, never the method.

ROW_OWN, ROW_GUIDED, ROW_DEMO = 0, 1, 2  # a rollout of the model's own; one continuing an expert prefix; a whole demo
ROW_KINDS = {"own": ROW_OWN, "guided": ROW_GUIDED, "demo": ROW_DEMO}


@dataclasses.dataclass(frozen=True)
class TokenInputs:
  """What a per-token loss or a selector may read; token arrays are response-aligned [B, T], row arrays [B]."""
  logp: jax.Array  # log pi_theta(y_t) at the sampling temperature (carries the gradient)
  old_logp: jax.Array  # the same, stop-gradient: the policy that sampled the batch (one update per batch)
  entropy: jax.Array
  advantages: jax.Array  # [B]
  rewards: jax.Array  # [B]
  kind: jax.Array  # [B] int: ROW_OWN | ROW_GUIDED | ROW_DEMO
  prefix_mask: jax.Array  # expert tokens given, not generated
  off_loss_mask: jax.Array  # expert tokens chosen for imitation (one prefix imitated once per micro-group)
  response_mask: jax.Array


SELECTORS = {
    # Tokens the model generated itself (the continuation of a guided row included).
    "own": lambda x: x.response_mask & ~x.prefix_mask,
    # Expert tokens chosen for imitation: guided prefixes and whole demonstrations.
    "imitated": lambda x: x.response_mask & x.prefix_mask & x.off_loss_mask,
    "response": lambda x: x.response_mask,
    "demo_rows": lambda x: x.response_mask & (x.kind == ROW_DEMO)[:, None],
}


def _policy_gradient(x: TokenInputs, clip_eps: float | None = None) -> jax.Array:
  return policy_gradient_loss(x.logp, x.old_logp, x.advantages[:, None], clip_eps=clip_eps)


TOKEN_LOSSES = {
    "policy_gradient": _policy_gradient,
    "trsft": lambda x, alpha: trsft_loss(x.logp, alpha),
    "nll": lambda x: sft_loss(x.logp),
    "luffy_shaped": lambda x, gamma: luffy_offpolicy_loss(x.logp, x.advantages[:, None], gamma),
    "entropy": lambda x: x.entropy,
}


@dataclasses.dataclass(frozen=True)
class Term:
  """One term of an objective: weight * aggregate(loss on the selected tokens).

  tokens: a SELECTORS key. loss: a TOKEN_LOSSES key, called with `params` as keyword arguments. weight: a number,
  or a schedule (a hashable callable of the optimizer step) evaluated on the host and fed to the jitted step as an
  array, so a changing weight never recompiles. aggregation: see `aggregate`; "seq_sum_over_max_len" is also
  multiplied by the run's `seq_scale`. over: which tokens count in a token mean's denominator: "response" (all
  response tokens of the micro-batch, as the official combined loss tensor) or "selected" (the term's own).
  """
  name: str
  tokens: str
  loss: str
  weight: float | Callable[[int], float] = 1.0
  aggregation: str = "seq_sum_over_max_len"
  over: str = "response"
  params: tuple[tuple[str, Any], ...] = ()

  def weight_at(self, step: int) -> float:
    return float(self.weight(step) if callable(self.weight) else self.weight)


@dataclasses.dataclass(frozen=True)
class Objective:
  """The terms of one training phase and the normaliser they share."""
  terms: tuple[Term, ...]
  max_len: int = 8192  # L_max of the seq_sum_over_max_len aggregation
  seq_scale: float = 8.0  # official: sum / (L_max * 8) over 64 sequences = 8 x the sequence mean of sum / L_max

  def weights_at(self, step: int) -> jax.Array:
    """[num_terms] float32: each term's weight at optimizer step `step` (an input of the jitted step)."""
    return jnp.asarray([t.weight_at(step) for t in self.terms], jnp.float32)


def check_term(term: Term) -> None:
  """ValueError naming the field of `term` that cannot be evaluated."""
  for field, table in (("tokens", SELECTORS), ("loss", TOKEN_LOSSES)):
    if getattr(term, field) not in table:
      raise ValueError(f"term {term.name!r}: {field} {getattr(term, field)!r} is unknown (known: {', '.join(table)})")
  if term.aggregation not in AGGREGATIONS:
    raise ValueError(f"term {term.name!r}: aggregation {term.aggregation!r} is unknown "
                     f"(known: {', '.join(AGGREGATIONS)})")
  if term.over not in ("response", "selected"):
    raise ValueError(f"term {term.name!r}: over {term.over!r} must be 'response' or 'selected'")


def term_value(x: TokenInputs, term: Term, max_len: int, seq_scale: float) -> jax.Array:
  """aggregate(loss on the selected tokens), unweighted (scalar)."""
  selected = SELECTORS[term.tokens](x)
  per_token = TOKEN_LOSSES[term.loss](x, **dict(term.params))
  scale = seq_scale if term.aggregation == "seq_sum_over_max_len" else 1.0
  # Reduced over the response mask (unless `over` says otherwise), as the official combined pg_losses tensor:
  # every aggregation is linear in the per-token values for a fixed mask, so terms add up to the aggregate of
  # their sum.
  over = x.response_mask if term.over == "response" else selected
  return scale * aggregate(jnp.where(selected, per_token, 0.0), over, term.aggregation, max_len)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def objective_loss(x: TokenInputs, objective: Objective,
                   weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """sum_i weights[i] * term_i over response-aligned [B, T] inputs -> (loss, metrics).

  Metrics: each term's unweighted value (`loss/<name>`), the token-mean entropy, and the probabilities the policy
  gives imitated expert tokens and its own tokens (token counts alongside, so means over micro-batches weight
  them by tokens).
  """
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
  # The share of imitated tokens outside TrSFT's trust region (the paper's training-dynamics figure).
  alphas = [dict(t.params)["alpha"] for t in objective.terms if t.loss == "trsft"]
  if alphas:
    metrics["expert_frac_below_alpha"] = _masked_mean((p < alphas[0]).astype(jnp.float32), imitated)
  return loss, metrics
