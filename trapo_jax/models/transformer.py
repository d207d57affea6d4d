"""A decoder-only transformer covering the Qwen2, Qwen3 and Llama families from one `ModelConfig`.

RMSNorm, rotary embeddings (θ and the frequency scalings of `rope.py`), grouped-query attention with optional q/k/v
bias and optional per-head RMSNorm of queries and keys (Qwen3), SwiGLU MLP, tied or untied embeddings. Layers are
one `nn.scan` (one compiled layer, fast compiles for 28-layer models) or a Python loop.

Compiled for CPU (`on_cpu`), every projection multiplies the rows of its input flattened to [B*T, D] (`_project`),
which XLA:CPU differentiates without transposing the activations; on GPU and TPU a layer works on [B, T, D].

One call serves training, prefill and decode: keys live in slots, a query at slot s sees the valid keys at slots
<= s. Without a cache the slots are the input positions; with a `KVCache` the input is written at slot `cache.end`.
Every weight carries logical axis names; `trapo_jax.sharding` maps them to the device mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trapo_jax.models import rope

Params = Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: rope.RopeScaling = rope.RopeScaling()  # Llama 3.x: llama3; long-context Qwen: yarn
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True  # Qwen2: bias on q/k/v; Llama, Qwen3: none
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of every query and key head, before RoPE
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  model_type: str = "qwen2"
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # none | full | dots
  scan_layers: bool = True
  platform: str = ""  # the backend the programs are compiled for; "" is JAX's default (--mode=compile: its target's)
  attention_block: int = 512  # longer inputs (training, prefill) attend one query block at a time
  attention_unroll: bool = False  # blocks unrolled, not looped: for cost estimates (XLA counts a loop body once)

  @classmethod
  def from_config(cls, model_cfg) -> "ModelConfig":
    """From the `model` group of an experiment config (random-init sizes; a zero rope_theta or
    max_position_embeddings takes the default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: model_cfg[k] for k in model_cfg.keys() if k in names}
    kwargs = {k: v for k, v in kwargs.items() if v or k not in ("rope_theta", "max_position_embeddings")}
    if "rope_scaling" in kwargs:
      kwargs["rope_scaling"] = rope.RopeScaling(**kwargs["rope_scaling"])
    return cls(**kwargs)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def num_params(self) -> int:
    d, f, h, kv, hd = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
    attn = d * hd * (h + 2 * kv) + h * hd * d + (hd * (h + 2 * kv) if self.qkv_bias else 0)
    layer = attn + 3 * d * f + 2 * d + (2 * hd if self.qk_norm else 0)
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * layer + emb + d


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer. Slots [0, end) are written; `valid` marks the ones holding real tokens."""
  k: jax.Array  # [layers, B, kv_heads, S, head_dim]
  v: jax.Array  # [layers, B, kv_heads, S, head_dim]
  valid: jax.Array  # [B, S] bool
  end: jax.Array  # [] int32: the next slot to write, shared by all rows

  @classmethod
  def logical_axes(cls) -> "KVCache":
    """Each field's logical axes (trapo_jax/sharding.py maps them to the mesh): rows over the batch shards, KV heads
    over tensor, slots and head_dim whole."""
    spec = jax.sharding.PartitionSpec
    kv = spec("layers", "activation_batch", "activation_kv_heads", "activation_length", "activation_head_dim")
    return cls(k=kv, v=kv, valid=spec("activation_batch", "activation_length"), end=spec())

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, size: int) -> "KVCache":
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, size, cfg.head_dim)
    dt = jnp.dtype(cfg.dtype)
    return cls(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), valid=jnp.zeros((batch, size), bool),
               end=jnp.zeros((), jnp.int32))


def _dense(features: int, axes: tuple[str, str], cfg: ModelConfig, name: str, use_bias: bool = False):
  return nn.Dense(
      features, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def on_cpu(cfg: ModelConfig) -> bool:
  """Whether the programs are compiled for the CPU backend: cfg.platform, or JAX's default backend."""
  return (cfg.platform or jax.default_backend()) == "cpu"


