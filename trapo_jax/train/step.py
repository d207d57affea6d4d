"""The jitted update: token log-probs on packed sequences, the phase's objective, gradient accumulation, AdamW.

Sequences are packed right-padded, prompt then response ([N, T]); the loss reads the hidden state before each
response token (a per-row gather), so every loss array is response-aligned [N, L] like the sampler's output.

Micro-batches: the N rows are split into M equal micro-batches scanned inside one jitted step; gradients are
averaged, so with the sequence-mean aggregations the step's gradient equals the full-batch gradient. (The official
code sums the gradients of token-budgeted micro-batches of one GPU's 8 sequences and averages over GPUs; with
`loss.seq_scale` = sequences per GPU this gives the same objective, docs/algorithm.md. The entropy term is a token mean per
micro-batch, as there.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trapo_jax import losses
from trapo_jax import sharding
from trapo_jax.models import transformer as tfm
from trapo_jax.sampling.sampler import bucket
from trapo_jax.train.state import TrainState


@dataclasses.dataclass
class PackedBatch:
  """Host arrays, [M, mb, ...]: M micro-batches of mb rows."""
  seq_tokens: np.ndarray  # [M, mb, T]
  seq_mask: np.ndarray  # [M, mb, T]
  resp_start: np.ndarray  # [M, mb]: index of the first response token in the packed sequence (= prompt length)
  resp_tokens: np.ndarray  # [M, mb, Lb]
  prefix_mask: np.ndarray
  off_loss_mask: np.ndarray
  response_mask: np.ndarray
  advantages: np.ndarray  # [M, mb]
  rewards: np.ndarray  # [M, mb]
  kind: np.ndarray  # [M, mb] int32: losses.ROW_OWN | ROW_GUIDED | ROW_DEMO

  def arrays(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


def micro_batch_rows(num_rows: int, seq_len: int, token_budget: int, shards: int) -> int:
  """Rows per micro-batch: as many as the per-device token budget allows, a multiple of the batch shards, and a
  divisor of num_rows."""
  per_device = max(1, token_budget // seq_len)
  mb = min(num_rows, per_device * shards)
  while num_rows % mb or mb % shards:
    mb -= 1
    if mb <= 0:
      raise ValueError(f"cannot split {num_rows} rows into micro-batches over {shards} batch shards")
  return mb


def pack(rb, advantages: np.ndarray, *, token_budget: int, shards: int, pad_id: int) -> PackedBatch:
  """A RolloutBatch -> packed, bucketed, micro-batched host arrays."""
  n = rb.tokens.shape[0]
  resp_lens = rb.response_mask.sum(-1).astype(np.int32)
  lb = bucket(int(resp_lens.max()), cap=rb.tokens.shape[1])
  t = bucket(int((rb.prompt_lens + resp_lens).max()), cap=rb.prompt_ids.shape[1] + rb.tokens.shape[1])
  lb, t = sharding.agree_max(lb, t)
  seq = np.full((n, t), pad_id, np.int32)
  mask = np.zeros((n, t), bool)
  for i in range(n):
    lp, lr = int(rb.prompt_lens[i]), int(resp_lens[i])
    seq[i, :lp] = rb.prompt_ids[i, :lp]
    seq[i, lp:lp + lr] = rb.tokens[i, :lr]
    mask[i, :lp + lr] = True
  mb = micro_batch_rows(n, t, token_budget, shards)
  m = n // mb
  fit = lambda x: np.ascontiguousarray(x[:, :lb]).reshape(m, mb, lb)
  return PackedBatch(
      seq_tokens=seq.reshape(m, mb, t), seq_mask=mask.reshape(m, mb, t),
      resp_start=rb.prompt_lens.astype(np.int32).reshape(m, mb), resp_tokens=fit(rb.tokens.astype(np.int32)),
      prefix_mask=fit(rb.prefix_mask), off_loss_mask=fit(rb.off_loss_mask), response_mask=fit(rb.response_mask),
      advantages=advantages.astype(np.float32).reshape(m, mb), rewards=rb.rewards.astype(np.float32).reshape(m, mb),
      kind=rb.kind.astype(np.int32).reshape(m, mb))


def response_logprobs(params, model_cfg: tfm.ModelConfig, mb: dict, chunk_size: int, temperature: float = 1.0):
  """logp, entropy [mb, Lb] of the response tokens of one micro-batch."""
  hidden = tfm.forward(params, model_cfg, mb["seq_tokens"], mb["seq_mask"])
  t = hidden.shape[1]
  lb = mb["resp_tokens"].shape[1]
  # The hidden state at position start-1+j predicts response token j.
  idx = jnp.clip(mb["resp_start"][:, None] - 1 + jnp.arange(lb)[None], 0, t - 1)
  h = jnp.take_along_axis(hidden, idx[..., None], axis=1)
  return losses.token_logprobs(h, tfm.unembed(params, model_cfg), mb["resp_tokens"], chunk_size=chunk_size,
                               temperature=temperature)


def packed_logprobs(params, batch: dict, *, model_cfg: tfm.ModelConfig, chunk_size: int,
                    temperature: float = 1.0) -> jax.Array:
  """logp [M, mb, Lb] of every response token of a packed batch under `params` (no gradient)."""
  return jax.lax.map(lambda mb: response_logprobs(params, model_cfg, mb, chunk_size, temperature)[0], batch)


def loss_fn(params, mb: dict, weights: jax.Array, *, model_cfg: tfm.ModelConfig, objective: losses.Objective,
            chunk_size: int, temperature: float = 1.0):
  """The objective of one micro-batch -> (loss, metrics). weights [num_terms]: each term's weight this step."""
  logp, entropy = response_logprobs(params, model_cfg, mb, chunk_size, temperature)
  # One update per batch (ppo_epochs=1, one mini-batch): old log-probs are the current ones, ratio = 1 with the
  # gradient of log pi, exactly as the official recomputation right before the update (docs/algorithm.md).
  inputs = losses.TokenInputs(
      logp=logp, old_logp=jax.lax.stop_gradient(logp), entropy=entropy, advantages=mb["advantages"],
      rewards=mb["rewards"], kind=mb["kind"], prefix_mask=mb["prefix_mask"], off_loss_mask=mb["off_loss_mask"],
      response_mask=mb["response_mask"])
  return losses.objective_loss(inputs, objective, weights)


