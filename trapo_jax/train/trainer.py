"""The one training loop: every registered method (trapo_jax/algorithms/) differs only by the rows and objective of
its phases.

A step: the phase's rows (stages of rollouts with the grader between them, or demonstrations) -> group advantages
-> jitted, sharded objective + AdamW update -> metrics. Checkpoints (orbax) hold the train state and the data position; a run started on a workdir with
a checkpoint resumes from it exactly; SIGTERM saves and exits.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from trapo_jax import algorithms
from trapo_jax import distributed
from trapo_jax import losses
from trapo_jax import sharding
from trapo_jax.models import hf
from trapo_jax.sampling import microgroup
from trapo_jax.sampling.sampler import Sampler
from trapo_jax.train import checkpoint as ckpt_lib
from trapo_jax.train import metrics as metrics_lib
from trapo_jax.sampling import rollout as rollout_lib
from trapo_jax.train import state as state_lib
from trapo_jax.train import step as step_lib


class TrainingError(RuntimeError):
  pass


@dataclasses.dataclass
class Context:
  """Everything a run builds once: mesh, model, tokenizer, method, sampler."""
  cfg: Any
  workdir: str
  method: algorithms.Method
  mesh: Any
  model_cfg: Any
  tokenizer: Any
  tx: Any
  sampler: Sampler
  eos_ids: tuple[int, ...]
  pad_id: int
  split_ids: np.ndarray

  @property
  def shards(self) -> int:
    return sharding.local_batch_shards(self.mesh)


def build_context(cfg, workdir: str) -> Context:
  mesh = sharding.make_mesh(cfg)
  model_cfg = state_lib.model_config(cfg)
  tok_dir = state_lib.tokenizer_dir(cfg)
  if not tok_dir:
    raise TrainingError("model.tokenizer_dir: a tokenizer directory is needed (or model.hf_dir)")
  tokenizer = hf.load_tokenizer(tok_dir)
  if tokenizer.eos_token_id is None:
    raise TrainingError(f"{tok_dir}: the tokenizer has no eos token")
  if len(tokenizer) > model_cfg.vocab_size:
    raise TrainingError(f"{tok_dir}: tokenizer has {len(tokenizer)} tokens, model.vocab_size is {model_cfg.vocab_size}")
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  return Context(cfg=cfg, workdir=workdir, method=algorithms.from_config(cfg), mesh=mesh, model_cfg=model_cfg,
                 tokenizer=tokenizer,
                 tx=state_lib.make_optimizer(cfg.optim), sampler=Sampler(model_cfg, mesh=mesh),
                 eos_ids=(int(tokenizer.eos_token_id),), pad_id=int(pad_id),
                 split_ids=microgroup.split_token_ids(tokenizer))


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  return tokenizer.batch_decode([row[m].tolist() for row, m in zip(tokens, mask)], skip_special_tokens=True)


def make_rollout_fns(ctx: Context, params, rng: jax.Array, timings: dict[str, float]):
  """sample_fn / grade_fn closures for rollout.collect, timing each part."""
  r = ctx.cfg.rollout
  calls = [0]

  def sample_fn(prompt_ids, prompt_lens, prefix_ids, prefix_lens, active, n):
    t = time.perf_counter()
    key = jax.random.fold_in(rng, calls[0])
    calls[0] += 1
    # Rows are keyed by their prompt's position in the global batch: the same samples however it is split.
    g = prompt_ids.shape[0]
    row_ids = jax.process_index() * g + np.arange(g)
    out = ctx.sampler.sample(params, prompt_ids, prompt_lens, prefix_ids, prefix_lens, active=active, row_ids=row_ids,
                             max_len=ctx.cfg.data.max_response_len, rng=key, n=n, temperature=r.temperature,
                             top_p=r.top_p, top_k=r.top_k, eos_ids=ctx.eos_ids, pad_id=ctx.pad_id)
    timings["sampling"] = timings.get("sampling", 0.0) + time.perf_counter() - t
    return np.asarray(out.tokens), np.asarray(out.prefix_mask), np.asarray(out.response_mask)

  def grade_fn(tokens, response_mask, answers):
    from trapo_jax import rewards
    t = time.perf_counter()
    texts = decode_responses(ctx.tokenizer, tokens, response_mask)
    # The official training reward is math-verify alone (no boxed fallback, which only the evaluation uses).
    scores = rewards.grade_batch(texts, answers, timeout_s=ctx.cfg.eval.grader_timeout_s,
                                 workers=ctx.cfg.eval.grader_workers, fallback=False)
    stats = rewards.last_stats()
    timings["grader_timeouts"] = timings.get("grader_timeouts", 0) + stats.timeouts
    timings["grader_restarts"] = timings.get("grader_restarts", 0) + stats.restarts
    timings["grading"] = timings.get("grading", 0.0) + time.perf_counter() - t
    return np.asarray(scores, np.float32)

  return sample_fn, grade_fn


def global_rollouts(rb: rollout_lib.RolloutBatch) -> rollout_lib.RolloutBatch:
  """Every process's rows (for metrics): on several processes, the small per-row fields gathered."""
  if jax.process_count() == 1:
    return rb
  from jax.experimental import multihost_utils
  fields = dict(rewards=rb.rewards, stage=rb.stage, ratio=rb.ratio, levels=rb.levels, group_ids=rb.group_ids,
                prefix_mask=rb.prefix_mask, response_mask=rb.response_mask)
  gathered = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in fields.items()}
  return dataclasses.replace(rb, **gathered)


