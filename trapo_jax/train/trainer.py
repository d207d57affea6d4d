"""The one training loop: every registered method (trapo_jax/algorithms/) differs only by the rows and objective of
its phases.

A step: the phase's rows (Rollouts.collect, trapo_jax/sampling/rollouts.py: stages of rollouts with the grader between
them, or demonstrations) -> group advantages -> the phase's jitted, sharded objective + AdamW update (train/programs.py
says which) -> metrics. The trainer holds the loop, the state and the checkpoints: orbax checkpoints hold the train
state and the data position; a run started on a workdir with a checkpoint resumes from it exactly; SIGTERM and Ctrl-C
save and exit.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from trapo_jax import algorithms
from trapo_jax import distributed
from trapo_jax import errors
from trapo_jax import losses
from trapo_jax import paths
from trapo_jax import sharding
from trapo_jax.errors import TrainingError
from trapo_jax.models import hf
from trapo_jax.sampling import rollout as rollout_lib
from trapo_jax.sampling import rollouts as rollouts_lib
from trapo_jax.sampling.sampler import Sampler
from trapo_jax.train import checkpoint as ckpt_lib
from trapo_jax.train import metrics as metrics_lib
from trapo_jax.train import programs
from trapo_jax.train import state as state_lib
from trapo_jax.train import step as step_lib
from trapo_jax.train import workdir as workdir_lib


@dataclasses.dataclass
class Context:
  """Everything a run builds once: mesh, model, tokenizer, method, sampler and the rollouts over it."""
  cfg: Any
  workdir: str
  method: algorithms.Method
  mesh: Any
  model_cfg: Any
  tokenizer: Any
  tx: Any
  sampler: Sampler
  pad_id: int
  rollouts: rollouts_lib.Rollouts | None = None  # the phases' rows (sampling/rollouts.py), over `sampler`
  reference: Any = None  # the frozen reference policy of the KL options, built on first use (reference_policy)
  # Optimizers by name ("" the run's), when the method has more than one: their states share the train state.
  txs: dict[str, Any] | None = None
  loader: Any = None  # the training PromptLoader, once `run` has built it (updates from `after_update` read it)
  part_loaders: dict[str, Any] = dataclasses.field(default_factory=dict)  # loaders of a split's parts (phase_loader)
  algo_state: dict[str, Any] = dataclasses.field(default_factory=dict)  # the method's run state (checkpointed)

  @property
  def shards(self) -> int:
    return sharding.local_batch_shards(self.mesh)

  def tx_of(self, phase: algorithms.Phase):
    return programs.phase_optimizer(self.txs, self.tx, phase)


def build_context(cfg, workdir: str) -> Context:
  from trapo_jax.data import pipeline
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
  method = algorithms.from_config(cfg)
  txs = programs.make_optimizers(cfg, method)
  sampler = Sampler.shared(model_cfg, mesh=mesh, gather_weights=rollouts_lib.gathers_weights(cfg))
  return Context(cfg=cfg, workdir=workdir, method=method, mesh=mesh, model_cfg=model_cfg, tokenizer=tokenizer,
                 tx=programs.state_optimizer(cfg, txs), sampler=sampler, pad_id=pipeline.pad_id(tokenizer),
                 rollouts=rollouts_lib.Rollouts.build(cfg, sampler, tokenizer), txs=txs,
                 algo_state=method.initial_state(cfg))


def with_data_length(ctx: Context) -> Context:
  """The context over the run's length set from its training examples where the method counts it in epochs
  (Method.length_from_data: SFT's `epochs`, with ctx.loader built): the config changed, the method and its optimizers
  (whose schedules span the length) rebuilt. The changed config is the run's: it is stored in the workdir, and a
  resumed run over the same data sets the same length."""
  changes = ctx.method.length_from_data(ctx.cfg, ctx.loader.examples)
  if not changes:
    return ctx
  cfg = copy.deepcopy(ctx.cfg)
  cfg.update_from_flattened_dict(changes)
  logging.info("%s: %s, from %d training examples", cfg.algo, ", ".join(f"{k}={v}" for k, v in changes.items()),
               len(ctx.loader.examples))
  method = algorithms.from_config(cfg)
  txs = programs.make_optimizers(cfg, method)
  rollouts = None if ctx.rollouts is None else dataclasses.replace(ctx.rollouts, cfg=cfg)
  return dataclasses.replace(ctx, cfg=cfg, method=method, txs=txs, tx=programs.state_optimizer(cfg, txs),
                             rollouts=rollouts)


class _Preemption:
  """SIGTERM (preemption) or a first SIGINT (Ctrl-C) sets a flag; the loop saves a checkpoint after the current step
  and returns. A second SIGINT gets the default action, which ends the process at once (no checkpoint)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def exit_code(self) -> int:
    """The shell's code for a death by that signal, 128 + its number: 143 (SIGTERM) or 130 (SIGINT)."""
    return errors.EXIT_INTERRUPTED if self.signum == signal.SIGINT else errors.EXIT_PREEMPTED

  def __enter__(self):
    for signum in self.SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. called from a test thread): no handler
        pass
    return self

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C aborts even inside a long compiled program
      logging.warning("%s: saving a checkpoint after this step (Ctrl-C again aborts without saving)", name)
    else:
      logging.warning("%s: saving a checkpoint after this step", name)
    self.signum = self.signum or signum

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False


