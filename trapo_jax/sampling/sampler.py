"""In-graph sampling: jitted prefill + `lax.while_loop` decode over a KV cache, with per-row forced prefixes.

Each output row is prompt ⊕ forced expert prefix ⊕ sampled continuation. The prompt and the prefix of a row form its
*context*; contexts are LEFT-padded into a bucket of width C so that every row's context ends at slot C-1 and all
rows decode in lockstep at the same cache slot (one dynamic_update_slice per step, no per-row scatter).

Why padded slots are never attended: the cache keeps `valid[b, s]`, false for left padding; the attention mask of
every query is `valid & (slot <= query slot)`, so a real token never sees a pad key. Pad *queries* do attend to
nothing but pads (outputs are garbage but finite) and their outputs are never read. Positions are counted over real
tokens only (`cumsum(mask) - 1`), so left padding shifts no row's rotary phases and the trainer, which lays out the
same tokens right-padded, computes the same log-probs.

`sample_shared` decodes several contexts of each prompt in one pass (docs/algorithm.md#one-pass): the prompt is
prefilled once, each of its prefixes extends that cache once (by the prefix tokens alone), and every row starts from
a copy of its context's cache, packed so that all contexts still end at one slot.

The response buffer [B, L] starts with the prefix and the continuation is written behind it; a row stops at an EOS
id or when prefix + continuation reaches L (the official assembly truncates prefix + continuation to L), or, with a
`continuation` cap, when it has generated that many tokens (a prefix in the prompt's budget, Prefix-RFT's: every row
decodes in lockstep from step 0, so the cap is the decode budget). Tokens after a row's end are `pad_id` and masked
out by `response_mask`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np

from trapo_jax import sharding
from trapo_jax.models import transformer as tfm
from trapo_jax.shapes import bucket


_DECODE_SEGMENTS = 4  # at most: more segments read less cache but compile one more loop body each
# A segment spans at least this many decode steps (the smallest shape bucket). Below it a segment saves a few slots a
# step, and its loop body costs as much to compile as a long one's: a tiny 3-step run's 9 decode programs compiled in
# 12.1 s at 4 segments, 6.2 s at 1 (XLA:CPU, 24-token responses).
_SEGMENT_MIN_STEPS = 16


def segment_stops(budget: int) -> list[int]:
  """The decode step each segment of a `budget`-step decode ends at: up to _DECODE_SEGMENTS equal segments of at
  least _SEGMENT_MIN_STEPS steps (one segment for a short budget)."""
  segments = max(1, min(_DECODE_SEGMENTS, budget // _SEGMENT_MIN_STEPS))
  return sorted({-(-budget * (i + 1) // segments) for i in range(segments)})


@flax.struct.dataclass
class SampledRows:
  """Sampler output; rows are prompt-major (the n samples of prompt i are rows i*n .. i*n+n-1)."""
  tokens: jax.Array  # [B*n, L] prefix + continuation, pad_id after the end
  prefix_mask: jax.Array  # [B*n, L] bool: forced expert tokens
  response_mask: jax.Array  # [B*n, L] bool: prefix + generated tokens up to and including EOS
  logprobs: jax.Array  # [B*n, L] fp32 log-prob of each generated token under softmax(logits / T); 0 elsewhere
  lengths: jax.Array  # [B*n] int32 response length (prefix included)
  eos: jax.Array  # [B*n] bool: the row ended with an EOS token (else it hit L)


@flax.struct.dataclass
class _State:
  step: jax.Array
  cache: tfm.KVCache
  logits: jax.Array  # [B, V] fp32: next-token logits of every row
  next_pos: jax.Array  # [B] position of the token to be sampled
  tokens: jax.Array  # [B, L]
  logprobs: jax.Array  # [B, L]
  lengths: jax.Array  # [B]
  done: jax.Array  # [B]
  eos: jax.Array  # [B]
  keys: jax.Array  # [B] one key per row: what a row samples does not depend on where it sits in the batch


def sample_logits(rng: jax.Array, logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """logits [B, V] fp32 -> tokens [B]; temperature 0 is greedy. top_k <= 0 and top_p >= 1 disable truncation.

  rng: one key for the batch, or [B] keys, one per row.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest set whose mass reaches top_p: a token stays if the mass before it is < top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  keys = rng if rng.shape == logits.shape[:1] else jax.random.split(rng, logits.shape[0])
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def cache_shardings(cfg: tfm.ModelConfig, mesh, rules=sharding.DEFAULT_RULES) -> tfm.KVCache:
  """The KV cache's NamedShardings from its logical axes; KV heads stay whole where tensor does not divide them."""
  named = flax.linen.logical_to_mesh_sharding(tfm.KVCache.logical_axes(), mesh, rules)
  kv = (cfg.num_layers, None, cfg.num_kv_heads, None, cfg.head_dim)
  return named.replace(k=sharding.dividing(named.k, kv), v=sharding.dividing(named.v, kv))


