"""Which jitted programs a phase runs, with their optimizers and abstract shapes: the one place that the trainer
(train/trainer.py) and --mode=compile (trapo_jax/aot.py) both read, so that compile mode compiles what training runs.

A phase runs
  - its train step (`train_step`, step.jit_train_step): updated by its optimizer (`phase_optimizer`: the run's, or
    its slot of the state's when the method declares several, `make_optimizers`), in `updates_of`'s epochs, mini-
    and micro-batches, with the frozen reference policy where `uses_reference`; on a packed batch laid out by
    `pack_options`, at most `longest_sequence` long (`train_args`: its arguments at the largest layout, abstract);
  - where it samples, the sampler calls of its rows (`rollout_calls`): one per stage, or one for all of them where
    rollouts.in_one_pass, the same test the trainer's rollouts make;
and the run's evaluation one sampler call (`eval_call`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from trapo_jax import algorithms
from trapo_jax import errors
from trapo_jax import sharding
from trapo_jax.sampling import microgroup
from trapo_jax.sampling import rollouts as rollouts_lib
from trapo_jax.sampling.sampler import SamplingParams
from trapo_jax.shapes import bucket
from trapo_jax.train import state as state_lib
from trapo_jax.train import step as step_lib

# ----------------------------------------------------------------------------------------------------------------
# Optimizers.


def optim_config(cfg, method: algorithms.Method, name: str = "") -> ml_collections.ConfigDict:
  """cfg.optim with the changes of the method's optimizer `name` ("" the run's: none)."""
  if not name:
    return cfg.optim
  return ml_collections.ConfigDict(dict(cfg.optim.to_dict(), **method.optimizers(cfg)[name]))


def make_optimizers(cfg, method: algorithms.Method) -> dict[str, Any] | None:
  """The method's optimizers by name when it declares any besides the run's (cfg.optim), else None."""
  extra = method.optimizers(cfg)
  if not extra:
    return None
  txs = {"": state_lib.make_optimizer(cfg.optim)}
  for name in sorted(extra):
    txs[name] = state_lib.make_optimizer(optim_config(cfg, method, name))
  return txs


def state_optimizer(cfg, txs: dict[str, Any] | None):
  """The state's whole optimizer: the run's, or all of the method's in one state (state.slot, the first updating)."""
  return state_lib.make_optimizer(cfg.optim) if txs is None else state_lib.slot(tuple(txs.values()), 0)


def phase_optimizer(txs: dict[str, Any] | None, tx, phase: algorithms.Phase):
  """The optimizer a phase updates with: the run's (`tx`), or its slot of the shared state."""
  if txs is None:
    if phase.optimizer:
      raise errors.TrainingError(f"phase {phase.name}: optimizer {phase.optimizer!r} is not one of the method's")
    return tx
  return state_lib.slot(tuple(txs.values()), list(txs).index(phase.optimizer))


# ----------------------------------------------------------------------------------------------------------------
# The train step.


def updates_of(cfg, phase: algorithms.Phase) -> step_lib.Updates:
  """The phase's PPO epochs, mini-batches and micro-batch accumulation (the phase's own where it declares them); a
  phase of demonstrations alone (SFT) makes one update, as the official SFT step does, and has no sampler log-probs."""
  t = cfg.train
  accumulate = dict(micro_reduce=phase.micro_reduce, micro_batches=phase.micro_batches)
  if not phase.samples:
    return step_lib.Updates(epochs=1, mini_batches=1, old_logp="recompute", **accumulate)
  return step_lib.Updates(epochs=t.ppo_epochs, mini_batches=phase.mini_batches or t.mini_batches, old_logp=t.old_logp,
                          **accumulate)


def longest_sequence(cfg, phase: algorithms.Phase) -> int | None:
  """The longest prompt + response of a phase whose prefixes sit in the prompt's budget (Plan.prompt_budget): a
  prompt (at most data.max_prompt_len) and its prefix fill at most the larger of the two, the continuation at most
  data.max_response_len. None for the others (the prompt and response widths bound it)."""
  budget = getattr(phase.rows, "prompt_budget", 0)
  if budget <= 0:
    return None
  return max(budget, cfg.data.max_prompt_len) + cfg.data.max_response_len


