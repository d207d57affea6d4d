"""The RL options (docs/algorithm.md#rl-options): with every option off the official objective and step are those of
before the options, bit for bit (tests/frozen_trapo.py); PPO epochs and mini-batches; dynamic sampling, its refill
limit and the data position; overlong handling; the reference policy; config errors; a short run with options on.

The per-token losses of the options are checked against float64 references in tests/test_losses.py (kernels) and
tests/test_algorithms.py (every method's objective with the options set).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import default
from tests import frozen_trapo
from tests import helpers
from tests.helpers import SPLIT, config_of, fake_batch, fake_sampler, restored_state, tiny
from trapo_jax import algorithms
from trapo_jax import config as config_lib
from trapo_jax import losses
from trapo_jax import reduction
from trapo_jax.data import pipeline
from trapo_jax.data import synthetic
from trapo_jax.errors import ConfigError
from trapo_jax.models import hf
from trapo_jax.models import transformer as tfm
from trapo_jax.sampling import microgroup
from trapo_jax.sampling import rollout
from trapo_jax.sampling import rollouts
from trapo_jax.train import programs
from trapo_jax.train import state as state_lib
from trapo_jax.train import step as step_lib
from trapo_jax.train import trainer

MODEL = tfm.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        head_dim=8)
N, T, LB = 8, 16, 8  # rows, packed sequence width, response width


def _params(seed: int = 0):
  return nn.unbox(tfm.init_params(MODEL, jax.random.key(seed)))


def _rows(seed: int = 0) -> dict[str, np.ndarray]:
  """N packed rows as TRAPO makes them: own rollouts, a guided row (prefix imitated or not), a demonstration."""
  rng = np.random.default_rng(seed)
  lens = np.array([8, 5, 8, 3, 8, 6, 7, 6])
  prefix_lens = np.array([0, 0, 0, 0, 2, 2, 4, 6])
  pos = np.arange(LB)[None]
  response = pos < lens[:, None]
  prefix = pos < prefix_lens[:, None]
  imitated = prefix & np.array([0, 0, 0, 0, 0, 1, 1, 1], bool)[:, None]
  own = response & ~prefix
  return dict(seq_tokens=rng.integers(1, MODEL.vocab_size, (N, T)).astype(np.int32),
              seq_mask=np.arange(T)[None] < (8 + lens)[:, None], resp_start=np.full((N,), 8, np.int32),
              resp_tokens=rng.integers(1, MODEL.vocab_size, (N, LB)).astype(np.int32), prefix_mask=prefix,
              off_loss_mask=imitated, response_mask=response,
              advantages=np.array([0.5, -0.5, -0.5, 0.5, -0.5, 0.5, 0.5, 0.5], np.float32),
              rewards=np.array([1, 0, 0, 1, 0, 1, 1, 1], np.float32),
              kind=np.array([losses.ROW_OWN] * 4 + [losses.ROW_GUIDED] * 3 + [losses.ROW_DEMO], np.int32),
              # log-probs the sampler drew with: about those of a random 64-token model, on generated tokens only
              sampler_logp=np.where(own, rng.uniform(-5.0, -3.5, (N, LB)), 0.0).astype(np.float32))


def _micro(rows: dict, m: int) -> dict:
  return {k: jnp.asarray(v.reshape(m, -1, *v.shape[1:])) for k, v in rows.items()}


def _official():
  cfg = default.get_config()
  phase = algorithms.from_config(cfg).phase_at(cfg, 0)
  return cfg, phase


def _state(params, tx):
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                              rng=jax.random.PRNGKey(0))


# ---------------------------------------------------------------------------------------------- every option off

def test_official_objective_is_bit_identical_with_every_option_off():
  """The objective the registry builds from the default config, value and gradient, against the frozen copy."""
  cfg, phase = _official()
  assert programs.updates_of(cfg, phase) == step_lib.Updates()
  rng = np.random.default_rng(1)
  rows = _rows(1)
  logp = rng.uniform(-6.0, -0.01, (N, LB)).astype(np.float32)
  x = losses.TokenInputs(
      logp=jnp.asarray(logp), old_logp=jnp.asarray(logp), entropy=jnp.asarray(rng.uniform(0, 3, (N, LB)), jnp.float32),
      advantages=jnp.asarray(rows["advantages"]), rewards=jnp.asarray(rows["rewards"]), kind=jnp.asarray(rows["kind"]),
      prefix_mask=jnp.asarray(rows["prefix_mask"]), off_loss_mask=jnp.asarray(rows["off_loss_mask"]),
      response_mask=jnp.asarray(rows["response_mask"]))
  weights = phase.objective.weights_at(0)

  def value_and_grad(objective_loss, x):
    def f(lp):
      y = dataclasses.replace(x, logp=lp, old_logp=jax.lax.stop_gradient(lp))
      return objective_loss(y, phase.objective, weights)[0]
    return jax.jit(jax.value_and_grad(f))(x.logp)

  new = value_and_grad(losses.objective_loss, dataclasses.replace(x, sampler_logp=jnp.asarray(rows["sampler_logp"])))
  ref = value_and_grad(frozen_trapo.objective_loss, x)
  np.testing.assert_array_equal(new[0], ref[0])
  np.testing.assert_array_equal(new[1], ref[1])
  assert float(ref[0]) != 0.0 and np.abs(np.asarray(ref[1])).max() > 0


def test_official_step_is_bit_identical_with_every_option_off():
  """ppo_epochs=1, mini_batches=1, every option off: the train step (gradient, AdamW update, metrics) is the
  frozen one's, bit for bit; the batch carries the sampler's log-probs, as a run's does, and they change nothing."""
  if helpers.rerun_with_fusion_emitters(__file__, "test_official_step_is_bit_identical_with_every_option_off"):
    return
  cfg, phase = _official()
  tx = state_lib.make_optimizer(cfg.optim)
  state = _state(_params(), tx)
  rows = _rows()
  batch = _micro(rows, 2)
  old_batch = {k: v for k, v in batch.items() if k != "sampler_logp"}
  weights = phase.objective.weights_at(0)
  kw = dict(model_cfg=MODEL, objective=phase.objective, chunk_size=4, temperature=phase.temperature)

  @functools.partial(jax.jit, static_argnums=0)
  def gradient_and_step(lib, state, batch):  # one program each: the gradient alone, and the whole step
    extra = dict(updates=programs.updates_of(cfg, phase)) if lib is step_lib else {}
    return (lib.accumulate_gradients(state.params, batch, weights, **kw)[0],
            lib.train_step(state, batch, weights, tx=tx, **extra, **kw))

  grads, (new, m) = gradient_and_step(step_lib, state, batch)
  ref_grads, (ref, ref_m) = gradient_and_step(frozen_trapo, state, old_batch)
  jax.tree.map(np.testing.assert_array_equal, grads, ref_grads)
  jax.tree.map(np.testing.assert_array_equal, new, ref)
  for k in ref_m:
    np.testing.assert_array_equal(m[k], ref_m[k], err_msg=k)
  assert float(ref_m["loss"]) != 0.0 and float(ref_m["num_prefix_tokens"]) > 0
  # What is new is only the mismatch, measured on the generated tokens.
  assert set(m) - set(ref_m) == {"mismatch/abs_logp_mean", "mismatch/abs_logp_max"}