# Masked means over tokens, with the count that weights them: a micro-batch's mean counts by its tokens, so the step
# reports the batch's mean (NaN where the batch has no such tokens, e.g. expert tokens under GRPO).
_TOKEN_WEIGHTED = {"expert_prob": "num_prefix_tokens", "expert_frac_below_alpha": "num_prefix_tokens",
                   "own_prob": "num_own_tokens"}
_TOTALS = ("num_prefix_tokens", "num_own_tokens")


def combine_metrics(summed: dict, num_micro: int) -> dict:
  """Metrics summed over micro-batches (token-weighted ones pre-multiplied by their counts) -> the step's."""
  out = {}
  for k, v in summed.items():
    if k in _TOKEN_WEIGHTED:
      count = summed[_TOKEN_WEIGHTED[k]]
      out[k] = jnp.where(count > 0, v / jnp.maximum(count, 1.0), jnp.nan)
    else:
      out[k] = v if k in _TOTALS else v / num_micro
  return out


def accumulate_gradients(params, batch: dict, weights: jax.Array, *, model_cfg: tfm.ModelConfig,
                         objective: losses.Objective, chunk_size: int, temperature: float = 1.0) -> tuple[Any, dict]:
  """The step's gradient and metrics over [M, mb, ...] micro-batches: the mean of the micro-batch gradients."""
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


def train_step(state: TrainState, batch: dict, weights: jax.Array, *, tx: optax.GradientTransformation,
               model_cfg: tfm.ModelConfig, objective: losses.Objective, chunk_size: int,
               temperature: float = 1.0) -> tuple[TrainState, dict]:
  """One optimizer step over [M, mb, ...] micro-batches. A non-finite loss or gradient skips the update.

  weights [num_terms] float32: the objective's term weights at this step (an input, so schedules never recompile).
  """
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


def micro_batch_sharding(mesh, ndim: int):
  """[M, mb, ...]: rows of each micro-batch over (data, fsdp)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES,
                                                                     *([None] * (ndim - 2))))


def packed_sharding(mesh) -> jax.sharding.NamedSharding:
  """Every array of a packed batch, whatever its rank ([M, mb, ...]): the rows of each micro-batch over (data,
  fsdp), the rest whole."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))


def put_packed(mesh, packed: PackedBatch) -> dict[str, Any]:
  arrays = packed.arrays()
  return {k: jax.make_array_from_process_local_data(packed_sharding(mesh), v) for k, v in arrays.items()}


def jit_train_step(tx: optax.GradientTransformation, model_cfg: tfm.ModelConfig, mesh, *,
                   objective: losses.Objective, chunk_size: int, temperature: float = 1.0):
  """`train_step` jitted with every sharding stated: the state's own (TrainState.shardings, donated), the packed
  batch's, replicated term weights and metrics. The trainer runs it; --mode=compile lowers it (trapo_jax/aot.py)."""
  state = TrainState.shardings(model_cfg, mesh, tx)
  rep = sharding.replicated(mesh)
  return jax.jit(functools.partial(train_step, tx=tx, model_cfg=model_cfg, objective=objective, chunk_size=chunk_size,
                                   temperature=temperature),
                 in_shardings=(state, packed_sharding(mesh), rep), out_shardings=(state, rep), donate_argnums=(0,))