def rollout_metrics(rb: rollout_lib.RolloutBatch, num_stages: int) -> dict[str, float]:
  """Rewards per stage, hint-level fractions, own vs expert lengths, solve-all/none (docs/algorithm.md#evaluation)."""
  rb = global_rollouts(rb)
  m: dict[str, float] = {"reward/mean": float(rb.rewards.mean())}
  for s in range(num_stages):
    sel = rb.stage == s
    if sel.any():
      m[f"reward/stage_{s + 1}"] = float(rb.rewards[sel].mean())
  own = rb.ratio == 0
  if own.any():
    m["reward/own"] = float(rb.rewards[own].mean())
    m["length/own"] = float(rb.lengths[own].mean())
  expert = rb.ratio >= 1
  if expert.any():
    m["length/expert"] = float(rb.lengths[expert].mean())
  guided = (rb.ratio > 0) & (rb.ratio < 1)
  if guided.any():
    m["reward/guided"] = float(rb.rewards[guided].mean())
  top = rb.levels.max(axis=1)
  for level in range(num_stages):
    m[f"hint_level_{level}"] = float((top == level).mean())
  per_prompt = rb.rewards.reshape(rb.levels.shape[0], -1)
  m["solve_all"] = float((per_prompt.min(1) == 1).mean())
  m["solve_none"] = float((per_prompt.max(1) == 0).mean())
  m["prefix_tokens"] = float(rb.prefix_mask.sum())
  m["response_tokens"] = float(rb.response_mask.sum())
  return m


class _Preemption:
  """SIGTERM sets a flag; the loop saves a checkpoint after the current step and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. called from a test thread): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint after this step")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def jit_step(ctx: Context, phase: algorithms.Phase):
  """The phase's train step, compiled on first use: (state, packed batch, term weights) -> (state, metrics)."""
  return step_lib.jit_train_step(ctx.tx, ctx.model_cfg, ctx.mesh, objective=phase.objective,
                                 chunk_size=ctx.cfg.train.logprob_chunk, temperature=phase.temperature)


def _loader(ctx: Context, split: str = "train"):
  from trapo_jax.data import pipeline
  cfg = ctx.cfg
  examples = distributed.process_zero_first(
      lambda: pipeline.load_examples(cfg.data, split, data_dir=data_dir(cfg, ctx.workdir)), f"data:{split}")
  if cfg.data.levels:  # a training-data filter; evaluation always sees every level
    examples = [e for e in examples if e.level in tuple(cfg.data.levels)]
    if not examples:
      raise TrainingError(f"data.levels: no {split} example has a level in {tuple(cfg.data.levels)}")
  return pipeline.PromptLoader(examples, ctx.tokenizer, batch_size=cfg.train.batch_prompts,
                               max_prompt_len=cfg.data.max_prompt_len, max_response_len=cfg.data.max_response_len,
                               template=cfg.data.template, seed=cfg.data.shuffle_seed,
                               demo_form=ctx.method.demo_form(cfg))


def data_dir(cfg, workdir: str) -> str:
  return cfg.data.data_dir or os.path.join(workdir, "tfds")


