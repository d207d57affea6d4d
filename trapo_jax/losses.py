"""Loss kernels: pure functions of arrays, one per term of the objective (spec §1, §5).

Every per-token loss is [B, T] and response-aligned; masks select where it applies and `aggregate` reduces it.
Shapes: B sequences, T response tokens, D hidden size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

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
  """Columns per backward chunk: about as many logits as a forward chunk, preferably dividing V exactly."""
  target = max(128, min(vocab, chunk_size * vocab // max(n_tokens, 1)))
  for k in range(-(-vocab // target), min(vocab, 4 * (-(-vocab // target))) + 1):
    if vocab % k == 0:
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
    target_z = jnp.take_along_axis(z, yc[..., None], axis=-1)[..., 0]
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
  w = jnp.pad(unembed, ((0, 0), (0, nv * vc - v)))

  def step(carry, j):
    dh, dw = carry
    wc = jax.lax.dynamic_slice_in_dim(w, j * vc, vc, axis=1).astype(h.dtype)
    col = j * vc + jnp.arange(vc)[None]
    logp = jnp.dot(h, wc, preferred_element_type=jnp.float32) / temperature - lz
    p = jnp.where(col < v, jnp.exp(logp), 0.0)
    dz = (jnp.where(col == y, gl, 0.0) - p * (gl + ge * (logp + ent))) / temperature
    dh = dh + jnp.dot(dz.astype(h.dtype), wc.T, preferred_element_type=jnp.float32)
    dwc = jnp.dot(h.T, dz.astype(h.dtype), preferred_element_type=jnp.float32).astype(dw.dtype)
    return (dh, jax.lax.dynamic_update_slice_in_dim(dw, dwc, j * vc, axis=1)), None

  init = (jnp.zeros((n, d), jnp.float32), jnp.zeros((d, nv * vc), unembed.dtype))
  (dh, dw), _ = jax.lax.scan(step, init, jnp.arange(nv))
  return dh.reshape(b, t, d).astype(hidden.dtype), dw[:, :v], None


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
  """TrSFT (spec §1.1): -p / sg(max(p, alpha)).

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
  """-A * exp(logp - old_logp) (spec §1.2, no clip by default); with clip_eps the PPO clipped surrogate."""
  ratio = jnp.exp(logp - old_logp)
  loss = -advantages * ratio
  if clip_eps is None:
    return loss
  return jnp.maximum(loss, -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps))


def luffy_offpolicy_loss(logp: jax.Array, advantages: jax.Array, gamma: float = 0.1) -> jax.Array:
  """LUFFY's policy shaping on demonstration tokens (spec §5): -A * p / (p + gamma), no stop-gradient."""
  p = jnp.exp(logp)
  return -advantages * p / (p + gamma)


# ----------------------------------------------------------------------------------------------------------------
# Advantages and aggregation.


def group_advantages(rewards: jax.Array, group_ids: jax.Array, *, use_std: bool = False,
                     eps: float = 1e-6) -> jax.Array:
  """rewards [N], group ids [N] (ints in [0, N)) -> reward minus its group mean [N] (GRPO, spec §1.2).

  With use_std, divided by (group std + eps); the std is unbiased (ddof=1) as torch.std in the official code. A
  group of one gets 0.
  """
  rewards = rewards.astype(jnp.float32)
  n = rewards.shape[0]
  count = jax.ops.segment_sum(jnp.ones_like(rewards), group_ids, num_segments=n)
  mean = jax.ops.segment_sum(rewards, group_ids, num_segments=n) / jnp.maximum(count, 1.0)
  centred = rewards - mean[group_ids]
  size = count[group_ids]
  if use_std:
    var = jax.ops.segment_sum(centred ** 2, group_ids, num_segments=n)[group_ids] / jnp.maximum(size - 1.0, 1.0)
    centred = centred / (jnp.sqrt(var) + eps)
  return jnp.where(size > 1, centred, 0.0)


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
# The combined objective.


