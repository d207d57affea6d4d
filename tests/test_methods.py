"""What the methods beyond TRAPO add to the shared machinery (docs/algorithm.md): schedules at chosen steps, the row
plans (random prefixes, hints, appended demonstrations, HPT's gate), advantages over a group's members, the dual-clip
surrogate far from ratio 1, and ReLIFT's buffer and second optimizer across a resume."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import default
from tests.test_algorithms import _np_loss
from tests.test_microgroup import DEMO0, DEMO1, SPLIT, _batch, _fake_sampler, _scripted_grader
from trapo_jax import algorithms
from trapo_jax import config as config_lib
from trapo_jax import losses
from trapo_jax.algorithms import schedules
from trapo_jax.sampling import microgroup
from trapo_jax.sampling import rollout


def _method(name: str, steps: int = 500):
  cfg = default.get_config()
  cfg.algo = name
  cfg.train.steps = steps
  return cfg, algorithms.from_config(cfg)


# ----------------------------------------------------------------------------------------------------------------
# Schedules.


def test_chord_mu_schedule():
  mu = lambda t: schedules.chord_mu(t, warmup=200, decay=400, peak=0.5, valley=0.02)
  assert [mu(t) for t in (0, 100, 200)] == [0.0, 0.25, 0.5]  # linear warm-up to the peak
  assert mu(400) == pytest.approx(0.02 + 0.48 * 0.5)  # half-way through the cosine
  assert mu(600) == mu(10_000) == 0.02  # the valley after warm-up + decay
  # The paper's CHORD-mu at 500 steps: no warm-up, 0.9 -> 0.05 over 200 steps, plain NLL; GRPO gets 1 - mu; each
  # term is over its rows' share of the batch (8 own rows and 2 demonstrations per prompt).
  cfg, chord_mu = _method("chord_mu")
  assert chord_mu.mu_steps(cfg) == (0, 200)
  pg, sft = chord_mu.phase_at(cfg, 0).objective.terms
  paper = {0: 0.9, 100: 0.05 + 0.85 * 0.5, 200: 0.05, 300: 0.05}
  for t, mu_t in paper.items():
    assert pg.weight_at(t) == pytest.approx((1 - mu_t) / 0.8) and sft.weight_at(t) == pytest.approx(mu_t / 0.2)
  assert sft.loss == "nll"
  # The example YAML's run, a config: warm-up 200, decay 400 of 500 steps, 0.5 -> 0.02, phi on.
  cfg = importlib.import_module("experiments.configs.chord_example").get_config()
  cfg.train.steps = 500
  example = algorithms.from_config(cfg)
  assert example.mu_steps(cfg) == (200, 400)
  pg, sft = example.phase_at(cfg, 0).objective.terms
  for t in (0, 100, 300, 700):
    assert pg.weight_at(t) == pytest.approx((1 - mu(t)) / 0.8) and sft.weight_at(t) == pytest.approx(mu(t) / 0.2)
  assert sft.loss == "phi_nll"
  cfg, chord_phi = _method("chord_phi")
  pg, sft = chord_phi.phase_at(cfg, 0).objective.terms
  assert [sft.weight_at(t) for t in (0, 1, 250, 499)] == pytest.approx([0.1 / 0.2] * 4)
  assert pg.weight_at(3) == pytest.approx(0.9 / 0.8) and sft.loss == "phi_nll"


def test_prefix_rft_bounds():
  assert [schedules.cosine_bound(t, 0.95, 0.05, 100) for t in (0, 50, 100, 101)] == pytest.approx([0.95, 0.5, 0.05,
                                                                                                    0.05])
  assert schedules.cosine_bound(5, 0.95, 0.05, 100, warmup=10) == pytest.approx(0.475)  # warm-up from 0 to init
  assert schedules.cosine_bound(37, 0.05, 0.05, 100) == 0.05  # init == target: constant
  cfg, method = _method("prefix_rft", steps=200)
  assert method.bounds(cfg, 0) == pytest.approx((0.05, 0.95))
  assert method.bounds(cfg, 100) == pytest.approx((0.05, 0.5))
  assert method.phase_at(cfg, 150).rows.ratio_bounds == pytest.approx((0.05, 0.05 + 0.9 * (1 + math.cos(0.75 * math.pi)) / 2))


def test_uft_hint_probability():
  p = lambda t: schedules.uft_hint_prob(t, 300, 0.05, 0.95)
  assert p(150) == pytest.approx(0.5) and p(300) == pytest.approx(0.05) and p(301) == 0.0
  assert p(1) == pytest.approx(0.05 + 0.45 * (1 + math.cos(math.pi / 300)))
  cfg, uft = _method("uft")  # 500 steps: T_hint = 300; step s is the official timestep s + 1
  assert uft.t_hint(cfg) == 300
  assert uft.phase_at(cfg, 299).rows.hint_prob == pytest.approx(0.05)
  assert uft.phase_at(cfg, 300).rows.hint_prob == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Row plans.


def test_random_prefixes_cut_between_bounds():
  """Prefix-RFT: int(r x m) tokens of a random demonstration (m without EOS), at least min_prefix, at most m - 1."""
  rng = np.random.default_rng(0)
  batch = _batch(3)
  for bounds, expected in (((0.5, 0.5), {0: 7, 1: 2}), ((0.0, 0.0), {0: 1, 1: 1}), ((1.0, 1.0), {0: 14, 1: 4})):
    plan = microgroup.Plan(stages=(2, 3), mode="random", ratio_bounds=bounds, imitate="all")
    rb = rollout.collect(plan, batch, _fake_sampler([]), lambda t, m, a: np.zeros(len(a), np.float32), [SPLIT],
                         rng=rng)
    for i in range(3):
      rows = rb.prefix_mask[i * 5:(i + 1) * 5].sum(1)
      assert (rows[:2] == 0).all()  # the first stage is the model's own
      k = int(rows[2])
      demo, which = (DEMO0, 0) if rb.tokens[i * 5 + 2, 0] == DEMO0[0] else (DEMO1, 1)
      assert (rows[2:] == k).all() and k == expected[which]  # one prefix per prompt and stage
      np.testing.assert_array_equal(rb.tokens[i * 5 + 2, :k], demo[:k])
      np.testing.assert_allclose(rb.ratio[i * 5 + 2:(i + 1) * 5], k / (len(demo) - 1), rtol=1e-6)
    # Every guided row's prefix is imitated.
    np.testing.assert_array_equal(rb.off_loss_mask, rb.prefix_mask)
  with pytest.raises(ValueError, match="pass an rng"):
    rollout.collect(plan, batch, _fake_sampler([]), lambda t, m, a: np.zeros(len(a)), [SPLIT])


def test_segment_ends():
  demo = np.asarray(DEMO0[:-1])  # 15 tokens, "\n\n" at 3, 7, 11: four steps ending after 4, 8, 12, 15 tokens
  assert microgroup.segment_ends(demo, [SPLIT], 5) == [0, 4, 8, 12, 15]  # min(5, 4 steps) segments
  assert microgroup.segment_ends(demo, [SPLIT], 2) == [0, 8, 15]
  assert microgroup.segment_ends(demo, [SPLIT], 3) == [0, 4, 12, 15]  # round(4/3) = 1, round(8/3) = 3 steps
  assert microgroup.segment_ends(np.asarray([7, 8, 9]), [SPLIT], 5) == [0, 3]  # no step boundary: all or nothing


def test_hints_and_grading_without_them():
  """UFT: k ~ Binomial(segments, p) segments of demo #0 as one prefix for all the prompt's rows; the grader reads
  only the generated tokens."""
  graded = []

  def grade(tokens, mask, answers):
    graded.append(mask.copy())
    return np.zeros(len(answers), np.float32)

  for p, k in ((0.0, 0), (1.0, 15)):
    plan = microgroup.Plan(stages=(4,), mode="hint", hint_prob=p, imitate="all", grade_given=False)
    rb = rollout.collect(plan, _batch(2), _fake_sampler([]), grade, [SPLIT], rng=np.random.default_rng(1))
    assert (rb.prefix_mask.sum(1) == k).all()
    np.testing.assert_array_equal(graded[-1], rb.response_mask & ~rb.prefix_mask)
    assert (rb.kind == (losses.ROW_GUIDED if k else losses.ROW_OWN)).all()
  # A probability in between: every prompt's rows share one hint, k segments long for some k.
  plan = microgroup.Plan(stages=(4,), mode="hint", hint_prob=0.5)
  rb = rollout.collect(plan, _batch(3), _fake_sampler([]), grade, [SPLIT], rng=np.random.default_rng(3))
  lens = rb.prefix_mask.sum(1).reshape(3, 4)
  assert (lens == lens[:, :1]).all() and set(lens[:, 0]) <= {0, 4, 8, 12, 15}


def test_gate_replaces_failed_rollouts_by_the_demonstration():
  """HPT: a prompt with at most `gate` correct rollouts keeps only its demonstration (first row, outside the group);
  the others are untouched."""
  script = [[[0, 0, 0, 0]], [[0, 1, 0, 0]]]
  plan = microgroup.Plan(stages=(4,), mode="none", gate=0, gate_demo=0)
  rb = rollout.collect(plan, _batch(2), _fake_sampler([]), _scripted_grader(script), [SPLIT])
  assert rb.kind.tolist() == [losses.ROW_DEMO] + [losses.ROW_OWN] * 7
  np.testing.assert_array_equal(rb.tokens[0, :16], DEMO0)
  assert rb.response_mask[0].sum() == 16 and (rb.off_loss_mask[0] == rb.response_mask[0]).all()
  assert not rb.response_mask[1:4].any()  # emptied: no term sees them
  assert rb.response_mask[4:].sum(1).tolist() == [3] * 4  # the other prompt keeps its rollouts
  assert rb.in_group.tolist() == [False] + [True] * 7
  assert rb.rewards.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
  adv = np.asarray(losses.group_advantages(jnp.asarray(rb.rewards), jnp.asarray(rb.group_ids),
                                           member=jnp.asarray(rb.in_group)))
  np.testing.assert_allclose(adv, [0, 0, 0, 0, -0.25, 0.75, -0.25, -0.25])
  gate_one = microgroup.Plan(stages=(4,), mode="none", gate=1)
  rb = rollout.collect(gate_one, _batch(2), _fake_sampler([]), _scripted_grader(script), [SPLIT])
  assert rb.kind.tolist() == ([losses.ROW_DEMO] + [losses.ROW_OWN] * 3) * 2


def test_appended_demonstrations_are_outside_the_group():
  """CHORD: whole demonstrations after each prompt's rollouts, ungraded; advantages are over the rollouts alone."""
  calls = []
  plan = microgroup.Plan(stages=(3,), mode="none", demos=(0, 1))
  rb = rollout.collect(plan, _batch(2), _fake_sampler(calls), _scripted_grader([[[1, 0, 0]], [[1, 1, 0]]]), [SPLIT])
  assert [c["n"] for c in calls] == [3] and rb.tokens.shape[0] == 10
  assert rb.kind.tolist() == ([losses.ROW_OWN] * 3 + [losses.ROW_DEMO] * 2) * 2
  np.testing.assert_array_equal(rb.tokens[3, :16], DEMO0)
  np.testing.assert_array_equal(rb.tokens[4, :6], DEMO1)
  assert rb.in_group.tolist() == ([True] * 3 + [False] * 2) * 2 and rb.rewards[[3, 4, 8, 9]].tolist() == [0] * 4
  assert rb.group_ids.tolist() == [0] * 5 + [1] * 5
  for use_std in (False, True):
    adv = np.asarray(losses.group_advantages(jnp.asarray(rb.rewards), jnp.asarray(rb.group_ids), use_std=use_std,
                                             member=jnp.asarray(rb.in_group)))
    ref = np.zeros(10)
    for own in (slice(0, 3), slice(5, 8)):
      r = rb.rewards[own].astype(np.float64)
      ref[own] = (r - r.mean()) / ((r.std(ddof=1) + 1e-6) if use_std else 1.0)
    np.testing.assert_allclose(adv, ref, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Kernels the contract suite's batches leave partly unexercised.


def test_dual_clip_far_from_ratio_one():
  """The dual clip binds only at ratios beyond 1/clip_c or c: compared with the float64 reference at such ratios."""
  rng = np.random.default_rng(0)
  shape = (6, 9)
  logp = rng.uniform(-4, -0.1, shape)
  old = logp + rng.uniform(-2.0, 2.0, shape)  # ratios from 0.14 to 7.4
  adv = rng.normal(size=shape[0])
  x = losses.TokenInputs(logp=jnp.asarray(logp, jnp.float32), old_logp=jnp.asarray(old, jnp.float32),
                         entropy=jnp.zeros(shape), advantages=jnp.asarray(adv, jnp.float32), rewards=jnp.zeros(6),
                         kind=jnp.zeros(6, jnp.int32), prefix_mask=jnp.zeros(shape, bool),
                         off_loss_mask=jnp.zeros(shape, bool), response_mask=jnp.ones(shape, bool))
  params = {"clip_eps": 0.2, "dual_clip": 3.0}  # Prefix-RFT's
  f = lambda lp: losses.TOKEN_LOSSES["policy_gradient"](dataclasses.replace(x, logp=lp), **params)
  value = f(x.logp)
  grad = jax.grad(lambda lp: jnp.sum(f(lp)))(x.logp)
  ref = {"logp": np.asarray(x.logp, np.float64), "old_logp": np.asarray(x.old_logp, np.float64),
         "advantages": np.asarray(x.advantages, np.float64), "response_mask": np.ones(shape, bool),
         "prefix_mask": np.zeros(shape, bool)}
  ref_value, ref_grad = _np_loss("policy_gradient", ref, params)
  floor = (adv[:, None] < 0) & (np.exp(ref["logp"] - ref["old_logp"]) > 3.0)
  assert floor.any() and (~floor).any()  # both branches of the dual clip are exercised
  np.testing.assert_allclose(np.asarray(value), ref_value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-6)


def test_top_share_keeps_the_highest_entropy_tokens():
  entropy = jnp.asarray([[0.5, 2.0, 1.0, 9.0], [3.0, 1.0, 1.0, 0.1]])
  selected = jnp.asarray([[True, True, True, False], [True, True, True, False]])
  # 6 selected: int(6 x 0.8) = 4 of lowest entropy dropped (ties in index order), 2 kept.
  keep = np.asarray(losses.top_share(entropy, selected, 0.8))
  assert keep.tolist() == [[False, True, False, False], [True, False, False, False]]
  assert np.asarray(losses.top_share(entropy, selected, 0.0)).tolist() == np.asarray(selected).tolist()


# ----------------------------------------------------------------------------------------------------------------
# ReLIFT: the buffer, the fine-tuning phase and its optimizer.


def test_relift_buffer_fills_newest_first_and_empties_by_buffer_size():
  cfg, relift = _method("relift")
  with cfg.unlocked():
    cfg.train.batch_prompts = 4
    cfg.relift.buffer_batches = 1.5
  relift = algorithms.from_config(cfg)
  assert relift.buffer_size(cfg) == 6
  fail, solve = np.zeros(8), np.eye(8)[0]
  state = relift.initial_state(cfg)
  state, extra = relift.after_update(cfg, 0, np.arange(10, 14), np.stack([fail, solve, fail, fail]), state)
  assert state == {"buffer": [10, 12, 13]} and extra == []  # prompts whose rollouts all fail
  state, extra = relift.after_update(cfg, 1, np.arange(20, 24), np.stack([fail] * 4), state)
  assert state == {"buffer": [13]}  # the 6 at the front are fine-tuned on, the oldest stays
  ((phase, uids),) = extra
  assert uids == [20, 21, 22, 23, 10, 12]
  assert phase.name == "fine_tune" and phase.optimizer == "fine_tune" and phase.prompts == 6
  assert phase.temperature == 1.0 and phase.rows.which == (0,)
  assert relift.optimizers(cfg) == {"fine_tune": {"lr": cfg.optim.lr, "grad_clip": 1.0, "warmup_steps": 0}}
  json.dumps(state)  # the run state goes into the checkpoint's JSON record


def _adam_counts(opt_state) -> list[int]:
  return [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]


def test_relift_buffer_and_fine_tuning_optimizer_survive_a_resume(tmp_path, monkeypatch):
  """Every prompt fails (the grader is stubbed), 6 prompts a step, a buffer of 8: the fine-tuning update runs at
  step 2 (4 left over) and again at step 3 only if the resumed run restored those 4; its AdamW count goes on from 1."""
  from tests import test_trainer
  from trapo_jax import rewards
  from trapo_jax.train import trainer
  monkeypatch.setattr(rewards, "grade_batch", lambda texts, answers, **kw: [0.0] * len(texts))
  workdir = str(tmp_path / "run")

  def config(steps):
    cfg = test_trainer.tiny(test_trainer._config("relift"), workdir, steps=steps)
    with cfg.unlocked():
      cfg.train.batch_prompts = 6  # 48 rollouts; a buffer of 8 prompts (rows split over the 4 batch shards)
      cfg.relift.buffer_batches = 8 / 6
      cfg.data.data_dir = str(tmp_path / "tfds")
    config_lib.validate(cfg, num_devices=jax.device_count())
    return cfg

  trainer.run(config(2), workdir)  # fine-tunes once, at step 2, and leaves 4 prompts in the buffer
  trainer.run(config(3), workdir)
  final, meta = test_trainer._params(workdir, config(3))
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert ["fine_tune/loss" in r for r in rows] == [False, True, True]
  assert [r["algo/buffer_size"] for r in rows] == [6, 4, 2]
  # Left in the buffer: the oldest 2 prompts, the last of step 1's batch (newest first, the front fine-tuned on).
  first_batch = next(trainer._loader(trainer.build_context(config(3), workdir)))
  assert meta["algo_state"]["buffer"] == first_batch.uids[-2:].tolist()
  # 3 steps of 2 RL mini-batches each of the run's AdamW; 2 of the fine-tuning one: its state came back with the
  # checkpoint.
  assert int(final.step) == 3 and _adam_counts(final.opt_state) == [6, 2]
  assert all(np.isfinite(r["fine_tune/loss"]) for r in rows[1:])


def test_sft_trains_with_its_own_optimizer_and_warm_up():
  """SFT (alone or before RL) updates with the official SFT AdamW: lr 5e-5, linear warm-up over 10 % of its steps;
  SFT->RL's RL phase updates with the run's AdamW (fresh, as a new training) and clips (PPO, 0.2)."""
  from trapo_jax.train import state as state_lib
  cfg, sft = _method("sft", steps=300)
  assert sft.optimizers(cfg) == {"sft": {"lr": 5e-5, "warmup_steps": 30}}
  assert [p.optimizer for p in sft.phases(cfg)] == ["sft"]
  optim = ml_collections.ConfigDict(dict(cfg.optim.to_dict(), **sft.optimizers(cfg)["sft"]))
  assert [state_lib.learning_rate(optim, t) for t in (0, 15, 30, 299)] == pytest.approx([0.0, 2.5e-5, 5e-5, 5e-5])
  cfg, s2r = _method("sft_then_rl", steps=300)  # 150 SFT steps
  assert s2r.optimizers(cfg) == {"sft": {"lr": 5e-5, "warmup_steps": 15}}
  first, then = s2r.phases(cfg)
  assert (first.optimizer, then.optimizer) == ("sft", "")
  assert s2r.phase_at(cfg, 149) is not None and s2r.phase_at(cfg, 149).name == "sft"
  pg = next(t for t in then.objective.terms if t.name == "pg")
  assert dict(pg.params)["clip_eps"] == 0.2 and cfg.loss.clip_eps < 0  # its own clip, not the run's option


def test_sft_then_rl_trains_rl_on_prompts_its_sft_never_draws(tmp_path):
  """SFT->RL's RL phase draws only the held-out share of the training prompts (a fixed split by uid), its SFT phase
  only the others, as the official RL run on prompts held out from its SFT data."""
  from tests import test_trainer
  from trapo_jax.train import trainer
  cfg = test_trainer.tiny(test_trainer._config("sft_then_rl"), str(tmp_path))
  cfg.sft_then_rl.rl_prompts = 0.5
  cfg.train.batch_prompts = 1  # the fixture's 6 problems: 3 in each part
  method = algorithms.from_config(cfg)
  ctx = trainer.build_context(cfg, str(tmp_path))
  ctx.loader = trainer._loader(ctx)
  every = {e.uid for e in ctx.loader.examples}
  drawn = {}
  for phase in method.phases(cfg):
    loader = trainer.phase_loader(ctx, phase)
    drawn[phase.prompts_from] = {int(u) for _ in range(6) for u in next(loader).uids}
  # The split: by a hash of the uid, so independent of order; about half held out at rl_prompts = 0.5.
  held = {u for u in every if ((u * 2654435761) % 2 ** 32) / 2 ** 32 < 0.5}
  assert method.held_out(cfg) == 0.5 and 0 < len(held) < len(every)
  assert drawn["held_out"] == held and drawn["train"] == every - held
  # rl_prompts = 0: both phases draw from the run's loader, every prompt.
  cfg.sft_then_rl.rl_prompts = 0.0
  assert {p.prompts_from for p in algorithms.from_config(cfg).phases(cfg)} == {""}
