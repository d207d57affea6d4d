"""The jitted update: token log-probs on packed sequences, the phase's objective, gradient accumulation, AdamW.

Sequences are packed right-padded, prompt then response ([N, T]); the loss reads the hidden state before each
response token (a per-row gather), so every loss array is response-aligned [N, L] like the sampler's output.

Micro-batches: the N rows are split into M equal micro-batches scanned inside one jitted step. A phase declares how
their gradients combine (Updates.micro_reduce, docs/algorithm.md#accumulation): "mean", so with the sequence-mean
aggregations the step's gradient equals the full-batch gradient (TRAPO's official code sums the gradients of a GPU's
8 sequences and averages over GPUs; with `loss.seq_scale` = sequences per GPU this is the same objective), or "sum"
over a declared number of micro-batches, as the verl-0.2 actors of HPT, SRFT and ReLIFT call backward on each
micro-batch's loss unscaled, so each token-mean term counts once per micro-batch.
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
from trapo_jax import reduction
from trapo_jax import sharding
from trapo_jax.models import transformer as tfm
from trapo_jax.reduction import Metric
from trapo_jax.shapes import bucket
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
  sampler_logp: np.ndarray | None = None  # [M, mb, Lb]: the sampler's log-probs (sampled rows only)
  prefix_advantages: np.ndarray | None = None  # [M, mb]: the given prefix's advantage (Phase.prefix_advantages)

  def arrays(self) -> dict[str, np.ndarray]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


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


def layout_rows(num_rows: int, seq_len: int, token_budget: int, shards: int, mini_batches: int = 1,
                micro_batches: int = 0) -> int:
  """Rows per micro-batch of a batch of num_rows that splits into `mini_batches` mini-batches of `micro_batches`
  micro-batches each (a phase that sums them: its declared count), or of as many as the token budget asks (0)."""
  if num_rows % mini_batches:
    raise ValueError(f"cannot split {num_rows} rows into {mini_batches} mini-batches")
  per_mini = num_rows // mini_batches
  if not micro_batches:
    return micro_batch_rows(per_mini, seq_len, token_budget, shards)
  if per_mini % micro_batches or (per_mini // micro_batches) % shards:
    raise ValueError(f"cannot split {per_mini} rows into {micro_batches} micro-batches over {shards} batch shards")
  return per_mini // micro_batches


def pack(rb, advantages: np.ndarray, *, token_budget: int, shards: int, pad_id: int,
         mini_batches: int = 1, micro_batches: int = 0, max_seq: int | None = None) -> PackedBatch:
  """A RolloutBatch -> packed, bucketed, micro-batched host arrays.

  mini_batches K: the micro-batches split into K mini-batches of consecutive rows (Updates), each a whole number of
  micro-batches; micro_batches: that number where the phase declares it (`layout_rows`). max_seq: the longest
  prompt + response the rows can have where it is less than the two widths' sum (a prefix in the prompt's budget:
  the response is wider than a response, the sequence no longer), so the sequence bucket stops there.
  """
  n = rb.tokens.shape[0]
  resp_lens = rb.response_mask.sum(-1).astype(np.int32)
  lb = bucket(int(resp_lens.max()), cap=rb.tokens.shape[1])
  cap = rb.prompt_ids.shape[1] + rb.tokens.shape[1]
  t = bucket(int((rb.prompt_lens + resp_lens).max()), cap=cap if max_seq is None else min(cap, max_seq))
  lb, t = sharding.agree_max(lb, t)
  seq = np.full((n, t), pad_id, np.int32)
  mask = np.zeros((n, t), bool)
  for i in range(n):
    lp, lr = int(rb.prompt_lens[i]), int(resp_lens[i])
    seq[i, :lp] = rb.prompt_ids[i, :lp]
    seq[i, lp:lp + lr] = rb.tokens[i, :lr]
    mask[i, :lp + lr] = True
  mb = layout_rows(n, t, token_budget, shards, mini_batches, micro_batches)
  m = n // mb
  fit = lambda x: np.ascontiguousarray(x[:, :lb]).reshape(m, mb, lb)
  return PackedBatch(
      seq_tokens=seq.reshape(m, mb, t), seq_mask=mask.reshape(m, mb, t),
      resp_start=rb.prompt_lens.astype(np.int32).reshape(m, mb), resp_tokens=fit(rb.tokens.astype(np.int32)),
      prefix_mask=fit(rb.prefix_mask), off_loss_mask=fit(rb.off_loss_mask), response_mask=fit(rb.response_mask),
      advantages=advantages.astype(np.float32).reshape(m, mb), rewards=rb.rewards.astype(np.float32).reshape(m, mb),
      kind=rb.kind.astype(np.int32).reshape(m, mb),
      sampler_logp=None if rb.logprobs is None else fit(rb.logprobs.astype(np.float32)))


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


@dataclasses.dataclass(frozen=True)
class Updates:
  """How one rollout batch updates the policy (docs/algorithm.md#rl-options).

  `epochs` passes over the batch, each in `mini_batches` optimizer steps over consecutive rows (PPO's epochs and
  mini-batches). old_logp: "recompute", the trainer's log-probs under the parameters the step starts from (with one
  update, those of the update itself: ratio 1, the official setting); or "sampler", the log-probs the rows were
  sampled with. micro_reduce: how a mini-batch's micro-batch gradients combine, "mean" or "sum";
  micro_batches: micro-batches per mini-batch where the phase fixes it (0: as many as the token budget asks).
  """
  epochs: int = 1
  mini_batches: int = 1
  old_logp: str = "recompute"
  micro_reduce: str = "mean"
  micro_batches: int = 0

  @property
  def count(self) -> int:
    return self.epochs * self.mini_batches


def _own_tokens(mb: dict) -> jax.Array:
  return mb["response_mask"].astype(bool) & ~mb["prefix_mask"].astype(bool)


def loss_fn(params, mb: dict, weights: jax.Array, ref_params=None, *, model_cfg: tfm.ModelConfig,
            objective: losses.Objective, chunk_size: int, temperature: float = 1.0, old_logp: str = "current"):
  """The objective of one micro-batch -> (loss, metrics). weights [num_weights]: each term's weight this step, then
  its scheduled inputs (Objective.weights_at).

  old_logp: "current" (the log-probs just computed, without gradient), "sampler" (mb["sampler_logp"]) or "batch"
  (mb["old_logp"]; the current ones where mb["first"], the step's first update, made with the old parameters).
  ref_params: the frozen reference policy, for a term that reads its log-probs when mb holds none ("ref_logp").
  """
  logp, entropy = response_logprobs(params, model_cfg, mb, chunk_size, temperature)
  sg = jax.lax.stop_gradient
  if old_logp == "current":
    # One update per batch (ppo_epochs=1, one mini-batch): old log-probs are the current ones, ratio = 1 with the
    # gradient of log pi, exactly as the official recomputation right before the update (docs/algorithm.md).
    old = sg(logp)
  elif old_logp == "sampler":
    old = mb["sampler_logp"]
  else:
    old = jnp.where(mb["first"], sg(logp), mb["old_logp"])
  ref = mb.get("ref_logp")
  if ref is None and ref_params is not None:
    ref = sg(response_logprobs(ref_params, model_cfg, mb, chunk_size, temperature)[0])
  inputs = losses.TokenInputs(
      logp=logp, old_logp=old, entropy=entropy, advantages=mb["advantages"],
      rewards=mb["rewards"], kind=mb["kind"], prefix_mask=mb["prefix_mask"], off_loss_mask=mb["off_loss_mask"],
      response_mask=mb["response_mask"], sampler_logp=mb.get("sampler_logp"), ref_logp=ref,
      batch_tokens=mb.get("batch_tokens"), prefix_advantages=mb.get("prefix_advantages"))
  loss, metrics = losses.objective_loss(inputs, objective, weights)
  own = _own_tokens(mb)
  if old_logp == "batch":  # several updates: the mismatch is measured once per step (ppo_updates)
    metrics["ppo/abs_log_ratio_max"] = reduction.maximum(jnp.max(jnp.where(own, jnp.abs(sg(logp) - old), 0.0)))
    kl = jnp.sum(jnp.where(own, old - sg(logp), 0.0)) / jnp.maximum(jnp.sum(own), 1)
    metrics["ppo/kl"] = reduction.weighted(kl, jnp.sum(own.astype(jnp.float32)))
  elif "sampler_logp" in mb:
    metrics.update(losses.mismatch_metrics(logp, mb["sampler_logp"], own))
  return loss, metrics


def accumulate_gradients(params, batch: dict, weights: jax.Array, ref_params=None, *, model_cfg: tfm.ModelConfig,
                         objective: losses.Objective, chunk_size: int, temperature: float = 1.0,
                         old_logp: str = "current", reduce: str = "mean") -> tuple[Any, dict[str, Metric]]:
  """The step's gradient and metrics over [M, mb, ...] micro-batches: the mean (reduce="mean") or the sum ("sum") of
  the micro-batch gradients. Metrics combine by their own reductions either way (trapo_jax/reduction.py)."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model_cfg=model_cfg, objective=objective,
                                                 chunk_size=chunk_size, temperature=temperature, old_logp=old_logp),
                               has_aux=True)
  num_micro = batch["advantages"].shape[0]
  if any(t.aggregation == "global_token_mean" for t in objective.terms):
    # Each micro-batch divides by the (mini-)batch's tokens per micro-batch: their mean is the batch's token mean.
    per_micro = jnp.sum(batch["response_mask"].astype(jnp.float32)) / num_micro
    batch = dict(batch, batch_tokens=jnp.broadcast_to(per_micro, (num_micro,)))

  def accumulate(carry, mb):
    grads, metrics = carry
    (_, m), g = grad_fn(params, mb, weights, ref_params)
    return (jax.tree.map(jnp.add, grads, g), reduction.fold(metrics, m)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  first = jax.tree.map(lambda x: x[0], batch)
  no_metrics = reduction.empty(jax.eval_shape(grad_fn, params, first, weights, ref_params)[0][1])
  (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, no_metrics), batch)
  if reduce == "sum":
    return grads, reduction.finish(metrics, num_micro)
  if reduce != "mean":
    raise ValueError(f"micro-batch reduction {reduce!r} is unknown (known: mean, sum)")
  return jax.tree.map(lambda g: g / num_micro, grads), reduction.finish(metrics, num_micro)


