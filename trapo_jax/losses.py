"""Loss kernels: pure functions of arrays, one per term of the objective (docs/algorithm.md).

Every per-token loss is [B, T] and response-aligned; masks select where it applies and `aggregate` reduces it.
Shapes: B sequences, T response tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from trapo_jax import reduction

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
                         clip_eps: float | None = None, clip_eps_high: float | None = None,
                         dual_clip: float | None = None) -> jax.Array:
  """-A * exp(logp - old_logp) (no clip by default, docs/algorithm.md); with clip_eps the PPO clipped surrogate.

  clip_eps_high: the ratio's upper bound 1 + clip_eps_high instead of 1 + clip_eps (DAPO's clip-higher).
  dual_clip c > 1: where A < 0 the loss is at most -c * A, so a huge ratio cannot blow up a negative update
  (dual-clip PPO). Both off by default (docs/algorithm.md#rl-options).
  """
  ratio = jnp.exp(logp - old_logp)
  loss = -advantages * ratio
  if clip_eps is not None:
    high = clip_eps if clip_eps_high is None else clip_eps_high
    loss = jnp.maximum(loss, -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high))
  if dual_clip is not None:
    loss = jnp.where(advantages < 0, jnp.minimum(loss, -advantages * dual_clip), loss)
  return loss


def sequence_log_ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T] -> [B, 1]: the mean over a row's masked tokens of log(pi / pi_old), GSPO's length-normalised sequence
  log-ratio (0 for a row without tokens)."""
  mask = mask.astype(bool)
  count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1).astype(jnp.float32)
  return jnp.sum(jnp.where(mask, logp - old_logp, 0.0), axis=-1, keepdims=True) / count


def gspo_token_logp(logp: jax.Array, old_logp: jax.Array, mask: jax.Array) -> jax.Array:
  """GSPO-token: log-probs whose ratio to old_logp = 0 has, at every token, the value of the row's sequence ratio s
  and the gradient s * grad log p_t, so that a sequence mean of per-token losses differentiates like GSPO's
  sequence objective. [B, T]."""
  sg = jax.lax.stop_gradient
  return logp - sg(logp) + sg(sequence_log_ratio(logp, old_logp, mask))


IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")


def rollout_is_log_ratio(trainer_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array,
                         level: str = "token") -> jax.Array:
  """log(pi_train / pi_sampler) on the masked tokens ([B, T], 0 elsewhere), or its sum over each row's masked
  tokens, the log of the sequence's ratio ([B, 1], level "sequence")."""
  log_rho = jnp.where(mask.astype(bool), trainer_logp - sampler_logp, 0.0)
  if level == "sequence":
    return jnp.sum(log_rho, axis=-1, keepdims=True)
  if level != "token":
    raise ValueError(f"importance-sampling level {level!r} is unknown (known: {', '.join(IS_LEVELS)})")
  return log_rho


def rollout_is_weight(trainer_logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array, *, cap: float,
                      level: str = "token", mode: str = "truncate") -> jax.Array:
  """Importance weight of the trainer's policy over the sampler's, for the sampler/trainer mismatch (no gradient).

  rho = pi_train / pi_sampler per token ([B, T]), or per row the product over its masked tokens ([B, 1], level
  "sequence"). mode "truncate": min(rho, cap) (truncated IS); "mask": rho where rho <= cap, else 0, the token or
  row dropped (masked IS). The cap is compared in log space, so a product of many ratios cannot overflow it.
  """
  log_rho = rollout_is_log_ratio(trainer_logp, sampler_logp, mask, level)
  if mode == "truncate":
    weight = jnp.minimum(jnp.exp(log_rho), cap)
  elif mode == "mask":
    weight = jnp.where(log_rho <= math.log(cap), jnp.exp(log_rho), 0.0)
  else:
    raise ValueError(f"importance-sampling mode {mode!r} is unknown (known: {', '.join(IS_MODES)})")
  return jax.lax.stop_gradient(weight)