def uses_reference(phase: algorithms.Phase) -> bool:
  return any(t.loss == "reference_kl" for t in phase.objective.terms)


def pack_options(cfg, phase: algorithms.Phase) -> dict[str, Any]:
  """step.pack's layout of the phase's rows: the token budget of a micro-batch, the mini-batches and declared
  micro-batches of its updates, the longest sequence."""
  updates = updates_of(cfg, phase)
  return dict(token_budget=cfg.train.micro_batch_tokens, mini_batches=updates.mini_batches,
              micro_batches=updates.micro_batches, max_seq=longest_sequence(cfg, phase))


def train_step(cfg, phase: algorithms.Phase, model_cfg, mesh, tx, state_tx=None):
  """The phase's jitted train step: (state, packed batch, term weights[, reference params]) -> (state, metrics),
  every sharding stated (step.jit_train_step). tx: the phase's optimizer; state_tx: the state's whole one where
  the method has several."""
  return step_lib.jit_train_step(tx, model_cfg, mesh, objective=phase.objective, chunk_size=cfg.train.logprob_chunk,
                                 temperature=phase.temperature, updates=updates_of(cfg, phase), state_tx=state_tx,
                                 reference=uses_reference(phase))


class Layout(NamedTuple):
  """A step's packed batch at its largest: `rows` sequences of `seq` tokens, responses `response` wide, in
  `micro_batches` micro-batches of `micro_rows`."""
  rows: int
  seq: int
  response: int
  micro_batches: int
  micro_rows: int


def largest_layout(cfg, phase: algorithms.Phase, shards: int) -> Layout:
  """The layout step.pack gives the phase's rows (`pack_options`) when every one is as long as it can be."""
  rows = cfg.train.batch_prompts * phase.rows_per_prompt
  t = longest_sequence(cfg, phase) or cfg.data.max_prompt_len + cfg.data.max_response_len
  lb, _ = microgroup.response_width(phase.rows, cfg.data.max_response_len)  # a prefix in the prompt widens it
  o = pack_options(cfg, phase)
  mb = step_lib.layout_rows(rows, t, o["token_budget"], shards, o["mini_batches"], o["micro_batches"])
  return Layout(rows, t, lb, rows // mb, mb)


def train_args(cfg, phase: algorithms.Phase, mesh, state) -> tuple[tuple, Layout]:
  """The train step's arguments at the largest layout, abstract (ShapeDtypeStructs with the stated shardings):
  (state, packed batch, term weights[, reference params]), and the layout. state: the abstract TrainState."""
  lay = largest_layout(cfg, phase, sharding.local_batch_shards(mesh))
  m, mb, t, lb = lay.micro_batches, lay.micro_rows, lay.seq, lay.response
  shapes = dict(seq_tokens=((m, mb, t), jnp.int32), seq_mask=((m, mb, t), jnp.bool_), resp_start=((m, mb), jnp.int32),
                resp_tokens=((m, mb, lb), jnp.int32), prefix_mask=((m, mb, lb), jnp.bool_),
                off_loss_mask=((m, mb, lb), jnp.bool_), response_mask=((m, mb, lb), jnp.bool_),
                advantages=((m, mb), jnp.float32), rewards=((m, mb), jnp.float32), kind=((m, mb), jnp.int32))
  if phase.prefix_advantages:
    shapes["prefix_advantages"] = ((m, mb), jnp.float32)
  packed = step_lib.packed_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=packed) for k, (s, dt) in shapes.items()}
  weights = jax.ShapeDtypeStruct((phase.objective.num_weights,), jnp.float32, sharding=sharding.replicated(mesh))
  return (state, batch, weights) + ((state.params,) if uses_reference(phase) else ()), lay


# ----------------------------------------------------------------------------------------------------------------
# Sampler calls.