def apply_gradients(tx: optax.GradientTransformation, params, opt_state, grads, metrics: dict[str, Metric]):
  """One AdamW update -> (params, opt_state, metrics + grad_norm, skipped); a non-finite loss or gradient keeps the
  old parameters and optimizer state."""
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"].value) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  # `skipped` the largest over updates: whether any was.
  metrics.update(grad_norm=reduction.mean(grad_norm), skipped=reduction.maximum((~finite).astype(jnp.float32)))
  return keep(new_params, params), keep(new_opt_state, opt_state), metrics


def train_step(state: TrainState, batch: dict, weights: jax.Array, ref_params=None, *,
               tx: optax.GradientTransformation, model_cfg: tfm.ModelConfig, objective: losses.Objective,
               chunk_size: int, temperature: float = 1.0, updates: Updates = Updates()) -> tuple[TrainState, dict]:
  """One rollout batch's update over [M, mb, ...] micro-batches: one optimizer step (the default), or
  updates.count of them (ppo_updates). A non-finite loss or gradient skips an update.

  weights [num_weights] float32: the objective's term weights and scheduled inputs at this step (an input, so
  schedules never recompile).
  ref_params: the frozen reference policy, placed like state.params, when a term reads its log-probs; else None.
  """
  if updates.count > 1:
    params, opt_state, per_update, metrics = ppo_updates(
        state.params, state.opt_state, batch, weights, ref_params, tx=tx, model_cfg=model_cfg, objective=objective,
        chunk_size=chunk_size, temperature=temperature, updates=updates)
    metrics = reduction.values({**metrics, **reduction.over_updates(per_update, updates.mini_batches)})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
  grads, metrics = accumulate_gradients(state.params, batch, weights, ref_params, model_cfg=model_cfg,
                                        objective=objective, chunk_size=chunk_size, temperature=temperature,
                                        old_logp="sampler" if updates.old_logp == "sampler" else "current",
                                        reduce=updates.micro_reduce)
  params, opt_state, metrics = apply_gradients(tx, state.params, state.opt_state, grads, metrics)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), reduction.values(metrics)