# ---------------------------------------------------------------------------------------------- PPO updates

def _ppo(params, batch, updates, tx, objective, ref_params=None):
  fn = functools.partial(step_lib.ppo_updates, tx=tx, model_cfg=MODEL, objective=objective, chunk_size=4,
                         updates=updates)
  new, opt_state, per_update, step_m = jax.jit(fn)(params, tx.init(params), batch, objective.weights_at(0), ref_params)
  return new, opt_state, reduction.values(per_update), reduction.values(step_m)


def test_ppo_first_ratio_is_one_and_later_updates_use_the_old_log_probs():
  """2 epochs x 2 mini-batches: at the first mini-batch the ratio is exactly 1 (old log-probs recomputed); at the
  later ones it is not, and the second update is the one-update step of its mini-batch from the first update's
  parameters, with the log-probs from before the step as old ones."""
  cfg, phase = _official()
  with cfg.unlocked():
    cfg.loss.update(clip_eps=0.2, clip_eps_high=0.28)
  objective = algorithms.from_config(cfg).phase_at(cfg, 0).objective
  params = _params()
  batch = _micro(_rows(), 4)  # 4 micro-batches: 2 per mini-batch
  lr = 0.5  # plain SGD: the updates are the gradients, so a comparison is not amplified by Adam's normalisation
  tx = optax.sgd(lr)
  new, _, per_update, step_m = _ppo(params, batch, step_lib.Updates(epochs=2, mini_batches=2), tx, objective)
  ratio = np.asarray(per_update["ppo/abs_log_ratio_max"])
  assert ratio.shape == (4,) and ratio[0] == 0.0 and (ratio[1:] > 1e-4).all()
  assert not np.asarray(per_update["skipped"]).any()
  # The mismatch to the sampler is measured once, on the parameters the step starts from.
  # Updates 0 and 1 by hand: mini-batch 0 at the starting parameters, then mini-batch 1 from the parameters after
  # it, against the log-probs from before the step.
  kw = dict(model_cfg=MODEL, objective=objective, chunk_size=4)
  weights = objective.weights_at(0)

  @jax.jit
  def by_hand(params, batch):
    start = step_lib.packed_logprobs(params, batch, model_cfg=MODEL, chunk_size=4)
    g0, m0 = step_lib.accumulate_gradients(params, _slice(batch, 0, 2), weights, **kw)
    params1 = jax.tree.map(lambda p, g: p - lr * g, params, g0)
    mini1 = dict(_slice(batch, 2, 4), old_logp=start[2:4], first=jnp.zeros((2,), bool))
    m1 = step_lib.accumulate_gradients(params1, mini1, weights, old_logp="batch", **kw)[1]
    return start, reduction.values(m0), reduction.values(m1)

  start, m0, m1 = by_hand(params, batch)
  own = np.asarray(batch["response_mask"] & ~batch["prefix_mask"])
  gap = np.abs(np.asarray(start) - np.asarray(batch["sampler_logp"]))[own]
  assert float(step_m["mismatch/abs_logp_max"]) == pytest.approx(gap.max(), rel=1e-6)
  # Two float32 evaluations of the same sums (loss magnitudes below 10, at most N * LB terms each).
  for k, ref in (("loss", m0["loss"]), ("ppo/abs_log_ratio_max", 0.0)):
    assert abs(float(per_update[k][0]) - float(ref)) <= 1e-5 * (1 + abs(float(ref))), k
  for k in ("loss", "ppo/abs_log_ratio_max", "ppo/kl", "pg/clip_frac_high"):
    assert abs(float(per_update[k][1]) - float(m1[k])) <= 1e-5 * (1 + abs(float(m1[k]))), k
  # Each update moved the parameters.
  assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))