KL_ESTIMATORS = ("k1", "k2", "k3", "k3_clamped")


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, with log r = log pi_ref - log pi:
  k1 = -log r (unbiased), k2 = (log r)^2 / 2, k3 = r - 1 - log r (unbiased, never negative), k3_clamped = k3 clamped
  to [-10, 10] (verl's `low_var_kl`). [B, T]."""
  log_r = ref_logp - logp
  if estimator == "k3_clamped":
    # Beyond |log r| = 20 the value is clamped anyway; clipping first keeps exp finite, so the gradient is 0, not NaN.
    log_r = jnp.clip(log_r, -20.0, 20.0)
    return jnp.clip(jnp.exp(log_r) - 1.0 - log_r, -10.0, 10.0)
  if estimator == "k1":
    return -log_r
  if estimator == "k2":
    return 0.5 * log_r ** 2
  if estimator == "k3":
    return jnp.exp(log_r) - 1.0 - log_r
  raise ValueError(f"KL estimator {estimator!r} is unknown (known: {', '.join(KL_ESTIMATORS)})")


def luffy_offpolicy_loss(logp: jax.Array, advantages: jax.Array, gamma: float = 0.1) -> jax.Array:
  """LUFFY's policy shaping on demonstration tokens (docs/algorithm.md#luffy): -A * p / (p + gamma), no stop-gradient."""
  p = jnp.exp(logp)
  return -advantages * p / (p + gamma)


def phi_weighted_nll(logp: jax.Array) -> jax.Array:
  """CHORD-phi (docs/algorithm.md#chord): -log p weighted by sg(p (1 - p)), which vanishes at p = 0 and p = 1."""
  p = jax.lax.stop_gradient(jnp.exp(logp))
  return -logp * p * (1.0 - p)


def row_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T], mask [B, T] -> [B, 1]: each row's mean over its masked tokens (0 for a row without any)."""
  mask = mask.astype(jnp.float32)
  return (jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0))[:, None]


def top_share(values: jax.Array, selected: jax.Array, drop_share: float) -> jax.Array:
  """[B, T] bool: the selected tokens left after dropping the floor(K * drop_share) of lowest value, K the number
  selected (ties in index order), as the official entropy reshaper of Prefix-RFT ranks a micro-batch's prefix
  tokens."""
  flat = jnp.where(selected, values, jnp.inf).reshape(-1)
  order = jnp.argsort(flat, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(flat.size, dtype=order.dtype)).reshape(values.shape)
  drop = jnp.floor(jnp.sum(selected.astype(jnp.float32)) * drop_share)
  return selected & (rank >= drop)


# ----------------------------------------------------------------------------------------------------------------
# Advantages and aggregation.


def group_advantages(rewards: jax.Array, group_ids: jax.Array, *, use_std: bool = False,
                     eps: float = 1e-6, member: jax.Array | None = None) -> jax.Array:
  """rewards [N], group ids [N] (ints in [0, N)) -> reward minus its group mean [N] (GRPO, docs/algorithm.md#advantages).

  With use_std, divided by (group std + eps); the std is unbiased (ddof=1) as torch.std in the official code. A
  group of one keeps its reward (the official estimator takes mean 0 and std 1 for it). member [N] bool: only these
  rows form the groups; the others (demonstration rows outside the group) get advantage 0.
  """
  rewards = rewards.astype(jnp.float32)
  n = rewards.shape[0]
  inside = jnp.ones_like(rewards) if member is None else member.astype(jnp.float32)
  rewards = rewards * inside
  count = jax.ops.segment_sum(inside, group_ids, num_segments=n)
  mean = jax.ops.segment_sum(rewards, group_ids, num_segments=n) / jnp.maximum(count, 1.0)
  centred = (rewards - mean[group_ids]) * inside
  size = count[group_ids]
  std = jnp.ones_like(rewards)
  if use_std:
    var = jax.ops.segment_sum(centred ** 2, group_ids, num_segments=n)[group_ids] / jnp.maximum(size - 1.0, 1.0)
    std = jnp.where(size > 1, jnp.sqrt(var), 1.0)
    centred = centred / (std + eps)
  return jnp.where(size > 1, centred, rewards / (std + eps) if use_std else rewards) * inside