def _left_align(prompts, prompt_lens, prefixes, prefix_lens, width: int):
  """Right-padded prompts [B, P] and prefixes [B, K] -> left-padded contexts [B, width] and their mask."""
  total = prompt_lens + prefix_lens
  j = jnp.arange(width)[None, :] - (width - total)[:, None]  # index into the row's concatenated context
  in_prompt = (j >= 0) & (j < prompt_lens[:, None])
  in_prefix = (j >= prompt_lens[:, None]) & (j < total[:, None])
  from_prompt = jnp.take_along_axis(prompts, jnp.clip(j, 0, prompts.shape[1] - 1), axis=1)
  from_prefix = jnp.take_along_axis(prefixes, jnp.clip(j - prompt_lens[:, None], 0, prefixes.shape[1] - 1), axis=1)
  ctx = jnp.where(in_prompt, from_prompt, jnp.where(in_prefix, from_prefix, 0))
  return ctx.astype(jnp.int32), in_prompt | in_prefix


def decode_budget(max_len: int, shortest_prefix: int, continuation: int = 0) -> int:
  """Decode steps of a call whose shortest prefix (of the rows it generates) is `shortest_prefix`: the bucket of
  what the widest row can still write, at most max_len, or at most `continuation` where that caps every row's
  generated tokens (rows decode in lockstep from step 0, so no row generates more than the budget)."""
  cap = min(max_len, continuation) if continuation > 0 else max_len
  return bucket(min(max_len - shortest_prefix, cap), cap=cap)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = -1
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0