def _project(layer: nn.Dense, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """layer(x) for x [B, T, D]; on CPU (`on_cpu`) as one matmul of the rows [B*T, D].

  Why: the weight's gradient then contracts one axis of rows, not two (B and T). XLA:CPU turns a two-axis contraction
  into a transposed copy of the wide operand and a matmul; for the MLP's gate and up that is a [B*T, F] copy each, and
  these copies took a third of tiny10m's forward+backward (docs/performance.md, "Against Tunix"). For TPU the flat form
  made the 7B config's 2-layer train step plan 0.26 GiB more temporary memory per v5p chip (9.70 GiB, not 9.43), so
  there a layer keeps [B, T, D].
  """
  if not on_cpu(cfg):
    return layer(x)
  return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], layer.features)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    # The variance is taken in fp32 whatever the compute dtype, as in the reference implementation.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def attention_mask(kv_valid: jax.Array, q_slots: jax.Array) -> jax.Array:
  """[B, S] valid keys and [T] query slots -> [B, 1, T, S] causal mask over slots."""
  causal = jnp.arange(kv_valid.shape[1])[None, :] <= q_slots[:, None]
  return (kv_valid[:, None, :] & causal[None])[:, None]


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array, q_slots: jax.Array,
                        block: int, unroll: bool = False) -> jax.Array:
  """Causal attention of q [B, T, H, Dh] over k, v [B, S, K, Dh], one rematerialised block of queries at a time.

  Scores exist for one [B, H, block, S] block at a time, forward and backward, instead of [B, H, T, S]: a 9216-token
  7B sequence would otherwise need tens of GiB per layer for them.
  """
  b, t, h, d = q.shape
  n = -(-t // block)
  pad = n * block - t
  qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block, h, d).swapaxes(0, 1)
  slots = jnp.pad(q_slots, (0, pad), constant_values=-1).reshape(n, block)

  @jax.checkpoint
  def one(args):
    qc, sl = args
    return jax.nn.dot_product_attention(qc, k, v, mask=attention_mask(kv_valid, sl))

  out = jnp.stack([one((qb[i], slots[i])) for i in range(n)]) if unroll else jax.lax.map(one, (qb, slots))
  return out.swapaxes(0, 1).reshape(b, n * block, h, d)[:, :t]


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q [B, T, H, Dh] over a head-major cache k, v [B, K, S, Dh] (K kv heads, H = K * G), mask [B, 1, T, S].

  Each (row, kv head) is one plain matmul of its G*T queries against a contiguous [S, Dh] key block. On CPU this
  is 4x faster at decode (T = 1) than jax.nn.dot_product_attention over a [B, S, K, Dh] cache, whose batched dot
  carries the degenerate T axis.
  """
  b, t, h, d = q.shape
  kv, g = k.shape[1], h // k.shape[1]
  qg = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
  scores = jnp.einsum("bkqd,bksd->bkqs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) / np.sqrt(d)
  scores = jnp.where(mask[:, :, None], scores.reshape(b, kv, g, t, -1), jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kv, g * t, -1)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v.astype(q.dtype))
  return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def blockwise_cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: jax.Array, q_slots: jax.Array,
                               block: int, unroll: bool = False) -> jax.Array:
  """`cached_attention` of q [B, T, H, Dh] over a head-major cache k, v [B, K, S, Dh], one block of queries at a time;
  kv_valid [B, S], q_slots [T] build each block's mask.

  A prefill (T context tokens written into the cache) would otherwise hold [B, H, T, S] fp32 scores and a [B, T, S]
  mask at once: for 4 rows of Qwen2.5-7B's 28 heads, a 16k-token context over 24k slots, 168 GiB. A block holds [B, H, block, S].
  Each query's scores, softmax and sum over the keys are those of `cached_attention`: no online softmax reorders them.
  """
  b, t, h, d = q.shape
  n = -(-t // block)
  pad = n * block - t
  qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block, h, d).swapaxes(0, 1)
  slots = jnp.pad(q_slots, (0, pad), constant_values=-1).reshape(n, block)  # padded queries see no key
  one = lambda args: cached_attention(args[0], k, v, attention_mask(kv_valid, args[1]))
  out = jnp.stack([one((qb[i], slots[i])) for i in range(n)]) if unroll else jax.lax.map(one, (qb, slots))
  return out.swapaxes(0, 1).reshape(b, n * block, h, d)[:, :t]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, sin, cos, mask, cache, layer, write_at):
    """mask: [B, 1, T, S] bool, or for long inputs (kv_valid [B, S], query slots [T]) to build per block.

    cache: None, or the stacked (k, v) [layers, B, kv_heads, S, Dh] of all layers, updated at `layer`.
    """
    cfg = self.cfg
    b, t, _ = x.shape
    q = _project(_dense(cfg.num_heads * cfg.head_dim, ("embed", "heads"), cfg, "q_proj", cfg.qkv_bias), x, cfg)
    k = _project(_dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg, "k_proj", cfg.qkv_bias), x, cfg)
    v = _project(_dense(cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), cfg, "v_proj", cfg.qkv_bias), x, cfg)
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
      norm = functools.partial(RMSNorm, cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))
      q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
    heads = ("activation_batch", "activation_length", "activation_heads", None)
    q = nn.with_logical_constraint(rope.apply_rope(q, sin, cos), heads)
    k = nn.with_logical_constraint(rope.apply_rope(k, sin, cos), heads)
    v = nn.with_logical_constraint(v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), heads)
    if cache is None and isinstance(mask, tuple):
      out = blockwise_attention(q, k, v, *mask, block=cfg.attention_block, unroll=cfg.attention_unroll)
    elif cache is None:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:
      # Update the stacked cache in place (it is a loop carry) rather than slicing a layer out and stacking it
      # back, which would copy every layer's cache at every decode step.
      k_all, v_all = cache
      at = (layer, 0, 0, write_at, 0)
      k_all = jax.lax.dynamic_update_slice(k_all, k.transpose(0, 2, 1, 3)[None].astype(k_all.dtype), at)
      v_all = jax.lax.dynamic_update_slice(v_all, v.transpose(0, 2, 1, 3)[None].astype(v_all.dtype), at)
      cache = (k_all, v_all)
      # The mask may cover only the first slots of the cache (Decoder's `attend`): read no slot beyond it.
      s = (mask[0] if isinstance(mask, tuple) else mask).shape[-1]
      k_seen, v_seen = k_all[layer, :, :, :s], v_all[layer, :, :, :s]
      if isinstance(mask, tuple):  # a long prefill
        out = blockwise_cached_attention(q, k_seen, v_seen, *mask, block=cfg.attention_block,
                                         unroll=cfg.attention_unroll)
      else:
        out = cached_attention(q, k_seen, v_seen, mask)
    out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
    return _project(_dense(cfg.hidden_size, ("heads", "embed"), cfg, "o_proj"), out, cfg), cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = _project(_dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "gate_proj"), x, cfg)
    up = _project(_dense(cfg.intermediate_size, ("embed", "mlp"), cfg, "up_proj"), x, cfg)
    # Keep the wide activation split over the batch (FSDP) so that weight gradients are reduced, not the
    # activations gathered.
    h = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return _project(_dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj"), h, cfg)


class DecoderLayer(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, layer, sin, cos, mask, write_at):
    """carry: (x [B, T, D], cache or None); layer: this layer's index (scanned)."""
    x, cache = carry
    cfg = self.cfg
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))
    h, cache = Attention(cfg, name="self_attn")(norm(name="input_layernorm")(x), sin, cos, mask, cache, layer,
                                                write_at)
    x = x + h
    x = x + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return (x, cache), None