def _slice(batch: dict, lo: int, hi: int) -> dict:
  return {k: v[lo:hi] for k, v in batch.items()}


def test_ppo_with_sampler_old_log_probs_and_reference():
  """old_logp='sampler': the first ratio is pi / pi_sampler, not 1. A reference policy enters as its log-probs."""
  cfg, _ = _official()
  with cfg.unlocked():
    cfg.loss.update(kl_coef=0.1, kl_estimator="k3")
  objective = algorithms.from_config(cfg).phase_at(cfg, 0).objective
  assert [t.name for t in objective.terms][-1] == "kl"
  params = _params()
  batch = _micro(_rows(), 2)
  _, _, per_update, step_m = _ppo(params, batch, step_lib.Updates(epochs=1, mini_batches=2, old_logp="sampler"),
                                  optax.sgd(0.1), objective, ref_params=_params(1))
  ratio = np.asarray(per_update["ppo/abs_log_ratio_max"])
  # The first update's |log ratio| is the mismatch on its mini-batch: far from 0, at most the batch's.
  assert 0.1 < ratio[0] <= float(step_m["mismatch/abs_logp_max"]) * (1 + 1e-6)
  assert (np.asarray(per_update["loss/kl"]) > 0).all()  # a different policy: KL > 0 on every mini-batch