class Sampler:
  """Jitted prefill and decode for one model config (and optionally a mesh); compiled once per shape bucket."""

  def __init__(self, cfg: tfm.ModelConfig, *, mesh=None, rules=sharding.DEFAULT_RULES, gather_weights: bool = False):
    """gather_weights (with a mesh): the decode gathers the fsdp-sharded weights once, before its loop, in the compute
    dtype, rather than XLA gathering each layer's weights in every decode step (rollouts.gather_weights_default)."""
    self.cfg = cfg
    self.mesh = mesh
    self.rules = rules
    self._gathered = None
    self.traces: dict[str, int] = {"prefill": 0, "decode": 0}
    prefill, decode = {}, {}
    if mesh is not None:
      # Every input and output placed as stated: params by their logical axes, rows over the batch shards, the
      # cache by KVCache.logical_axes, the key and the step counter replicated.
      params = sharding.logical_shardings(tfm.abstract_params(cfg), mesh, rules)
      rows, rep = sharding.batch_sharding(mesh, 1), sharding.replicated(mesh)
      state = _State(step=rep, cache=cache_shardings(cfg, mesh, rules), logits=rows, next_pos=rows, tokens=rows,
                     logprobs=rows, lengths=rows, done=rows, eos=rows, keys=rows)
      prefill = dict(in_shardings=(params,) + (rows,) * 6 + (rep,), out_shardings=state)
      decode = dict(in_shardings=(params, state), out_shardings=(rows, state))
      if gather_weights:
        self._gathered = jax.tree.map(lambda s: sharding.without_axis(s, "fsdp"), params)
    # Static arguments are positional: jit takes no keyword arguments once shardings are stated.
    self._prefill = jax.jit(self._prefill_fn, static_argnums=(8, 9, 10, 11), **prefill)
    self._decode = jax.jit(self._decode_fn, static_argnums=(2, 3), donate_argnums=(1,), **decode)
    # The shared prefill takes the same inputs, shaped per prompt ([G], [G, X, L], [G, R]), split over prompts.
    self._prefill_shared = jax.jit(self._prefill_shared_fn, static_argnums=(8, 9, 10, 11, 12, 13), **prefill)

  @staticmethod
  @functools.lru_cache(maxsize=4)
  def shared(cfg: tfm.ModelConfig, *, mesh=None, rules=sharding.DEFAULT_RULES, gather_weights: bool = False):
    """The Sampler of these arguments, one per process: runs in one process (an evaluation after training, a
    notebook's runs, a test session's) reuse its traced and compiled programs instead of tracing them again."""
    return Sampler(cfg, mesh=mesh, rules=rules, gather_weights=gather_weights)

  # -- in-graph parts ---------------------------------------------------------------------------------------------
  def _prefill_fn(self, params, prompts, prompt_lens, prefixes, prefix_lens, active, row_ids, rng, width,
                  cache_size, n, sp):
    self.traces["prefill"] += 1  # runs at trace time only: counts compilations
    cfg = self.cfg
    resp_len = prefixes.shape[1]
    # An inactive row's response is its prefix as given; it is not generated, so it stays out of the context.
    ctx, mask = _left_align(prompts, prompt_lens, prefixes, jnp.where(active, prefix_lens, 0), width)
    cache = tfm.KVCache.zeros(cfg, ctx.shape[0], cache_size)
    # The context fills slots [0, width): its queries read none of the decode's slots behind it.
    hidden, cache = tfm.Decoder(cfg).apply(params, ctx, tfm.positions_from_mask(mask), mask, cache, attend=width)
    logits = jnp.einsum("bd,dv->bv", hidden[:, -1], tfm.unembed(params, cfg).astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    # The n samples of a prompt share its prefill: repeat cache and logits, prompt-major.
    rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis)
    cache = tfm.KVCache(k=rep(cache.k, 1), v=rep(cache.v, 1), valid=rep(cache.valid), end=cache.end)
    prefix_lens = rep(jnp.minimum(prefix_lens, resp_len))
    tokens = jnp.where(jnp.arange(resp_len)[None] < prefix_lens[:, None], rep(prefixes), sp.pad_id)
    last = jnp.take_along_axis(tokens, jnp.maximum(prefix_lens - 1, 0)[:, None], axis=1)[:, 0]
    ends_eos = (prefix_lens > 0) & jnp.isin(last, jnp.asarray(sp.eos_ids or (-1,), jnp.int32))
    return _State(step=jnp.zeros((), jnp.int32), cache=cache, logits=rep(logits),
                  next_pos=rep(prompt_lens) + prefix_lens, tokens=tokens.astype(jnp.int32),
                  logprobs=jnp.zeros(tokens.shape, jnp.float32), lengths=prefix_lens.astype(jnp.int32),
                  done=ends_eos | (prefix_lens >= resp_len) | ~rep(active), eos=ends_eos,
                  keys=jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.fold_in, (None, 0))(rng, rep(row_ids)),
                                                    jnp.tile(jnp.arange(n), row_ids.shape[0])))

  def _prefill_shared_fn(self, params, prompts, prompt_lens, prefixes, prefix_lens, row_ids, sample_ids, rng,
                         prompt_width, prefix_width, width, cache_size, branches, sp):
    """Each prompt's KV once, each of its prefixes' KV once on top of it, then one row per entry of `branches`.

    prompts [G, P], prompt_lens [G]; prefixes [G, X, L], prefix_lens [G, X]; row_ids, sample_ids [G, R]. The prompt
    is prefilled left-padded into slots [0, prompt_width), each prefix, on a copy of its cache, left-padded into
    [prompt_width, prompt_width + prefix_width). Then every context is packed into `width` slots, its real tokens
    in order and ending at slot width - 1: a key and value do not depend on their slot (positions went into them),
    so all rows decode in lockstep with no invalid slots inside a context, and no row reads more slots than the
    longest context needs.
    """
    self.traces["prefill_shared"] = self.traces.get("prefill_shared", 0) + 1
    cfg = self.cfg
    g, x, resp_len = prefixes.shape
    span = prompt_width + prefix_width
    head = lambda h: jnp.einsum("bd,dv->bv", h, tfm.unembed(params, cfg).astype(h.dtype),
                                preferred_element_type=jnp.float32)
    no_prefix = jnp.zeros_like(prompt_lens)
    ctx, mask = _left_align(prompts, prompt_lens, prompts[:, :1], no_prefix, prompt_width)
    cache = tfm.KVCache.zeros(cfg, g, span)
    hidden, cache = tfm.Decoder(cfg).apply(params, ctx, tfm.positions_from_mask(mask), mask, cache,
                                           attend=prompt_width)
    logits = head(hidden[:, -1])
    ks, vs, all_logits = [cache.k[:, :, None]], [cache.v[:, :, None]], [logits[:, None]]
    if x:
      rep = lambda a, axis=0: jnp.repeat(a, x, axis=axis)
      flat, flat_lens = prefixes.reshape(g * x, resp_len), prefix_lens.reshape(g * x)
      pctx, pmask = _left_align(flat, flat_lens, flat[:, :1], jnp.zeros_like(flat_lens), prefix_width)
      positions = rep(prompt_lens)[:, None] + tfm.positions_from_mask(pmask)
      ext = tfm.KVCache(k=rep(cache.k, 1), v=rep(cache.v, 1), valid=rep(cache.valid), end=cache.end)
      hidden, ext = tfm.Decoder(cfg).apply(params, pctx, positions, pmask, ext)
      # An empty prefix leaves its context the bare prompt: the last slot then holds a pad, not a token.
      ext_logits = jnp.where(flat_lens[:, None] > 0, head(hidden[:, -1]), rep(logits))
      split = lambda a, axis: a.reshape(a.shape[:axis] + (g, x) + a.shape[axis + 1:])
      ks.append(split(ext.k, 1))
      vs.append(split(ext.v, 1))
      all_logits.append(split(ext_logits, 0))
    # Pack each context [G, 1 + X]: slot j of `width` (e = width - 1 - j from the end) holds the prefix's token e
    # from its end, or else the prompt's; slots before the context's first token are invalid.
    ctx_prefix = jnp.concatenate([no_prefix[:, None], prefix_lens], 1)  # [G, 1 + X]
    e = (width - 1 - jnp.arange(width))[None, None]
    src = jnp.where(e < ctx_prefix[..., None], span - 1 - e, prompt_width - 1 - (e - ctx_prefix[..., None]))
    valid = e < (prompt_lens[:, None] + ctx_prefix)[..., None]  # [G, 1 + X, width]
    pack = lambda parts: jnp.pad(
        jnp.take_along_axis(jnp.concatenate(parts, 2), jnp.clip(src, 0, span - 1)[None, :, :, None, :, None], axis=4),
        [(0, 0)] * 4 + [(0, cache_size - width), (0, 0)])
    # Contexts [.., G, 1 + X, ..] -> rows [.., G * R, ..]: each row takes its branch's cache and next-token logits
    # (the jit's out_shardings place them over the batch shards, as the decode expects).
    branch = jnp.asarray(branches, jnp.int32)
    rows = lambda a, axis: (lambda b: b.reshape(b.shape[:axis] + (-1,) + b.shape[axis + 2:]))(
        jnp.take(a, branch, axis=axis + 1))
    cache = tfm.KVCache(k=rows(pack(ks), 1), v=rows(pack(vs), 1),
                        valid=rows(jnp.pad(valid, [(0, 0), (0, 0), (0, cache_size - width)]), 0),
                        end=jnp.asarray(width, jnp.int32))
    pre = jnp.concatenate([jnp.full((g, 1, resp_len), sp.pad_id, prefixes.dtype), prefixes], 1)
    lens = jnp.take(jnp.minimum(ctx_prefix, resp_len), branch, axis=1).reshape(-1)  # [G * R]
    tokens = jnp.take(pre, branch, axis=1).reshape(-1, resp_len)
    tokens = jnp.where(jnp.arange(resp_len)[None] < lens[:, None], tokens, sp.pad_id).astype(jnp.int32)
    last = jnp.take_along_axis(tokens, jnp.maximum(lens - 1, 0)[:, None], axis=1)[:, 0]
    ends_eos = (lens > 0) & jnp.isin(last, jnp.asarray(sp.eos_ids or (-1,), jnp.int32))
    keys = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids.reshape(-1)),
                                        sample_ids.reshape(-1))
    return _State(step=jnp.zeros((), jnp.int32), cache=cache, logits=rows(jnp.concatenate(all_logits, 1), 0),
                  next_pos=jnp.repeat(prompt_lens, len(branches)) + lens, tokens=tokens,
                  logprobs=jnp.zeros(tokens.shape, jnp.float32), lengths=lens.astype(jnp.int32),
                  done=ends_eos | (lens >= resp_len), eos=ends_eos, keys=keys)

  def _decode_fn(self, params, state: _State, budget, sp):
    self.traces["decode"] += 1
    cfg = self.cfg
    if self._gathered is not None:  # the model casts every weight to the compute dtype where it uses it: same values
      params = jax.lax.with_sharding_constraint(jax.tree.map(lambda p: p.astype(cfg.dtype), params), self._gathered)
    resp_len = state.tokens.shape[1]
    eos_ids = jnp.asarray(sp.eos_ids or (-1,), jnp.int32)

    def body(s: _State, attend: int):
      keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys, s.step)
      tok = sample_logits(keys, s.logits, sp.temperature, sp.top_k, sp.top_p)
      logp = jnp.take_along_axis(jax.nn.log_softmax(s.logits / (sp.temperature or 1.0)), tok[:, None], 1)[:, 0]
      live = ~s.done
      tok = jnp.where(live, tok, sp.pad_id)
      # Each row writes its own slot (none once finished): a compare, not a scatter, keeps the write on the row's
      # device; a scatter at [arange(B), at] has XLA gather its indices and values across the batch shards.
      at = (jnp.arange(resp_len)[None] == s.lengths[:, None]) & live[:, None]  # [B, L]
      tokens = jnp.where(at, tok[:, None], s.tokens)
      logprobs = jnp.where(at, logp[:, None], s.logprobs)
      lengths = s.lengths + live
      hit_eos = live & jnp.isin(tok, eos_ids)
      done = s.done | hit_eos | (lengths >= resp_len)
      hidden, cache = tfm.Decoder(cfg).apply(params, tok[:, None], s.next_pos[:, None], jnp.ones_like(tok[:, None], bool),
                                             s.cache, attend=attend)
      logits = jnp.einsum("bd,dv->bv", hidden[:, 0], tfm.unembed(params, cfg).astype(hidden.dtype),
                          preferred_element_type=jnp.float32)
      return _State(step=s.step + 1, cache=cache, logits=logits, next_pos=s.next_pos + 1, tokens=tokens,
                    logprobs=logprobs, lengths=lengths, done=done, eos=s.eos | hit_eos, keys=s.keys)

    # A decode step is bound by reading weights and the attended cache. One loop per segment of the budget, each
    # attending only to the slots filled by its end, reads on average 5/8 of the continuation's slots, not all.
    width = state.cache.k.shape[3] - budget
    s = state
    for stop in segment_stops(budget):
      s = jax.lax.while_loop(lambda s, stop=stop: (s.step < stop) & ~jnp.all(s.done),
                             functools.partial(body, attend=width + stop), s)
    pos = jnp.arange(resp_len)[None]
    out = SampledRows(tokens=s.tokens, prefix_mask=pos < state.lengths[:, None], response_mask=pos < s.lengths[:, None],
                   logprobs=s.logprobs, lengths=s.lengths, eos=s.eos)
    # Returning the final state lets the donated input buffers hold the loop state in place (no cache copy).
    return out, s

  # -- host API -----------------------------------------------------------------------------------------------------
  def lower(self, params, *, prompts: int, prompt_len: int, max_len: int, width: int, budget: int, n: int,
            sp: SamplingParams) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
    """The prefill and decode programs `sample` runs for `prompts` rows (a multiple of the mesh's batch shards) of
    `prompt_len` tokens, context bucket `width` and decode budget `budget`, lowered for abstract inputs.

    params: ShapeDtypeStructs (with shardings) or arrays. Nothing is computed: for --mode=compile (trapo_jax/aot.py).
    """
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    inputs = (i32(prompts, prompt_len), i32(prompts), i32(prompts, max_len), i32(prompts),
              jax.ShapeDtypeStruct((prompts,), jnp.bool_), i32(prompts))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    with sharding.activate(self.mesh, self.rules):
      prefill = self._prefill.lower(params, *inputs, rng, width, width + budget, n, sp)
      state = jax.eval_shape(self._prefill, params, *inputs, rng, width, width + budget, n, sp)
      return prefill, self._decode.lower(params, state, budget, sp)

  def lower_shared(self, params, *, prompts: int, prompt_len: int, max_len: int, prefixes: int, branches: tuple,
                   prompt_width: int, prefix_width: int, width: int, budget: int,
                   sp: SamplingParams) -> tuple[jax.stages.Lowered, jax.stages.Lowered]:
    """The shared prefill and the decode `sample_shared` runs for `prompts` prompts (a multiple of the mesh's batch
    shards) with `prefixes` prefixes each and len(branches) rows per prompt, lowered for abstract inputs (as
    `lower`)."""
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    r = len(branches)
    inputs = (i32(prompts, prompt_len), i32(prompts), i32(prompts, prefixes, max_len), i32(prompts, prefixes),
              i32(prompts, r), i32(prompts, r))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    static = (prompt_width, prefix_width, width, width + budget, tuple(branches), sp)
    with sharding.activate(self.mesh, self.rules):
      prefill = self._prefill_shared.lower(params, *inputs, rng, *static)
      state = jax.eval_shape(self._prefill_shared, params, *inputs, rng, *static)
      return prefill, self._decode.lower(params, state, budget, sp)

  @staticmethod
  def shared_shapes(prompt_lens: np.ndarray, prefix_lens: np.ndarray, branches: Sequence[int],
                    max_len: int, continuation: int = 0) -> tuple[int, int, int, int]:
    """(prompt_width, prefix_width, width, budget) of a `sample_shared` call: prompt lengths [G], prefix lengths
    [G, X] (at most max_len), each row's context `branches` [R]; continuation: the cap on generated tokens (0:
    none)."""
    prompt_lens, prefix_lens = np.asarray(prompt_lens), np.asarray(prefix_lens)
    row_lens = np.concatenate([np.zeros((len(prompt_lens), 1), np.int64), prefix_lens], 1)[:, list(branches)]
    prompt_width = bucket(int(prompt_lens.max()))
    prefix_width = bucket(int(prefix_lens.max(initial=0))) if prefix_lens.shape[1] else 0
    # The packed contexts need the longest one's slots; a bucket above the two widths would only add slots.
    width = min(bucket(int((prompt_lens[:, None] + row_lens).max())), prompt_width + prefix_width)
    return prompt_width, prefix_width, width, decode_budget(max_len, int(row_lens.min()), continuation)

  def sample(self, params, prompts: np.ndarray, prompt_lens: np.ndarray, prefixes: np.ndarray | None = None,
             prefix_lens: np.ndarray | None = None, *, max_len: int, rng: jax.Array, n: int = 1,
             active: np.ndarray | None = None, row_ids: np.ndarray | None = None,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, eos_ids: Sequence[int] = (),
             pad_id: int = 0, continuation: int = 0) -> SampledRows:
    """prompts [B, P] right-padded + lengths [B]; prefixes [B, K] right-padded + lengths [B] (None: no prefix).

    Returns SampledRows with B*n rows of width `max_len` (= L: prefix + continuation). Greedy when temperature == 0.
    continuation > 0: no row generates more than this many tokens (its prefix does not count).
    Rows with active [B] False are not generated: their response is the prefix alone (the full expert sample).
    row_ids [B] (default 0..B-1) key each row's randomness: sample j of row r draws from fold_in(rng, r, j), so
    the same prompt samples the same tokens however the batch is split over devices or processes.
    """
    prompts = np.asarray(prompts, np.int32)
    prompt_lens = np.asarray(prompt_lens, np.int32)
    b = prompts.shape[0]
    if prefixes is None:
      prefixes, prefix_lens = np.zeros((b, 1), np.int32), np.zeros((b,), np.int32)
    prefix_lens = np.minimum(np.asarray(prefix_lens, np.int32), max_len)
    active = np.ones((b,), bool) if active is None else np.asarray(active, bool)
    row_ids = np.arange(b, dtype=np.int32) if row_ids is None else np.asarray(row_ids, np.int32)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    # The response buffer holds the prefix; widen or cut the prefix array to exactly L columns.
    pre = np.full((b, max_len), pad_id, np.int32)
    k = min(prefixes.shape[1], max_len)
    pre[:, :k] = np.asarray(prefixes, np.int32)[:, :k]
    ctx_lens = prompt_lens + np.where(active, prefix_lens, 0)
    width = bucket(int(ctx_lens.max()))
    budget = decode_budget(max_len, int(prefix_lens[active].min()), continuation) if active.any() else 1
    width, budget = sharding.agree_max(width, budget)
    sp = SamplingParams(float(temperature), float(top_p), int(top_k), tuple(int(e) for e in eos_ids), int(pad_id))
    inputs = (prompts, prompt_lens, pre, prefix_lens, active, row_ids)
    if self.mesh is None:
      state = self._prefill(params, *inputs, rng, width, width + budget, n, sp)
      return self._decode(params, state, budget, sp)[0]
    # Rows must split evenly over the batch shards of this process: pad with inactive one-token rows, drop after.
    extra = -b % sharding.local_batch_shards(self.mesh)
    if extra:
      inputs = tuple(np.concatenate([x, np.repeat(x[-1:], extra, 0)]) for x in inputs)
      inputs[4][b:] = False
    with sharding.activate(self.mesh, self.rules):
      state = self._prefill(params, *sharding.put_batch(self.mesh, inputs), rng, width, width + budget, n, sp)
      out, _ = self._decode(params, state, budget, sp)
    out = sharding.to_host(self.mesh, out)
    return jax.tree.map(lambda x: x[:b * n], out) if extra else out

  def sample_shared(self, params, prompts: np.ndarray, prompt_lens: np.ndarray, prefixes: np.ndarray,
                    prefix_lens: np.ndarray, *, branches: Sequence[int], row_ids: np.ndarray, sample_ids: np.ndarray,
                    max_len: int, rng: jax.Array, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                    eos_ids: Sequence[int] = (), pad_id: int = 0, continuation: int = 0) -> SampledRows:
    """Rows of several contexts per prompt in one decode pass, each prompt prefilled once (docs/algorithm.md#one-pass).

    prompts [G, P] right-padded + lengths [G]; prefixes [G, X, K] right-padded + lengths [G, X]: a prompt's X
    prefixes, each computed once on top of the prompt's cache. branches [R]: the context of each of a prompt's R
    rows (0: the bare prompt, b: prefix b - 1), the same for every prompt. row_ids, sample_ids [G, R] key the rows:
    row r of prompt g draws from fold_in(fold_in(rng, row_ids[g, r]), sample_ids[g, r]), the key `sample` gives
    its sample j of a row with that id, so a row's tokens do not depend on which call or batch produced it.
    Returns G*R rows of width max_len, prompt-major; continuation as `sample`'s.
    """
    prompts = np.asarray(prompts, np.int32)
    prompt_lens = np.asarray(prompt_lens, np.int32)
    g, x = np.shape(prefix_lens)
    branches = tuple(int(b) for b in branches)
    if not branches or min(branches) < 0 or max(branches) > x:
      raise ValueError(f"branches {branches} must name the bare prompt (0) or one of its {x} prefixes (1..{x})")
    prefix_lens = np.minimum(np.asarray(prefix_lens, np.int32), max_len)
    pre = np.full((g, x, max_len), pad_id, np.int32)
    k = min(np.shape(prefixes)[2], max_len)
    pre[:, :, :k] = np.asarray(prefixes, np.int32)[:, :, :k]
    shapes = sharding.agree_max(*self.shared_shapes(prompt_lens, prefix_lens, branches, max_len, continuation))
    prompt_width, prefix_width, width, budget = shapes
    sp = SamplingParams(float(temperature), float(top_p), int(top_k), tuple(int(e) for e in eos_ids), int(pad_id))
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)
    inputs = (prompts, prompt_lens, pre, prefix_lens, np.asarray(row_ids, np.int32), np.asarray(sample_ids, np.int32))
    static = (prompt_width, prefix_width, width, width + budget, branches, sp)
    if self.mesh is None:
      state = self._prefill_shared(params, *inputs, rng, *static)
      return self._decode(params, state, budget, sp)[0]
    # Prompts must split evenly over the batch shards of this process (then so do their rows): pad, drop after.
    extra = -g % sharding.local_batch_shards(self.mesh)
    if extra:
      inputs = tuple(np.concatenate([a, np.repeat(a[-1:], extra, 0)]) for a in inputs)
    with sharding.activate(self.mesh, self.rules):
      state = self._prefill_shared(params, *sharding.put_batch(self.mesh, inputs), rng, *static)
      out, _ = self._decode(params, state, budget, sp)
    out = sharding.to_host(self.mesh, out)
    return jax.tree.map(lambda a: a[:g * len(branches)], out) if extra else out