def jit_step(ctx: Context, phase: algorithms.Phase):
  """The phase's train step, compiled on first use: (state, packed batch, term weights[, reference params]) ->
  (state, metrics), every sharding stated (step.jit_train_step)."""
  return programs.train_step(ctx.cfg, phase, ctx.model_cfg, ctx.mesh, ctx.tx_of(phase), state_tx=ctx.tx)


def reference_policy(ctx: Context):
  """The frozen reference policy pi_ref of the KL options: the initial policy, placed like the policy's params
  (built once; a resumed run builds the same one)."""
  if ctx.reference is None:
    ctx.reference = state_lib.init_params(ctx.cfg, ctx.model_cfg, ctx.mesh)
  return ctx.reference


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


def phase_loader(ctx: Context, phase: algorithms.Phase):
  """The loader of the prompts the phase draws: the run's, or one over its part of the method's split (built once,
  from the run's loader's examples)."""
  if not phase.prompts_from:
    return ctx.loader
  if phase.prompts_from not in ctx.part_loaders:
    from trapo_jax.data import pipeline
    cfg, held_out = ctx.cfg, ctx.method.held_out(ctx.cfg)
    examples = [e for e in ctx.loader.examples if algorithms.base.in_part(e.uid, held_out, phase.prompts_from)]
    ctx.part_loaders[phase.prompts_from] = pipeline.PromptLoader(
        examples, ctx.tokenizer, batch_size=cfg.train.batch_prompts, max_prompt_len=cfg.data.max_prompt_len,
        max_response_len=cfg.data.max_response_len, template=cfg.data.template, seed=cfg.data.shuffle_seed,
        demo_form=ctx.method.demo_form(cfg))
  return ctx.part_loaders[phase.prompts_from]


def data_dir(cfg, workdir: str) -> str:
  """data.data_dir, by default `tfds/` beside the workdir: the runs of a directory (a sweep's, runs/) prepare each
  dataset once, and it is where every host of a pod finds it, the workdir's bucket or shared disk."""
  return cfg.data.data_dir or paths.join(paths.parent(workdir), "tfds")