def ppo_updates(params, opt_state, batch: dict, weights: jax.Array, ref_params=None, *,
                tx: optax.GradientTransformation, model_cfg: tfm.ModelConfig, objective: losses.Objective,
                chunk_size: int, temperature: float = 1.0, updates: Updates):
  """updates.count optimizer steps over one batch of [M, mb, ...] micro-batches: update u = e * K + k takes
  mini-batch k (micro-batches k M/K .. (k+1) M/K - 1) in epoch e.

  Old log-probs ("recompute") and the reference's are computed once, before the first update; the first update
  takes its own log-probs as old ones, so its ratio is exactly 1, as with one update.
  -> (params, opt_state, per-update metrics (reduction.Metric, leaves [count]), the step's mismatch metrics).
  """
  num_micro = batch["advantages"].shape[0]
  k_count = updates.mini_batches
  if num_micro % k_count:
    raise ValueError(f"{num_micro} micro-batches do not split into {k_count} mini-batches")
  per_mini = num_micro // k_count
  logprobs = functools.partial(packed_logprobs, model_cfg=model_cfg, chunk_size=chunk_size, temperature=temperature)
  sg = jax.lax.stop_gradient
  start = sg(logprobs(params, batch))  # the trainer's log-probs before any update
  batch = dict(batch, old_logp=start if updates.old_logp == "recompute" else batch["sampler_logp"])
  if ref_params is not None:
    batch["ref_logp"] = sg(logprobs(ref_params, batch))
  step_metrics = {}
  if "sampler_logp" in batch:
    step_metrics = losses.mismatch_metrics(start, batch["sampler_logp"], _own_tokens(batch))
  first_is_current = updates.old_logp == "recompute"

  def update(carry, u):
    params, opt_state = carry
    mini = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, (u % k_count) * per_mini, per_mini, axis=0),
                        batch)
    mini["first"] = jnp.broadcast_to((u == 0) & first_is_current, (per_mini,))
    grads, metrics = accumulate_gradients(params, mini, weights, model_cfg=model_cfg, objective=objective,
                                          chunk_size=chunk_size, temperature=temperature, old_logp="batch",
                                          reduce=updates.micro_reduce)
    params, opt_state, metrics = apply_gradients(tx, params, opt_state, grads, metrics)
    return (params, opt_state), metrics

  (params, opt_state), per_update = jax.lax.scan(update, (params, opt_state), jnp.arange(updates.count))
  return params, opt_state, per_update, step_metrics


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
                   objective: losses.Objective, chunk_size: int, temperature: float = 1.0, updates: Updates = Updates(),
                   state_tx: optax.GradientTransformation | None = None, reference: bool = False):
  """`train_step` jitted with every sharding stated: the state's own (TrainState.shardings, donated), the packed
  batch's, replicated term weights and metrics, and the reference params like the params when `reference`. The
  trainer runs it; --mode=compile lowers it (trapo_jax/aot.py).

  tx: the optimizer this step updates with; state_tx: the state's whole optimizer when that differs (a method's
  second optimizer lives in the same state, state.slot), which fixes the state's structure and shardings.
  """
  state = TrainState.shardings(model_cfg, mesh, state_tx or tx)
  rep = sharding.replicated(mesh)
  ins = (state, packed_sharding(mesh), rep) + ((state.params,) if reference else ())
  return jax.jit(functools.partial(train_step, tx=tx, model_cfg=model_cfg, objective=objective, chunk_size=chunk_size,
                                   temperature=temperature, updates=updates),
                 in_shardings=ins, out_shardings=(state, rep), donate_argnums=(0,))