# ---------------------------------------------------------------------------------------------- dynamic sampling

def _examples(n: int, answers) -> list[pipeline.Example]:
  return [pipeline.Example(uid=i, problem=f"What is {i} + 0?", answer=answers(i), demos=("a b", "c d"))
          for i in range(n)]


def _loader(examples, seed: int | None = 3):
  tokenizer = hf.load_tokenizer(synthetic.TOKENIZER_DIR)
  return pipeline.PromptLoader(examples, tokenizer, batch_size=4, max_prompt_len=64, max_response_len=16,
                               template="train", seed=seed)


def _grader(tokens, mask, answers):
  """'solved' prompts: every row correct; 'mixed': rows alternate; 'failed': none."""
  return np.asarray([{"solved": 1.0, "failed": 0.0}.get(a, float(i % 2)) for i, a in enumerate(answers)], np.float32)


PLAN = microgroup.Plan(stages=(4,), guidance=microgroup.Unguided())


def _step(loader, max_rounds: int):
  """One step's rollouts with dynamic sampling, drawing refills from the loader as the trainer does."""
  collect = lambda batch: rollout.collect(PLAN, batch, fake_sampler([]), _grader, [SPLIT])
  return rollout.dynamic_sampling(collect(next(loader)), lambda: collect(next(loader)), groups=4,
                                  max_rounds=max_rounds)


def test_dynamic_sampling_refills_uninformative_groups():
  """Half the prompts are solved by every rollout: their groups are dropped and refilled from further prompts."""
  loader = _loader(_examples(32, lambda i: "solved" if i % 2 else "mixed"), seed=None)  # prompts in uid order
  rb, stats = _step(loader, max_rounds=4)
  # Prompts 0-3 hold two informative groups, 4-7 two more: one refill round.
  assert stats == {"rounds": 1, "informative_groups": 4, "filtered_groups": 4, "kept_uninformative": 0}
  assert rb.levels.shape[0] == 4 and rb.group_ids.tolist() == [g for g in range(4) for _ in range(4)]
  assert rollout.informative_groups(rb).all()  # all 4 kept groups have rewards that differ
  assert rb.rewards.reshape(4, 4).tolist() == [[0, 1, 0, 1]] * 4
  # The loader drew one batch per round besides the step's own.
  assert loader.state() == {"epoch": 0, "index": 8}


def test_dynamic_sampling_stops_at_the_refill_limit():
  """Every prompt solved: max_rounds extra batches are drawn, then the batch is topped up with uninformative
  groups, keeping its shape."""
  for max_rounds in (0, 2):
    loader = _loader(_examples(32, lambda i: "solved"))
    rb, stats = _step(loader, max_rounds=max_rounds)
    assert stats == {"rounds": max_rounds, "informative_groups": 0, "filtered_groups": 4 * (1 + max_rounds),
                     "kept_uninformative": 4}
    assert loader.state()["index"] == 4 * (1 + max_rounds)
    assert rb.tokens.shape[0] == 16 and not rollout.informative_groups(rb).any()


def test_dynamic_sampling_resumes_at_the_data_position():
  """The loader's state after a step with refills (what a checkpoint saves) resumes on the very prompts a run
  without the interruption draws next."""
  examples = _examples(40, lambda i: "failed" if i % 3 else "mixed")
  straight = _loader(examples)
  _step(straight, max_rounds=3)
  saved = json.loads(json.dumps(straight.state()))  # as the checkpoint's metadata holds it
  assert saved["index"] > 4
  after = [next(straight).uids.tolist() for _ in range(3)]
  resumed = _loader(examples)
  resumed.restore(saved)
  assert [next(resumed).uids.tolist() for _ in range(3)] == after