def rloo_advantages(rewards: jax.Array, group_ids: jax.Array, *, member: jax.Array | None = None) -> jax.Array:
  """RLOO: each reward minus the mean of the other rewards of its group, n/(n-1) x (R - group mean) [N]. A group
  of one has no other reward and keeps its own. member [N] bool: only these rows form the groups (others get 0)."""
  rewards = rewards.astype(jnp.float32)
  n = rewards.shape[0]
  inside = jnp.ones_like(rewards) if member is None else member.astype(jnp.float32)
  rewards = rewards * inside
  count = jax.ops.segment_sum(inside, group_ids, num_segments=n)[group_ids]
  total = jax.ops.segment_sum(rewards, group_ids, num_segments=n)[group_ids]
  return jnp.where(count > 1, rewards - (total - rewards) / jnp.maximum(count - 1.0, 1.0), rewards) * inside


ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
PREFIX_ESTIMATORS = ("dr_grpo_prefix", "dr_grpo_prefix_v2")


def prefix_advantages(estimator: str, rewards: jax.Array, prefix_groups: jax.Array, base_groups: jax.Array,
                      guided: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Prefix-RFT's prefix-specific estimators (prefix_rft `core_algos.py:compute_dr_grpo_prefix_outcome_advantage`,
  `compute_dr_grpo_prefix_v2_outcome_advantage`): [N] rewards -> (the advantage of a row's own tokens [N], that of
  its given prefix tokens [N]).

  prefix_groups [N] ints in [0, N): rows continuing one prefix share a group, and so do all rows of a prompt without
  a prefix (the official prefix_uid "0000-0000-0000-0000"); base_groups [N]: the group of the prompt's rows without
  a prefix; guided [N] bool: the row continues a prefix. With m_g a group's mean reward (dr_grpo_prefix: 0 for a
  group of one row; _v2: the mean always), a row's own tokens get s = R - m_(its group), a guided row's prefix
  tokens (s - m_(base group)) / n, n the rows continuing its prefix (the official num_rollouts_per_prefix, rollout.n
  rows per prefix there). Never divided by a std (Dr.GRPO).
  """
  if estimator not in PREFIX_ESTIMATORS:
    raise ValueError(f"prefix estimator {estimator!r} is unknown (known: {', '.join(PREFIX_ESTIMATORS)})")
  rewards = rewards.astype(jnp.float32)
  n = rewards.shape[0]
  count = jax.ops.segment_sum(jnp.ones_like(rewards), prefix_groups, num_segments=n)
  mean = jax.ops.segment_sum(rewards, prefix_groups, num_segments=n) / jnp.maximum(count, 1.0)
  if estimator == "dr_grpo_prefix":
    mean = jnp.where(count > 1, mean, 0.0)
  own = rewards - mean[prefix_groups]
  prefix = (own - mean[base_groups]) / count[prefix_groups]
  return own, jnp.where(guided, prefix, 0.0)


def advantages(estimator: str, rewards: jax.Array, group_ids: jax.Array, *, use_std: bool = False,
               member: jax.Array | None = None) -> jax.Array:
  """[N] advantages by name (docs/algorithm.md#rl-options): "grpo" (group mean, std with use_std), "dr_grpo" (group
  mean, never the std: Dr. GRPO), "rloo" (leave-one-out mean). member [N] bool: the rows that form the groups."""
  if estimator == "grpo":
    return group_advantages(rewards, group_ids, use_std=use_std, member=member)
  if estimator == "dr_grpo":
    return group_advantages(rewards, group_ids, member=member)
  if estimator == "rloo":
    return rloo_advantages(rewards, group_ids, member=member)
  raise ValueError(f"advantage estimator {estimator!r} is unknown (known: {', '.join(ADVANTAGE_ESTIMATORS)})")


AGGREGATIONS = ("seq_sum_over_max_len", "token_mean", "seq_mean_token_mean", "row_share_token_mean",
                "global_token_mean")


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, max_len: int,
              batch_tokens: jax.Array | None = None) -> jax.Array:
  """[B, T] losses and mask -> scalar.

  seq_sum_over_max_len: sum over tokens / (max_len * B) — each sequence's sum over the fixed L_max, averaged over
    sequences (the official normaliser is this times the sequences per GPU: see LossConfig.seq_scale);
  token_mean: sum / number of tokens; seq_mean_token_mean: per-sequence token mean, averaged over sequences that
    have tokens; row_share_token_mean: the token mean times the share of the B rows that have tokens (CHORD's
    per-micro-batch weighting of each row type, docs/algorithm.md#chord); global_token_mean: sum / `batch_tokens`,
    the mini-batch's response tokens per micro-batch, so the mean over micro-batches is the token mean of the whole
    mini-batch (DAPO in current verl, `agg_loss` with the batch's token count); the micro-batch's own count where
    none is given (one micro-batch).
  """
  mask = mask.astype(jnp.float32)
  total = per_token * mask
  if mode == "seq_sum_over_max_len":
    return jnp.sum(total) / (max_len * per_token.shape[0])
  if mode == "token_mean" or (mode == "global_token_mean" and batch_tokens is None):
    return jnp.sum(total) / jnp.maximum(jnp.sum(mask), 1.0)
  if mode == "global_token_mean":
    return jnp.sum(total) / jnp.maximum(batch_tokens, 1.0)
  if mode == "seq_mean_token_mean":
    tokens = jnp.sum(mask, axis=-1)
    seq = jnp.sum(total, axis=-1) / jnp.maximum(tokens, 1.0)
    has = (tokens > 0).astype(jnp.float32)
    return jnp.sum(seq * has) / jnp.maximum(jnp.sum(has), 1.0)
  if mode == "row_share_token_mean":
    rows = jnp.sum((jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))
    return jnp.sum(total) / jnp.maximum(jnp.sum(mask), 1.0) * rows / per_token.shape[0]
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
  sampler_logp: jax.Array | None = None  # the log-probs the rows were sampled with (0 on given tokens); sampled rows
  ref_logp: jax.Array | None = None  # log pi_ref of the frozen reference policy, where a KL option asks for it
  batch_tokens: jax.Array | None = None  # [] the mini-batch's response tokens / its micro-batches (global_token_mean)
  # [B] the advantage of a row's given prefix tokens where the method estimates it apart from the row's (Prefix-RFT's
  # dr_grpo_prefix, Phase.prefix_advantages); None: the row's.
  prefix_advantages: jax.Array | None = None


SELECTORS = {
    # Tokens the model generated itself (the continuation of a guided row included).
    "own": lambda x: x.response_mask & ~x.prefix_mask,
    # Expert tokens chosen for imitation: guided prefixes and whole demonstrations.
    "imitated": lambda x: x.response_mask & x.prefix_mask & x.off_loss_mask,
    "response": lambda x: x.response_mask,
    "demo_rows": lambda x: x.response_mask & (x.kind == ROW_DEMO)[:, None],
}


def _policy_gradient(x: TokenInputs, clip_eps: float | None = None, clip_eps_high: float | None = None,
                     dual_clip: float | None = None, ratio: str = "token", tis_cap: float | None = None,
                     tis_level: str = "token", tis_mode: str = "truncate") -> jax.Array:
  """The policy-gradient term and its options (docs/algorithm.md#rl-options); with none set, exactly
  policy_gradient_loss(logp, old_logp, A, clip_eps)."""
  logp, old = _pg_logps(x, ratio)
  loss = policy_gradient_loss(logp, old, x.advantages[:, None], clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                              dual_clip=dual_clip)
  if tis_cap is not None:
    loss = loss * _is_weight(x, tis_cap, tis_level, tis_mode)
  return loss


def policy_gradient_metrics(x: TokenInputs, clip_eps: float | None = None, clip_eps_high: float | None = None,
                            dual_clip: float | None = None, ratio: str = "token", tis_cap: float | None = None,
                            tis_level: str = "token", tis_mode: str = "truncate") -> dict[str, reduction.Metric]:
  """What each policy-gradient option did, as token means over the model's own tokens (none without options):
  pg/clip_frac_high and pg/clip_frac_low (tokens whose gradient the clip removed: A > 0 above 1 + eps_high, A < 0
  below 1 - eps), pg/dual_clip_frac (A < 0 capped at -c A), tis/weight_mean and tis/frac_capped (ratio above the
  cap: truncated, or dropped)."""
  out = {}
  own = SELECTORS["own"](x)
  logp, old = _pg_logps(x, ratio)
  r = jnp.exp(jax.lax.stop_gradient(logp - old))
  a = jnp.broadcast_to(x.advantages[:, None], r.shape)
  frac = lambda cond: reduction.token_mean(cond.astype(jnp.float32), own)
  if clip_eps is not None:
    high = clip_eps if clip_eps_high is None else clip_eps_high
    out["pg/clip_frac_high"] = frac((a > 0) & (r > 1.0 + high))
    out["pg/clip_frac_low"] = frac((a < 0) & (r < 1.0 - clip_eps))
  if dual_clip is not None:
    out["pg/dual_clip_frac"] = frac((a < 0) & (r > dual_clip))
  if tis_cap is not None:
    out["tis/weight_mean"] = reduction.token_mean(
        jnp.broadcast_to(_is_weight(x, tis_cap, tis_level, tis_mode), r.shape), own)
    log_rho = rollout_is_log_ratio(x.old_logp, x.sampler_logp, own, tis_level)
    out["tis/frac_capped"] = frac(jnp.broadcast_to(log_rho > math.log(tis_cap), r.shape))
  return out


def _pg_logps(x: TokenInputs, ratio: str) -> tuple[jax.Array, jax.Array]:
  """(log-probs, old log-probs) whose exp-difference is the importance ratio: per token, or GSPO's per sequence."""
  if ratio == "token":
    return x.logp, x.old_logp
  if ratio == "sequence":
    return gspo_token_logp(x.logp, x.old_logp, SELECTORS["own"](x)), jnp.zeros_like(x.old_logp)
  raise ValueError(f"importance ratio {ratio!r} is unknown (known: token, sequence)")


def _is_weight(x: TokenInputs, cap: float, level: str, mode: str) -> jax.Array:
  if x.sampler_logp is None:
    raise ValueError("rollout importance sampling (loss.tis_cap) needs the sampler's log-probs: a phase that samples")
  return rollout_is_weight(x.old_logp, x.sampler_logp, SELECTORS["own"](x), cap=cap, level=level, mode=mode)


def _reference_kl(x: TokenInputs, estimator: str) -> jax.Array:
  if x.ref_logp is None:
    raise ValueError("the reference_kl loss needs the reference policy's log-probs (ref_logp)")
  return kl_estimate(x.logp, x.ref_logp, estimator)


def _srft_reinforce(x: TokenInputs, correct: float, wrong: float) -> jax.Array:
  """SRFT on the model's own tokens: -w log p, w = correct * sg(exp(H)) on a row with reward 1, `wrong` otherwise;
  H the row's mean token entropy (docs/algorithm.md#srft)."""
  h = jax.lax.stop_gradient(row_mean(x.entropy, x.response_mask))
  w = jnp.where((x.rewards == 1.0)[:, None], correct * jnp.exp(h), wrong)
  return -w * x.logp


def _prefix_rft_surrogate(x: TokenInputs, clip_eps: float, dual_clip: float,
                          entropy_drop: float | jax.Array) -> jax.Array:
  """The dual-clip PPO surrogate on imitated expert tokens, whose advantage survives only on those outside the
  lowest-entropy `entropy_drop` share of the micro-batch's imitated tokens (docs/algorithm.md#prefix-rft); the
  advantage is the row's, or its prefix's where the batch has one apart (x.prefix_advantages). `entropy_drop`: a
  constant, or the step's value of a schedule (Term.inputs)."""
  imitated = SELECTORS["imitated"](x)
  keep = top_share(jax.lax.stop_gradient(x.entropy), imitated, entropy_drop)
  advantages = x.advantages if x.prefix_advantages is None else x.prefix_advantages
  return policy_gradient_loss(x.logp, x.old_logp, jnp.where(keep, advantages[:, None], 0.0), clip_eps=clip_eps,
                              dual_clip=dual_clip)


@dataclasses.dataclass(frozen=True)
class TokenLoss:
  """An entry of TOKEN_LOSSES: a per-token loss and what it reports.

  loss(x, **params) -> [B, T], params the term's constants and scheduled inputs (Term.params, Term.inputs).
  metrics(x, **params) -> {name: reduction.Metric}: what the term measures, reported with the objective's metrics.
  threshold(**constants) -> a token probability the loss treats as a boundary, marked in the figure of token
  probabilities (train/metrics.py plot_token_probs).
  """
  loss: Callable[..., jax.Array]
  metrics: Callable[..., dict[str, reduction.Metric]] | None = None
  threshold: Callable[..., float] | None = None

  def __call__(self, x: TokenInputs, **params) -> jax.Array:
    return self.loss(x, **params)


def _trsft_metrics(x: TokenInputs, alpha: float) -> dict[str, reduction.Metric]:
  """The share of imitated tokens outside TrSFT's trust region, p < alpha (the paper's training-dynamics figure)."""
  p = jnp.exp(jax.lax.stop_gradient(x.logp))
  return {"expert_frac_below_alpha": reduction.token_mean((p < alpha).astype(jnp.float32), SELECTORS["imitated"](x))}


TOKEN_LOSSES = {
    "policy_gradient": TokenLoss(_policy_gradient, metrics=policy_gradient_metrics),
    "trsft": TokenLoss(lambda x, alpha: trsft_loss(x.logp, alpha), metrics=_trsft_metrics,
                       threshold=lambda alpha: alpha),
    "nll": TokenLoss(lambda x: sft_loss(x.logp)),
    "luffy_shaped": TokenLoss(lambda x, gamma: luffy_offpolicy_loss(x.logp, x.advantages[:, None], gamma)),
    "entropy": TokenLoss(lambda x: x.entropy),
    "reference_kl": TokenLoss(_reference_kl),
    "prefix_rft_surrogate": TokenLoss(_prefix_rft_surrogate),
    "phi_nll": TokenLoss(lambda x: phi_weighted_nll(x.logp)),
    # SRFT's demonstration loss: -sg(exp(-H)) log p, H the row's mean token entropy.
    "entropy_weighted_nll": TokenLoss(
        lambda x: -jax.lax.stop_gradient(jnp.exp(-row_mean(x.entropy, x.response_mask))) * x.logp),
    "srft_reinforce": TokenLoss(_srft_reinforce),
}


@dataclasses.dataclass(frozen=True)
class Term:
  """One term of an objective: weight * aggregate(loss on the selected tokens).

  tokens: a SELECTORS key. loss: a TOKEN_LOSSES key, called with `params` as keyword arguments. weight: a number,
  or a schedule (a hashable callable of the optimizer step) evaluated on the host and fed to the jitted step as an
  array, so a changing weight never recompiles. aggregation: see `aggregate`; "seq_sum_over_max_len" is also
  multiplied by the run's `seq_scale`. over: which tokens count in a token mean's denominator: "response" (all
  response tokens of the micro-batch, as the official combined loss tensor) or "selected" (the term's own).
  inputs: parameters of the per-token loss that follow the step, (name, schedule) pairs, each schedule a hashable
  callable of the optimizer step: evaluated on the host like a scheduled weight and fed to the jitted step behind
  the weights, so they never recompile either (Prefix-RFT's entropy-mask share).
  """
  name: str
  tokens: str
  loss: str
  weight: float | Callable[[int], float] = 1.0
  aggregation: str = "seq_sum_over_max_len"
  over: str = "response"
  params: tuple[tuple[str, Any], ...] = ()
  inputs: tuple[tuple[str, Callable[[int], float]], ...] = ()

  def weight_at(self, step: int) -> float:
    return float(self.weight(step) if callable(self.weight) else self.weight)

  def inputs_at(self, step: int) -> dict[str, float]:
    return {name: float(schedule(step)) for name, schedule in self.inputs}


@dataclasses.dataclass(frozen=True)
class Objective:
  """The terms of one training phase and the normaliser they share."""
  terms: tuple[Term, ...]
  max_len: int = 8192  # L_max of the seq_sum_over_max_len aggregation
  seq_scale: float = 8.0  # official: sum / (L_max * 8) over 64 sequences = 8 x the sequence mean of sum / L_max

  @property
  def threshold(self) -> float | None:
    """The token probability the first term whose loss declares one treats as a boundary (TokenLoss.threshold), if
    any."""
    marks = [TOKEN_LOSSES[t.loss].threshold(**dict(t.params)) for t in self.terms if TOKEN_LOSSES[t.loss].threshold]
    return marks[0] if marks else None

  @property
  def num_weights(self) -> int:
    """The length of `weights_at`: a weight per term, then each term's scheduled inputs."""
    return len(self.terms) + sum(len(t.inputs) for t in self.terms)

  def weights_at(self, step: int) -> jax.Array:
    """[num_weights] float32: each term's weight at optimizer step `step`, then the values of the terms' scheduled
    inputs in term order (an input of the jitted step)."""
    values = [t.weight_at(step) for t in self.terms]
    values += [v for t in self.terms for v in t.inputs_at(step).values()]
    return jnp.asarray(values, jnp.float32)


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
  if term.aggregation == "global_token_mean" and term.over != "response":
    raise ValueError(f"term {term.name!r}: global_token_mean counts the batch's response tokens: needs over='response'")
  both = sorted({n for n, _ in term.inputs} & {n for n, _ in term.params})
  if both:
    raise ValueError(f"term {term.name!r}: {', '.join(both)} is both a constant and a scheduled input")


def term_value(x: TokenInputs, term: Term, max_len: int, seq_scale: float,
               inputs: dict[str, jax.Array] | None = None) -> jax.Array:
  """aggregate(loss on the selected tokens), unweighted (scalar). inputs: the values of the term's scheduled
  inputs this step (Term.inputs)."""
  selected = SELECTORS[term.tokens](x)
  per_token = TOKEN_LOSSES[term.loss](x, **dict(term.params), **(inputs or {}))
  scale = seq_scale if term.aggregation == "seq_sum_over_max_len" else 1.0
  # Reduced over the response mask (unless `over` says otherwise), as the official combined pg_losses tensor:
  # every aggregation is linear in the per-token values for a fixed mask, so terms add up to the aggregate of
  # their sum.
  over = x.response_mask if term.over == "response" else selected
  return scale * aggregate(jnp.where(selected, per_token, 0.0), over, term.aggregation, max_len, x.batch_tokens)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def objective_loss(x: TokenInputs, objective: Objective,
                   weights: jax.Array) -> tuple[jax.Array, dict[str, reduction.Metric]]:
  """sum_i weights[i] * term_i over response-aligned [B, T] inputs -> (loss, metrics). weights [num_weights]
  (Objective.weights_at): a weight per term, then the terms' scheduled inputs.

  Metrics, each carrying its reduction over micro-batches (trapo_jax/reduction.py): each term's unweighted value
  (`loss/<name>`), the token-mean entropy, the probabilities the policy gives imitated expert tokens and its own
  tokens (token means, their token counts alongside), and what each term's loss declares (TokenLoss.metrics).
  """
  x = dataclasses.replace(x, prefix_mask=x.prefix_mask.astype(bool) & x.response_mask.astype(bool),
                          off_loss_mask=x.off_loss_mask.astype(bool), response_mask=x.response_mask.astype(bool))
  loss = None
  metrics = {}
  at = len(objective.terms)  # the scheduled inputs follow the weights, in term order
  declared = {}
  for i, term in enumerate(objective.terms):
    inputs = {name: weights[at + j] for j, (name, _) in enumerate(term.inputs)}
    at += len(term.inputs)
    value = term_value(x, term, objective.max_len, objective.seq_scale, inputs)
    metrics[f"loss/{term.name}"] = reduction.mean(value)
    loss = weights[i] * value if loss is None else loss + weights[i] * value
    entry = TOKEN_LOSSES[term.loss]
    if entry.metrics is not None:
      declared.update(entry.metrics(x, **dict(term.params), **inputs))
  imitated, own = SELECTORS["imitated"](x), SELECTORS["own"](x)
  p = jnp.exp(jax.lax.stop_gradient(x.logp))
  metrics.update({
      "loss": reduction.mean(loss),
      "entropy": reduction.mean(jax.lax.stop_gradient(_masked_mean(x.entropy, x.response_mask))),
      "expert_prob": reduction.token_mean(p, imitated),
      "own_prob": reduction.token_mean(p, own),
      "num_prefix_tokens": reduction.total(jnp.sum(imitated.astype(jnp.float32))),
      "num_own_tokens": reduction.total(jnp.sum(own.astype(jnp.float32))),
  })
  metrics.update(declared)
  return loss, metrics


def mismatch_metrics(trainer_logp: jax.Array, sampler_logp: jax.Array,
                     mask: jax.Array) -> dict[str, reduction.Metric]:
  """|log pi_train - log pi_sampler| over the masked (generated) tokens: its token mean and its max."""
  gap = jnp.where(mask.astype(bool), jnp.abs(jax.lax.stop_gradient(trainer_logp) - sampler_logp), 0.0)
  return {"mismatch/abs_logp_mean": reduction.token_mean(gap, mask),
          "mismatch/abs_logp_max": reduction.maximum(jnp.max(gap))}