def local_share(batch, index: int, count: int):
  """This process's consecutive share of a global PromptBatch (every process builds the same global batch)."""
  if count == 1:
    return batch
  g = batch.prompt_ids.shape[0]
  if g % count:
    raise TrainingError(f"train.batch_prompts={g} must be divisible by the {count} processes")
  return batch.take(slice(index * g // count, (index + 1) * g // count))


def dump_token_probs(ctx: Context, params, placed: dict, packed, phase: algorithms.Phase, step: int,
                     step_fns: dict) -> None:
  """The probabilities the policy about to be updated gives imitated expert tokens and its own tokens, written to
  <workdir>/token_probs/ (this process's rows; process 0 writes)."""
  p = np.exp(_packed_logprobs(ctx, params, placed, phase, step_fns))
  resp = packed.response_mask.astype(bool)
  prefix = resp & packed.prefix_mask.astype(bool)
  if jax.process_index() == 0:
    metrics_lib.write_token_probs(ctx.workdir, step, p[prefix & packed.off_loss_mask.astype(bool)],
                                  p[resp & ~prefix])


def _packed_logprobs(ctx: Context, params, placed: dict, phase: algorithms.Phase, step_fns: dict) -> np.ndarray:
  """log-probs [M, mb, Lb] of this process's rows of a placed packed batch under `params`, as numpy."""
  key = f"{phase.name}/logprobs"
  if key not in step_fns:
    rows = step_lib.packed_sharding(ctx.mesh)
    step_fns[key] = jax.jit(functools.partial(step_lib.packed_logprobs, model_cfg=ctx.model_cfg,
                                              chunk_size=ctx.cfg.train.logprob_chunk, temperature=phase.temperature),
                            in_shardings=(state_lib.param_shardings(ctx.model_cfg, ctx.mesh), rows),
                            out_shardings=rows)
  return np.asarray(sharding.to_host(ctx.mesh, step_fns[key](params, placed), batch_axis=1))


def kl_reward_penalty(ctx: Context, params, placed: dict, packed, phase: algorithms.Phase,
                      step_fns: dict) -> np.ndarray:
  """[N] loss.kl_coef x the sum over each row's own tokens of the KL estimate between the policy that sampled the
  rows (its old log-probs) and the reference policy: the KL as a reward penalty (docs/algorithm.md#rl-options)."""
  cfg = ctx.cfg
  ref = _packed_logprobs(ctx, reference_policy(ctx), placed, phase, step_fns)
  old = (packed.sampler_logp if programs.updates_of(cfg, phase).old_logp == "sampler"
         else _packed_logprobs(ctx, params, placed, phase, step_fns))
  kl = np.asarray(losses.kl_estimate(jnp.asarray(old), jnp.asarray(ref), cfg.loss.kl_estimator))
  own = packed.response_mask & ~packed.prefix_mask
  return cfg.loss.kl_coef * np.where(own, kl, 0.0).sum(-1).reshape(-1)


# One program a batch shape, not the dozen single-op programs the estimator's ops would each compile eagerly.
_jitted_advantages = jax.jit(losses.advantages, static_argnames=("estimator", "use_std"))


def row_advantages(ctx: Context, rb: rollout_lib.RolloutBatch, rewards: np.ndarray):
  """(advantages [N], the given prefixes' [N] or None): the method's own estimator (Method.advantages) where it has
  one, else loss.advantage over each prompt's group (its members: rb.in_group)."""
  cfg = ctx.cfg
  own = ctx.method.advantages(cfg, rb, rewards)
  if own is not None:
    return np.asarray(own[0]), None if own[1] is None else np.asarray(own[1])
  member = None if rb.in_group is None else jnp.asarray(rb.in_group)
  return np.asarray(_jitted_advantages(cfg.loss.advantage, jnp.asarray(rewards), jnp.asarray(rb.group_ids),
                                      use_std=ctx.method.advantage_std(cfg), member=member)), None


def train_one_step(ctx: Context, state: state_lib.TrainState, batch, step_fns: dict,
                   more_prompts=None) -> tuple[Any, dict]:
  """Rollouts, advantages and the update for one PromptBatch; returns the new state and the step's metrics.

  more_prompts: an iterator of further PromptBatches (the run's loader) that dynamic sampling draws refills from;
  the loader's position then counts them, so a checkpoint resumes after them.
  """
  cfg = ctx.cfg
  step = int(state.step)
  phase = ctx.method.phase_at(cfg, step)
  t0 = time.perf_counter()
  share = lambda prompts: local_share(prompts, jax.process_index(), jax.process_count())
  # Host draws of the plan (random prefixes, hints): seeded by the run's key, the step and the process.
  draws = np.random.default_rng([*np.asarray(jax.device_get(state.rng)).tolist(), step, jax.process_index()])
  more = None if more_prompts is None else map(share, more_prompts)  # drawn lazily: only the refills advance it
  # The phase's rows, the rewards their advantages start from, and the step's rollout metrics (sampling/rollouts.py).
  rb, rewards, m = ctx.rollouts.collect(phase.rows, share(batch), state.params, jax.random.fold_in(state.rng, step),
                                        draws=draws, more_prompts=more)
  option_metrics: dict[str, float] = {}
  train_rb = rb
  if cfg.rollout.overlong_filter and rb.truncated is not None:
    train_rb = rollout_lib.without_rows(rb, rb.truncated)  # DAPO's overlong filtering
    option_metrics["overlong/filtered_rows"] = float(rb.truncated.sum())
  packed = step_lib.pack(train_rb, np.zeros_like(rewards), shards=ctx.shards, pad_id=ctx.pad_id,
                         **programs.pack_options(cfg, phase))
  if phase.name not in step_fns:
    step_fns[phase.name] = jit_step(ctx, phase)
  with sharding.activate(ctx.mesh):
    if phase.samples and cfg.loss.kl_coef > 0 and cfg.loss.kl_in == "reward":
      penalty = kl_reward_penalty(ctx, state.params, step_lib.put_packed(ctx.mesh, packed), packed, phase, step_fns)
      rewards = rewards - penalty.astype(np.float32)
      option_metrics["kl/reward_penalty"] = float(penalty.mean())
    advantages, prefix_advantages = row_advantages(ctx, rb, rewards)
    packed.advantages = advantages.astype(np.float32).reshape(packed.advantages.shape)
    if phase.prefix_advantages:
      if prefix_advantages is None:
        raise TrainingError(f"phase {phase.name}: declares prefix advantages, the method's estimator gave none")
      packed.prefix_advantages = prefix_advantages.astype(np.float32).reshape(packed.advantages.shape)
    t1 = time.perf_counter()
    placed = step_lib.put_packed(ctx.mesh, packed)
    if cfg.train.dump_token_probs:
      dump_token_probs(ctx, state.params, placed, packed, phase, step + 1, step_fns)
    reference = (reference_policy(ctx),) if programs.uses_reference(phase) else ()
    state, step_metrics = step_fns[phase.name](state, placed, phase.objective.weights_at(step), *reference)
  step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
  t2 = time.perf_counter()
  m.update(option_metrics)
  m.update(step_metrics)
  if phase.samples:
    state, after = _after_update(ctx, state, batch, rb, step, step_fns)
    m.update(after)
  # At the step's first update, by the phase's optimizer (a method's own where the phase names one).
  optim = programs.optim_config(cfg, ctx.method, phase.optimizer)
  m["lr"] = state_lib.learning_rate(optim, step * programs.updates_of(cfg, phase).count)
  m["time/update"] = t2 - t1
  m["time/step"] = t2 - t0
  m["tokens_per_s"] = float(packed.seq_mask.sum()) / max(t2 - t0, 1e-9)
  m.update({f"phase_{p.name}": float(p.name == phase.name) for p in ctx.method.phases(cfg)})
  return state, m


def _after_update(ctx: Context, state, batch, rb: rollout_lib.RolloutBatch, step: int,
                  step_fns: dict) -> tuple[Any, dict]:
  """The method's `after_update`: its new run state, and the updates it asks for, run now on the demonstrations of
  the prompts it names (global uids; each process takes its share). They do not count as optimizer steps."""
  rewards = rb.rewards
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    rewards = np.asarray(multihost_utils.process_allgather(rewards, tiled=True))
  rewards = rewards.reshape(len(batch.uids), -1)
  ctx.algo_state, extra = ctx.method.after_update(ctx.cfg, step, np.asarray(batch.uids), rewards, ctx.algo_state)
  m = {f"algo/{k}_size": float(len(v)) for k, v in ctx.algo_state.items() if isinstance(v, (list, tuple))}
  for phase, uids in extra:
    if phase.samples:
      raise TrainingError(f"phase {phase.name}: updates after the step train on demonstration rows only")
    if ctx.loader is None:
      raise TrainingError(f"phase {phase.name}: needs the run's prompt loader (trainer.run sets it)")
    local = local_share(ctx.loader.prompts(uids), jax.process_index(), jax.process_count())
    rows = rollout_lib.demo_batch(local, which=phase.rows.which, max_len=ctx.cfg.data.max_response_len)
    packed = step_lib.pack(rows, np.zeros(rows.rewards.shape, np.float32), shards=ctx.shards, pad_id=ctx.pad_id,
                           **programs.pack_options(ctx.cfg, phase))
    if phase.name not in step_fns:
      step_fns[phase.name] = jit_step(ctx, phase)
    with sharding.activate(ctx.mesh):
      state, metrics = step_fns[phase.name](state, step_lib.put_packed(ctx.mesh, packed),
                                            phase.objective.weights_at(step))
    # train_step counts every update; the step count stays that of the main updates.
    state = state.replace(step=jax.device_put(np.int32(step + 1), state.step.sharding))
    m.update({f"{phase.name}/{k}": float(v) for k, v in jax.device_get(metrics).items()})
  return state, m


# evaluate(ctx, params, name) -> results: what the run reports at eval.at_start / every / at_end (main passes it).
Evaluate = Callable[["Context", Any, str], dict]


def run(cfg, workdir: str, *, allow_config_change: bool = False, evaluate: Evaluate | None = None) -> dict:
  """Trains per `cfg` in `workdir` (resuming from its newest checkpoint that restores); {"preempted": step,
  "exit_code": 143 or 130} if SIGTERM or Ctrl-C stopped it. With `evaluate`, evaluates as eval.at_start / every /
  at_end ask, results under their names ("before", "step_N", "after"). The workdir is locked while it runs
  (train/workdir.py); its config.json is this config once the checkpoint it resumes accepts it."""
  with workdir_lib.hold(workdir):
    return _run(cfg, workdir, allow_config_change, evaluate)


def _run(cfg, workdir: str, allow_config_change: bool, evaluate: Evaluate | None) -> dict:
  ctx = build_context(cfg, workdir)
  logging.info("policy: %s, %.1fM parameters; mesh %s", ctx.model_cfg.model_type, ctx.model_cfg.num_params / 1e6,
               dict(ctx.mesh.shape))
  loader = _loader(ctx)
  ctx.loader = loader
  ctx = with_data_length(ctx)
  cfg = ctx.cfg
  state = state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=cfg.train.keep_checkpoints, every=cfg.train.ckpt_every)
  identity = workdir_lib.run_identity(cfg, ctx.model_cfg)
  restored = checkpointer.restore_newest(state, move_unreadable=True, check_meta=functools.partial(
      workdir_lib.check_resume, current=identity, workdir=workdir, allow_change=allow_config_change))
  if restored is not None:
    state, meta = restored
    # The position is that of the loader the last step drew from; a phase on another part starts its own afresh.
    first = ctx.method.phase_at(cfg, int(state.step))
    if meta["data"].get("part", "") == first.prompts_from:
      phase_loader(ctx, first).restore(meta["data"])
    ctx.algo_state = meta.get("algo_state", ctx.algo_state)
  workdir_lib.save_config(workdir, cfg)  # once the checkpoint's run accepted this config
  start = int(state.step)
  results: dict[str, Any] = {}
  if evaluate is None and (cfg.eval.at_start or cfg.eval.every or cfg.eval.at_end):
    logging.info("no evaluation function given: eval.at_start / every / at_end are not run")
    evaluate = lambda *args: None
  if start == 0 and cfg.eval.at_start:
    results["before"] = evaluate(ctx, state.params, "before")
  step_fns: dict[str, Any] = {}  # phase name -> its compiled step
  writer = metrics_lib.MetricWriter(workdir, cfg.train.steps, start)
  bad_in_a_row = 0
  try:
    with _Preemption() as preempt:
      while int(state.step) < cfg.train.steps:
        phase = ctx.method.phase_at(cfg, int(state.step))
        prompts = phase_loader(ctx, phase)
        state, m = train_one_step(ctx, state, next(prompts), step_fns, more_prompts=prompts)
        step = int(state.step)
        bad_in_a_row = bad_in_a_row + 1 if m["skipped"] else 0
        if m["skipped"]:
          logging.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, bad_in_a_row)
        writer.write(step, m)
        data = dict(prompts.state(), part=phase.prompts_from) if phase.prompts_from else prompts.state()
        meta = {"data": data, "algo": cfg.algo, "identity": identity, "algo_state": ctx.algo_state}
        if preempt.requested:
          checkpointer.save(step, state, meta, force=True)
          logging.warning("preempted: checkpoint of step %d saved, exiting", step)
          return {"preempted": step, "exit_code": preempt.exit_code}
        checkpointer.save(step, state, meta, force=step == cfg.train.steps)
        if bad_in_a_row >= cfg.train.max_bad_steps:
          raise TrainingError(f"{bad_in_a_row} consecutive non-finite updates (train.max_bad_steps="
                              f"{cfg.train.max_bad_steps}); last good params are in the latest checkpoint")
        if cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
          results[f"step_{step}"] = evaluate(ctx, state.params, f"step_{step}")
  finally:
    writer.close()
    checkpointer.close()
  if jax.process_index() == 0 and paths.exists(writer.path):
    metrics_lib.plot_curves(metrics_lib.read_jsonl(writer.path), paths.join(workdir, "curves.png"))
    metrics_lib.plot_token_probs(workdir, paths.join(workdir, "token_probs.png"), alpha=threshold(ctx))
  if cfg.eval.at_end:
    results["after"] = evaluate(ctx, state.params, "after")
  return {k: v for k, v in results.items() if v is not None}