def test_select_groups_pads_prompts_and_keeps_rows_whole():
  batches = [rollout.collect(PLAN, b, fake_sampler([]), _grader, [SPLIT])
             for b in (_prompt_batch(2, 4), _prompt_batch(2, 6))]
  rb = rollout.select_groups(batches, [(1, 1), (0, 0)])
  assert rb.prompt_ids.shape == (8, 6) and rb.group_ids.tolist() == [0] * 4 + [1] * 4
  np.testing.assert_array_equal(rb.prompt_ids[:4], batches[1].prompt_ids[4:])
  np.testing.assert_array_equal(rb.prompt_ids[4:, :4], batches[0].prompt_ids[:4])
  np.testing.assert_array_equal(rb.tokens[4:], batches[0].tokens[:4])
  assert (rb.prompt_ids[4:, 4:] == 0).all()


def _prompt_batch(g: int, width: int):
  b = fake_batch(g)
  return dataclasses.replace(b, prompt_ids=np.full((g, width), 5, np.int32))


# ---------------------------------------------------------------------------------------------- overlong handling

def test_overlong_penalty_and_filter():
  # DAPO: 0 up to L - buffer, then linear to -factor at L.
  np.testing.assert_allclose(rollout.overlong_penalty(np.array([10, 12, 13, 14, 16]), 16, 4, 1.0),
                             [0.0, 0.0, -0.25, -0.5, -1.0])
  np.testing.assert_allclose(rollout.overlong_penalty(np.array([15]), 16, 4, 0.5), [-0.375])

  def sampler(*args):  # rows of the fake sampler; the second sample of every prompt hit L without EOS
    tokens, prefix, resp = fake_sampler([])(*args)
    eos = np.arange(tokens.shape[0]) % 2 == 0
    return tokens, prefix, resp, np.full(tokens.shape, -1.0, np.float32), eos

  rb = rollout.collect(PLAN, fake_batch(2), sampler, _grader, [SPLIT])
  assert rb.truncated.tolist() == [False, True] * 4
  np.testing.assert_array_equal(rb.logprobs, -1.0)
  kept = rollout.without_rows(rb, rb.truncated)
  assert not kept.response_mask[1::2].any() and (kept.response_mask[::2] == rb.response_mask[::2]).all()
  np.testing.assert_array_equal(kept.rewards, rb.rewards)
  # The trainer punishes generated rows only: a demonstration's length is not the policy's.
  cfg = default.get_config()
  with cfg.unlocked():
    cfg.data.max_response_len = 16
    cfg.rollout.overlong_buffer = 4
  rb = dataclasses.replace(rb, response_mask=np.arange(16)[None] < np.array([14] * 8)[:, None],
                           kind=np.array([losses.ROW_OWN] * 7 + [losses.ROW_DEMO], np.int32))
  rewards, m = rollouts.shaped_rewards(cfg, rb)
  np.testing.assert_allclose(rewards, rb.rewards + np.array([-0.5] * 7 + [0.0]))
  assert m["overlong/penalty_mean"] == pytest.approx(-3.5 / 8)


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("group, key, value, message", [
    ("loss", "advantage", "gae", "loss.advantage: must be one of"),
    ("loss", "clip_eps_high", 0.28, "loss.clip_eps_high: needs loss.clip_eps"),
    ("loss", "dual_clip", 0.5, "loss.dual_clip: must be > 1"),
    ("loss", "importance_ratio", "seq", "loss.importance_ratio: must be one of"),
    ("loss", "tis_mode", "clip", "loss.tis_mode: must be one of"),
    ("loss", "kl_estimator", "k4", "loss.kl_estimator: must be one of"),
    ("loss", "kl_in", "both", "loss.kl_in: must be one of"),
    ("train", "ppo_epochs", 0, "train.ppo_epochs: must be >= 1"),
    ("train", "old_logp", "rollout", "train.old_logp: must be one of"),
    ("train", "mini_batches", 3, "train.mini_batches: 64 sequences per step"),
    ("rollout", "overlong_buffer", 96, "rollout.overlong_buffer: must lie in"),
])
def test_option_errors_name_the_key(group, key, value, message):
  cfg = default.get_config()
  with cfg.unlocked():
    cfg[group][key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.validate(cfg, num_devices=8)


def test_option_combinations_that_cannot_work():
  cfg = default.get_config()
  with cfg.unlocked():
    cfg.loss.update(tis_cap=2.0)
    cfg.train.old_logp = "sampler"
  with pytest.raises(ConfigError, match="loss.tis_cap: .*needs train.old_logp='recompute'"):
    config_lib.validate(cfg, num_devices=8)
  cfg = default.get_config()
  with cfg.unlocked():
    cfg.loss.update(use_std=True, advantage="rloo")
  with pytest.raises(ConfigError, match="loss.use_std: only GRPO"):
    config_lib.validate(cfg, num_devices=8)


# ---------------------------------------------------------------------------------------------- end to end

def test_reference_policy_is_the_initial_policy_placed_like_the_policy(tmp_path):
  cfg = tiny(config_of("grpo"), str(tmp_path))
  ctx = trainer.build_context(cfg, str(tmp_path))
  params = state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx).params
  ref = trainer.reference_policy(ctx)
  assert trainer.reference_policy(ctx) is ref  # built once
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(jax.device_get(a), jax.device_get(b)), ref, params)
  assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params)))
  assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated for a in jax.tree.leaves(ref))