def local_share(batch, index: int, count: int):
  """This process's consecutive share of a global PromptBatch (every process builds the same global batch)."""
  if count == 1:
    return batch
  g = batch.prompt_ids.shape[0]
  if g % count:
    raise TrainingError(f"train.batch_prompts={g} must be divisible by the {count} processes")
  sl = slice(index * g // count, (index + 1) * g // count)
  return dataclasses.replace(
      batch, uids=batch.uids[sl], prompt_ids=batch.prompt_ids[sl], prompt_lens=batch.prompt_lens[sl],
      demo_ids=batch.demo_ids[sl], demo_lens=batch.demo_lens[sl], answers=batch.answers[sl],
      problems=batch.problems[sl])


def dump_token_probs(ctx: Context, params, placed: dict, packed, phase: algorithms.Phase, step: int,
                     step_fns: dict) -> None:
  """The probabilities the policy about to be updated gives imitated expert tokens and its own tokens, written to
  <workdir>/token_probs/ (this process's rows; process 0 writes)."""
  key = f"{phase.name}/logprobs"
  if key not in step_fns:
    rows = step_lib.packed_sharding(ctx.mesh)
    step_fns[key] = jax.jit(functools.partial(step_lib.packed_logprobs, model_cfg=ctx.model_cfg,
                                              chunk_size=ctx.cfg.train.logprob_chunk, temperature=phase.temperature),
                            in_shardings=(state_lib.param_shardings(ctx.model_cfg, ctx.mesh), rows),
                            out_shardings=rows)
  p = np.exp(np.asarray(sharding.to_host(ctx.mesh, step_fns[key](params, placed), batch_axis=1)))
  resp = packed.response_mask.astype(bool)
  prefix = resp & packed.prefix_mask.astype(bool)
  if jax.process_index() == 0:
    metrics_lib.write_token_probs(ctx.workdir, step, p[prefix & packed.off_loss_mask.astype(bool)],
                                  p[resp & ~prefix])


def train_one_step(ctx: Context, state: state_lib.TrainState, batch, step_fns: dict) -> tuple[Any, dict]:
  """Rollouts, advantages and the update for one PromptBatch; returns the new state and the step's metrics."""
  cfg = ctx.cfg
  step = int(state.step)
  phase = ctx.method.phase_at(cfg, step)
  timings: dict[str, float] = {}
  t0 = time.perf_counter()
  local = local_share(batch, jax.process_index(), jax.process_count())
  if phase.samples:
    rng = jax.random.fold_in(state.rng, step)
    sample_fn, grade_fn = make_rollout_fns(ctx, state.params, rng, timings)
    rb = rollout_lib.collect(phase.rows, local, sample_fn, grade_fn, ctx.split_ids)
  else:
    rb = rollout_lib.demo_batch(local, which=phase.rows.which, max_len=cfg.data.max_response_len)
  advantages = np.asarray(losses.group_advantages(jnp.asarray(rb.rewards), jnp.asarray(rb.group_ids),
                                                  use_std=cfg.loss.use_std))
  packed = step_lib.pack(rb, advantages, token_budget=cfg.train.micro_batch_tokens, shards=ctx.shards,
                         pad_id=ctx.pad_id)
  t1 = time.perf_counter()
  if phase.name not in step_fns:
    step_fns[phase.name] = jit_step(ctx, phase)
  with sharding.activate(ctx.mesh):
    placed = step_lib.put_packed(ctx.mesh, packed)
    if cfg.train.dump_token_probs:
      dump_token_probs(ctx, state.params, placed, packed, phase, step + 1, step_fns)
    state, step_metrics = step_fns[phase.name](state, placed, phase.objective.weights_at(step))
  step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  t2 = time.perf_counter()
  m = rollout_metrics(rb, len(phase.rows.stages)) if phase.samples else {}
  m.update(step_metrics)
  m["lr"] = state_lib.learning_rate(cfg.optim, step)
  m["time/sampling"] = timings.get("sampling", 0.0)
  m["time/grading"] = timings.get("grading", 0.0)
  m["grader/timeouts"] = timings.get("grader_timeouts", 0)
  m["grader/restarts"] = timings.get("grader_restarts", 0)
  m["time/update"] = t2 - t1
  m["time/step"] = t2 - t0
  m["tokens_per_s"] = float(packed.seq_mask.sum()) / max(t2 - t0, 1e-9)
  m.update({f"phase_{p.name}": float(p.name == phase.name) for p in ctx.method.phases(cfg)})
  return state, m


def run(cfg, workdir: str) -> dict:
  """Trains per `cfg` in `workdir` (resuming from its latest checkpoint) and evaluates at the end if asked."""
  os.makedirs(workdir, exist_ok=True)
  ctx = build_context(cfg, workdir)
  logging.info("policy: %s, %.1fM parameters; mesh %s", ctx.model_cfg.model_type, ctx.model_cfg.num_params / 1e6,
               dict(ctx.mesh.shape))
  loader = _loader(ctx)
  state = state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_checkpoints, every=cfg.train.ckpt_every)
  if checkpointer.latest_step() is not None:
    state, meta = checkpointer.restore(state)
    loader.restore(meta["data"])
  start = int(state.step)
  results: dict[str, Any] = {}
  if start == 0 and cfg.eval.at_start:
    results["before"] = _evaluate(ctx, state.params, "before")
  step_fns: dict[str, Any] = {}  # phase name -> its compiled step
  writer = metrics_lib.MetricWriter(workdir, cfg.train.steps, start)
  bad_in_a_row = 0
  try:
    with _Preemption() as preempt:
      while int(state.step) < cfg.train.steps:
        state, m = train_one_step(ctx, state, next(loader), step_fns)
        step = int(state.step)
        bad_in_a_row = bad_in_a_row + 1 if m["skipped"] else 0
        if m["skipped"]:
          logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, bad_in_a_row)
        writer.write(step, m)
        meta = {"data": loader.state(), "algo": cfg.algo}
        if preempt.requested:
          checkpointer.save(step, state, meta, force=True)
          logging.warning("preempted: checkpoint of step %d saved, exiting", step)
          return {"preempted": step}
        checkpointer.save(step, state, meta, force=step == cfg.train.steps)
        if bad_in_a_row >= cfg.train.max_bad_steps:
          raise TrainingError(f"{bad_in_a_row} consecutive non-finite updates (train.max_bad_steps="
                              f"{cfg.train.max_bad_steps}); last good params are in the latest checkpoint")
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
          results[f"step_{step}"] = _evaluate(ctx, state.params, f"step_{step}")
  finally:
    writer.close()
    checkpointer.close()
  if jax.process_index() == 0 and os.path.exists(writer.path):
    metrics_lib.plot_curves(metrics_lib.read_jsonl(writer.path), os.path.join(workdir, "curves.png"))
    metrics_lib.plot_token_probs(workdir, os.path.join(workdir, "token_probs.png"), alpha=trust_region(ctx))
  if cfg.eval.at_end:
    results["after"] = _evaluate(ctx, state.params, "after")
  if "before" in results and "after" in results and jax.process_index() == 0:
    from trapo_jax.eval import evaluate
    print(evaluate.before_after_table(results["before"], results["after"]))
  return results