def threshold(ctx: Context) -> float:
  """The token probability the figure marks: the one a term of the method declares (losses.TokenLoss.threshold),
  else 0.1."""
  marks = [ph.objective.threshold for ph in ctx.method.phases(ctx.cfg) if ph.objective.threshold is not None]
  return marks[0] if marks else 0.1


def load_policy_for_inference(cfg, workdir: str, *, allow_initial_policy: bool = False):
  """(context, params, step): the workdir's newest checkpoint that restores; the configured initial policy (step 0)
  only if `allow_initial_policy` and the workdir has no checkpoint (a mistyped workdir is an error, and is not
  created)."""
  if not allow_initial_policy and not ckpt_lib.has_checkpoint(workdir):
    raise ckpt_lib.NoCheckpoint(f"{workdir}: no checkpoint to evaluate or export (--allow_initial_policy uses the "
                                f"initial policy)")
  ctx = build_context(cfg, workdir)
  state = state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx)
  try:
    params, step = ckpt_lib.restore_params(workdir, state, check_meta=functools.partial(
        workdir_lib.check_model, current=workdir_lib.run_identity(cfg, ctx.model_cfg), workdir=workdir))
  except ckpt_lib.NoCheckpoint:
    if not allow_initial_policy:
      raise
    logging.warning("no checkpoint in %s: using the initial policy (--allow_initial_policy)", workdir)
    return ctx, state.params, 0
  logging.info("using the checkpoint of step %d", step)
  return ctx, params, step


def export(cfg, workdir: str, out_dir: str, *, allow_initial_policy: bool = False) -> None:
  """Writes the workdir's newest policy as a Hugging Face directory (with the tokenizer, its chat template the
  training prompt `data.template`, and the generation config)."""
  from trapo_jax.data import templates
  ctx, params, _ = load_policy_for_inference(cfg, workdir, allow_initial_policy=allow_initial_policy)
  if jax.process_count() > 1:  # params sharded over every host's devices: all take part in gathering them
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
  if jax.process_index() == 0:
    hf.save_hf(out_dir, ctx.model_cfg, params, tokenizer=ctx.tokenizer,
               chat_template=templates.chat_template(cfg.data.template))
    logging.info("exported to %s", out_dir)