class RolloutCall(NamedTuple):
  """One sampler call of a step: `rows` per prompt, context bucket `width`, decode `budget`; a one-pass call
  (Sampler.sample_shared) also names its prefixes per prompt, each row's context and the prefill's two widths."""
  rows: int
  width: int
  budget: int
  branches: tuple[int, ...] = ()  # one-pass: each row's context (0: the bare prompt, b: prefix b - 1)
  prefixes: int = 0
  prompt_width: int = 0
  prefix_width: int = 0


def rollout_calls(cfg, phase: algorithms.Phase) -> list[RolloutCall]:
  """Each sampler call a phase's rows can make, at the largest buckets: a stage after the first may continue an
  expert prefix of up to (ratio + window) of a demonstration while another prompt of the batch is unguided. Where
  rollouts.in_one_pass, one call of all the plan's alternatives (11 rows per prompt for TRAPO's 4, 2, 1, 1;
  docs/algorithm.md#one-pass)."""
  d = cfg.data
  plan = phase.rows
  stages = plan.stages if phase.samples else (plan.n,)
  # The longest prefix a generated row continues (Guidance.longest_prefix); demonstrations alone continue none.
  longest = plan.guidance.longest_prefix(d.max_response_len) if phase.samples else 0
  room = getattr(plan, "prompt_budget", 0)
  # Context widths: the prompt and the longest prefix; a prefix in the prompt's budget fills at most the larger of
  # the budget and the prompt, and every continuation has its whole budget (microgroup.response_width).
  context = lambda prefix: (max(room, d.max_prompt_len) if room > 0 and prefix else d.max_prompt_len + prefix)
  if room > 0:
    longest = min(longest, room)
  width, continuation = microgroup.response_width(plan, d.max_response_len)
  budget = bucket(min(width, continuation or width), cap=continuation or width)
  if rollouts_lib.in_one_pass(cfg, plan):
    prefixes, branches = microgroup.one_pass_contexts(plan)
    prompt_width = bucket(d.max_prompt_len)
    prefix_width = bucket(longest) if prefixes else 0
    width = min(bucket(context(longest if prefixes else 0)), prompt_width + prefix_width)
    return [RolloutCall(len(branches), width, budget, branches, len(prefixes), prompt_width, prefix_width)]
  # A stage may continue a prefix where the guidance guides it (after the first; UFT's hints from the first on).
  guided = lambda s: phase.samples and plan.guidance.guides(s)
  return [RolloutCall(size, bucket(context(longest if guided(s) else 0)), budget)
          for s, size in enumerate(stages)]


def largest_rollout_call(cfg, phase: algorithms.Phase) -> RolloutCall:
  """The call with the most cache slots of the phase (rows x slots: its KV cache)."""
  return max(rollout_calls(cfg, phase), key=lambda c: (c.rows * (c.width + c.budget), c.rows))


def rollout_sampling(cfg) -> SamplingParams:
  """The rollouts' sampling (rollouts.Rollouts asks the sampler for it); EOS and padding, which only the tokenizer
  knows, stand in as 0: they change no shape."""
  r = cfg.rollout
  return SamplingParams(float(r.temperature), float(r.top_p), int(r.top_k), (0,), 0)


@dataclasses.dataclass(frozen=True)
class EvalCall:
  """The evaluation's sampler call: `prompts` of data.max_prompt_len tokens, `call.rows` samples each (the largest
  eval sample count), up to `max_len` new tokens, sampled as `sp` says (EOS and padding stand in as 0)."""
  prompts: int
  call: RolloutCall
  max_len: int
  sp: SamplingParams


def eval_call(cfg) -> EvalCall:
  e = cfg.eval
  n = max(e.samples[b] for b in e.benchmarks)
  call = RolloutCall(n, bucket(cfg.data.max_prompt_len), bucket(e.max_new_tokens, cap=e.max_new_tokens))
  return EvalCall(e.batch_size, call, e.max_new_tokens, SamplingParams(e.temperature, e.top_p, -1, (0,), 0))