def _layer_class(cfg: ModelConfig):
  if cfg.remat == "none":
    return DecoderLayer
  policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(DecoderLayer, policy=policy, prevent_cse=not cfg.scan_layers, static_argnums=())


class Decoder(nn.Module):
  """tokens [B, T] -> final hidden states [B, T, D] (`forward_logits` or `losses.token_logprobs` on top)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
                          param_dtype=jnp.dtype(cfg.param_dtype), name="embed",
                          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    layer = _layer_class(cfg)
    if cfg.scan_layers:
      self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      self.layers = [layer(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype), name="norm")
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, "lm_head")

  def __call__(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: KVCache | None = None, attend: int | None = None) -> tuple[jax.Array, KVCache | None]:
    """tokens, positions [B, T] int, mask [B, T] bool (real tokens) -> hidden [B, T, D], updated cache.

    attend: a static bound on the cache slots this call can see (all written slots must lie below it). Decoding
    is bound by reading the cache, so a sampler that knows how far the cache is filled passes it.
    """
    cfg = self.cfg
    t = tokens.shape[1]
    x = self.embed(tokens)
    sin, cos = rope.rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    if cache is None:
      write_at = jnp.zeros((), jnp.int32)
      kv_valid, layer_caches = mask, None
    else:
      write_at = cache.end
      kv_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, write_at))
      layer_caches = (cache.k, cache.v)
    q_slots = write_at + jnp.arange(t)
    # Training and prefill alike attend one block of queries at a time when the input is long; a decode step's
    # one token attends at once.
    seen = kv_valid[:, :attend]
    attn_mask = (seen, q_slots) if t > cfg.attention_block else attention_mask(seen, q_slots)
    carry = (x, layer_caches)
    if cfg.scan_layers:
      carry, _ = self.layers(carry, jnp.arange(cfg.num_layers), sin, cos, attn_mask, write_at)
    else:
      for i, layer in enumerate(self.layers):
        carry, _ = layer(carry, i, sin, cos, attn_mask, write_at)
    x, layer_caches = carry
    x = self.norm(x)
    if self.is_initializing() and not cfg.tie_embeddings:
      self.lm_head(x[:, :1])  # the head is applied outside (chunked log-probs); create its weights here
    if cache is not None:
      cache = KVCache(k=layer_caches[0], v=layer_caches[1], valid=kv_valid, end=write_at + t)
    return x, cache


def unembed(params: Params, cfg: ModelConfig) -> jax.Array:
  """The output projection [D, V] of a parameter tree (the transposed embedding when tied)."""
  p = params["params"] if "params" in params else params
  return p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """Random parameters, boxed with their logical axis names (nn.Partitioned); `nn.unbox` strips them."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Decoder(cfg).init(rng, tokens, tokens, jnp.ones((1, 1), bool))


def abstract_params(cfg: ModelConfig) -> Params:
  """The boxed parameter tree as shapes (jax.ShapeDtypeStruct leaves with their logical axes); computes nothing."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Positions that skip padding: left padding does not shift a row's real tokens. [B, T] -> [B, T] int32."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Full-sequence hidden states [B, T, D] for tokens [B, T] with padding mask [B, T]."""
  hidden, _ = Decoder(cfg).apply(params, tokens, positions_from_mask(mask), mask.astype(bool))
  return hidden


def forward_logits(params: Params, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array) -> jax.Array:
  hidden = forward(params, cfg, tokens, mask)
  return jnp.einsum("btd,dv->btv", hidden, unembed(params, cfg).astype(hidden.dtype),
                    preferred_element_type=jnp.float32)