def trust_region(ctx: Context) -> float:
  """TrSFT's alpha when the method has such a term (the figure's threshold), else the official 0.1."""
  alphas = [dict(t.params)["alpha"] for ph in ctx.method.phases(ctx.cfg) for t in ph.objective.terms
            if t.loss == "trsft"]
  return alphas[0] if alphas else 0.1


def _evaluate(ctx: Context, params, name: str) -> dict:
  from trapo_jax.eval import evaluate
  return evaluate.evaluate(ctx.cfg, params, ctx.model_cfg, ctx.tokenizer, ctx.sampler,
                           out_dir=os.path.join(ctx.workdir, "eval", name), data_dir=data_dir(ctx.cfg, ctx.workdir))


def load_policy_for_inference(cfg, workdir: str):
  """(context, params): the workdir's latest checkpoint if any, else the configured initial policy."""
  ctx = build_context(cfg, workdir)
  state = state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx)
  try:
    params, step = ckpt_lib.restore_params(workdir, state)
  except FileNotFoundError:
    logging.info("no checkpoint in %s: using the initial policy", workdir)
    return ctx, state.params
  logging.info("using the checkpoint of step %d", step)
  return ctx, params


def export(cfg, workdir: str, out_dir: str) -> None:
  """Writes the workdir's latest policy as a Hugging Face directory (with the tokenizer)."""
  ctx, params = load_policy_for_inference(cfg, workdir)
  if jax.process_index() == 0:
    hf.save_hf(out_dir, ctx.model_cfg, params, tokenizer=ctx.tokenizer)
    logging.info("exported to %s", out_dir)