@pytest.mark.parametrize("options", ["ppo", "gspo"])
def test_a_run_with_the_options_on(options, tmp_path):
  """Two steps of GRPO with the options: every option's metric appears, and the checkpoint's data position counts
  the prompts drawn to refill."""
  workdir = str(tmp_path)
  cfg = tiny(config_of("grpo"), workdir, steps=2)
  with cfg.unlocked():
    cfg.train.update(dynamic_sampling=True, max_refill_rounds=1)
    cfg.rollout.overlong_buffer = 4
    if options == "ppo":
      cfg.train.update(ppo_epochs=2, mini_batches=2)
      cfg.loss.update(advantage="rloo", clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, tis_cap=2.0, kl_coef=0.01)
    else:  # a random model rarely emits EOS: overlong filtering drops most rows
      cfg.rollout.overlong_filter = True
      cfg.train.old_logp = "sampler"
      cfg.loss.update(advantage="dr_grpo", importance_ratio="sequence", clip_eps=0.1, kl_coef=0.01, kl_in="reward",
                      kl_estimator="k1")
  config_lib.validate(cfg, num_devices=jax.device_count())
  trainer.run(cfg, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2] and all(r["skipped"] == 0 for r in rows)
  expected = {"dynamic_sampling/rounds", "overlong/truncated_frac", "overlong/penalty_mean", "mismatch/abs_logp_max"}
  expected |= ({"pg/clip_frac_high", "pg/dual_clip_frac", "tis/weight_mean", "loss/kl", "ppo/kl",
                "ppo/abs_log_ratio_max", "mismatch/abs_logp_mean"} if options == "ppo"
               else {"kl/reward_penalty", "overlong/filtered_rows"})
  for r in rows:
    assert expected <= set(r), expected - set(r)
    assert r["mismatch/abs_logp_max"] < 1e-3  # float32 sampler and trainer: the same log-probs to rounding
  _, meta = restored_state(workdir, cfg)
  # Each step drew its batch and one batch per refill round; the checkpoint holds the loader past all of them.
  loader = trainer._loader(trainer.build_context(cfg, workdir))
  for _ in range(sum(1 + int(r["dynamic_sampling/rounds"]) for r in rows)):
    next(loader)
  assert meta["data"] == loader.state()