@dataclasses.dataclass(frozen=True)
class LossConfig:
  prefix_loss: str = "trsft"  # trsft | sft | luffy | none: the loss on expert-prefix tokens
  alpha: float = 0.1
  luffy_gamma: float = 0.1
  clip_eps: float | None = None
  entropy_coef: float = 0.001
  aggregation: str = "seq_sum_over_max_len"
  max_len: int = 8192
  seq_scale: float = 8.0  # official: sum / (L_max * 8) over 64 sequences = 8 x the sequence mean of sum / L_max

  @classmethod
  def from_config(cls, loss_cfg, max_len: int) -> "LossConfig":
    """From the `loss` group of an experiment config and the response length L_max."""
    return cls(prefix_loss=loss_cfg.prefix_loss, alpha=float(loss_cfg.alpha), luffy_gamma=float(loss_cfg.luffy_gamma),
               clip_eps=None if loss_cfg.clip_eps < 0 else float(loss_cfg.clip_eps),
               entropy_coef=float(loss_cfg.entropy_coef), aggregation=loss_cfg.aggregation, max_len=int(max_len),
               seq_scale=float(loss_cfg.seq_scale))


def prefix_token_loss(logp: jax.Array, advantages: jax.Array, cfg: LossConfig) -> jax.Array:
  """The loss on imitated expert-prefix tokens, per cfg.prefix_loss. advantages [B, 1]."""
  if cfg.prefix_loss == "trsft":
    return trsft_loss(logp, cfg.alpha)  # weight +1: the sample's advantage is ignored (spec §1.1)
  if cfg.prefix_loss == "sft":
    return sft_loss(logp)
  if cfg.prefix_loss == "luffy":
    return luffy_offpolicy_loss(logp, advantages, cfg.luffy_gamma)
  if cfg.prefix_loss == "none":
    return jnp.zeros_like(logp)
  raise ValueError(f"prefix_loss {cfg.prefix_loss!r} is unknown")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def trapo_loss(logp: jax.Array, old_logp: jax.Array, entropy: jax.Array, advantages: jax.Array,
               prefix_mask: jax.Array, off_loss_mask: jax.Array, response_mask: jax.Array,
               cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The step objective (spec §1.3) over response-aligned [B, T] arrays and per-sequence advantages [B].

  pg_losses = prefix_loss * (off_loss_mask * prefix_mask) + policy_gradient * (1 - prefix_mask), masked by the
  response mask and aggregated; minus entropy_coef x the token-mean entropy of all response tokens. Prefix tokens
  with off_loss_mask = 0 get no loss. GRPO: no prefixes; LUFFY: prefix_loss="luffy" on the whole demo sample;
  SFT: prefix_mask = off_loss_mask = response_mask with prefix_loss="sft".
  """
  resp = response_mask.astype(bool)
  prefix = prefix_mask.astype(bool) & resp
  imitated = prefix & off_loss_mask.astype(bool)
  own = resp & ~prefix
  adv = advantages.astype(jnp.float32)[:, None]
  off = prefix_token_loss(logp, adv, cfg)
  on = policy_gradient_loss(logp, old_logp, adv, clip_eps=cfg.clip_eps)
  scale = cfg.seq_scale if cfg.aggregation == "seq_sum_over_max_len" else 1.0
  # Both parts are reduced over the response mask, as the official combined pg_losses tensor: every aggregation is
  # linear in the per-token values for a fixed mask, so the two parts add up to the aggregate of their sum.
  prefix_part = scale * aggregate(jnp.where(imitated, off, 0.0), resp, cfg.aggregation, cfg.max_len)
  pg_part = scale * aggregate(jnp.where(own, on, 0.0), resp, cfg.aggregation, cfg.max_len)
  mean_entropy = _masked_mean(entropy, resp)
  loss = prefix_part + pg_part - cfg.entropy_coef * mean_entropy
  p = jnp.exp(jax.lax.stop_gradient(logp))
  metrics = {
      "loss": loss,
      "pg_loss": pg_part,
      "prefix_loss": prefix_part,
      "entropy": jax.lax.stop_gradient(mean_entropy),
      "expert_prob": _masked_mean(p, imitated),
      "expert_frac_below_alpha": _masked_mean((p < cfg.alpha).astype(jnp.float32), imitated),
      "own_prob": _masked_mean(p, own),
      "num_prefix_tokens": jnp.sum(imitated.astype(jnp.float32)),
      "num_own_tokens": jnp.sum(own.astype(jnp.float32)),
  }
  return loss, metrics
