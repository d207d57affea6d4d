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
from tests import helpers
from tests.helpers import (DEMO0, DEMO1, SPLIT, fake_batch, fake_sampler, np_loss, np_objective, random_token_inputs,
                           scripted_grader)
from trapo_jax import algorithms
from trapo_jax import config as config_lib
from trapo_jax import losses
from trapo_jax.algorithms import prefix_rft as prefix_rft_lib
from trapo_jax.algorithms import schedules
from trapo_jax.algorithms import uft as uft_lib
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
  high = 0.05 + 0.9 * (1 + math.cos(0.75 * math.pi)) / 2
  assert method.phase_at(cfg, 150).rows.guidance.bounds == pytest.approx((0.05, high))


def test_prefix_rft_mask_controllers_are_the_official_classes():
  """The entropy mask's share at given steps, by hand from prefix_rft `scheduler/global_step.py` (ConstController,
  LinearDecayController, CosineDecayController), with their __init__ defaults where a kwarg is -1."""
  ctrl = schedules.controller
  assert [ctrl("const", g, 0.8, 0.3, 10, 0.5) for g in (0, 1, 10 ** 6)] == [0.8, 0.8, 0.8]
  # linear_decay's defaults: 1 -> 0 over 10000 steps after int(0.1 x 10000) = 1000 of warm-up from 0.
  linear = lambda g: ctrl("linear_decay", g, *schedules.CONTROLLER_DEFAULTS["linear_decay"])
  assert [linear(g) for g in (0, 250, 1000, 6000, 10999, 11000, 20000)] == pytest.approx(
      [0.0, 0.25, 1.0, 0.5, 1e-4, 0.0, 0.0])
  # cosine_decay's defaults rise: 0.1 -> 1 by (1 - (1 + cos(pi x / 10000)) / 2) x 0.9, no warm-up.
  cosine = lambda g: ctrl("cosine_decay", g, *schedules.CONTROLLER_DEFAULTS["cosine_decay"])
  assert [cosine(g) for g in (0, 2500, 5000, 10000, 10001)] == pytest.approx(
      [0.1, 0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2, 0.55, 1.0, 1.0])
  # A decaying cosine with a warm-up of int(0.1 x 100) = 10 steps: 0.9 -> 0.1 over the next 100.
  decay = lambda g: ctrl("cosine_decay", g, 0.9, 0.1, 100, 0.1)
  assert [decay(g) for g in (5, 10, 60, 110, 111)] == pytest.approx([0.45, 0.9, 0.5, 0.1, 0.1])
  # The method: "const" 0.8 (the paper's) is a constant of the step; a scheduled share an input, at global_step =
  # optimizer step + 1.
  cfg, method = _method("prefix_rft")
  (phase,) = method.phases(cfg)
  prefix = next(t for t in phase.objective.terms if t.name == "prefix")
  assert dict(prefix.params)["entropy_drop"] == 0.8 and not prefix.inputs and phase.objective.num_weights == 3
  cfg.prefix_rft.mask_ctrl = "linear_decay"
  cfg.prefix_rft.mask_init = -1.0  # every kwarg the class's default
  method = algorithms.from_config(cfg)
  (phase,) = method.phases(cfg)
  assert method.mask_share() == prefix_rft_lib.MaskShare("linear_decay", 1.0, 0.0, 10000, 0.1)
  for step in (0, 999, 5999):
    assert float(phase.objective.weights_at(step)[-1]) == pytest.approx(linear(step + 1), rel=1e-6)
  cfg.prefix_rft.mask_init, cfg.prefix_rft.mask_target = 0.2, 0.5
  with pytest.raises(config_lib.ConfigError, match="prefix_rft.mask_init: linear_decay needs"):
    config_lib.validate(cfg, num_devices=1)


def test_sft_learning_rate_decays_as_openrlhf():
  """OpenRLHF's SFT schedule (transformers' cosine_with_min_lr, min_lr = 0.1 x lr) at given steps, by hand: 300
  steps, warm-up ceil(0.1 x 300) = 30; the AdamW applies it at each update."""
  from trapo_jax.train import state as state_lib
  cfg, sft = _method("sft", steps=300)
  keys = sft.optimizers(cfg)["sft"]
  assert keys == {"lr": 5e-5, "warmup_steps": 30, "schedule": "cosine_with_min_lr", "min_lr_ratio": 0.1,
                  "decay_steps": 300}
  optim = ml_collections.ConfigDict(dict(cfg.optim.to_dict(), **keys))
  # Warm-up t / 30; then 0.1 + 0.9 (1 + cos(pi (t - 30) / 270)) / 2: t = 120 is a third of the way (cos = 1/2),
  # t = 165 half-way, t = 300 the end.
  steps = (0, 15, 30, 120, 165, 300)
  expected = [5e-5 * f for f in (0.0, 0.5, 1.0, 0.1 + 0.9 * 0.75, 0.55, 0.1)]
  assert [state_lib.learning_rate(optim, t) for t in steps] == pytest.approx(expected)
  # In the optimizer: a constant gradient of 1 on a parameter without weight decay moves it by lr_t / (1 + eps).
  optim.weight_decay = 0.0
  tx = state_lib.make_optimizer(optim)
  params = {"w": jnp.zeros(())}

  def update(state, _):
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    return state, -updates["w"]

  _, lrs = jax.lax.scan(update, tx.init(params), None, length=301)
  np.testing.assert_allclose(np.asarray(lrs)[list(steps)], np.asarray(expected) / (1 + 1e-8), rtol=1e-5, atol=1e-12)
  # "constant": the warm-up, then lr, as before the decay.
  cfg.sft.schedule = "constant"
  keys = algorithms.from_config(cfg).optimizers(cfg)["sft"]
  assert keys == {"lr": 5e-5, "warmup_steps": 30}
  optim = ml_collections.ConfigDict(dict(cfg.optim.to_dict(), **keys))
  assert [state_lib.learning_rate(optim, t) for t in (15, 30, 299)] == pytest.approx([2.5e-5, 5e-5, 5e-5])


def test_sft_length_in_epochs_over_the_examples():
  """sft.epochs: OpenRLHF's max_steps = ceil(epochs x (examples // batch)), set once the loader has the examples;
  the SFT schedule then spans it. SFT->RL counts the examples of its SFT part."""
  from types import SimpleNamespace
  from trapo_jax.train import trainer
  examples = [SimpleNamespace(uid=u) for u in range(100)]
  cfg, sft = _method("sft", steps=7)
  assert sft.length_from_data(cfg, examples) == {}  # epochs = 0: train.steps
  cfg.sft.epochs = 3.0
  method = algorithms.from_config(cfg)
  assert method.length_from_data(cfg, examples) == {"train.steps": 36}  # 3 x (100 // 8)
  cfg.sft.epochs = 2.5
  assert algorithms.from_config(cfg).length_from_data(cfg, examples) == {"train.steps": 30}
  ctx = trainer.Context(cfg=cfg, workdir="", method=algorithms.from_config(cfg), mesh=None, model_cfg=None,
                        tokenizer=None, tx=None, sampler=None, pad_id=0,
                        loader=SimpleNamespace(examples=examples))
  ctx = trainer.with_data_length(ctx)
  assert ctx.cfg.train.steps == 30 and cfg.train.steps == 7  # the run's copy changes
  assert ctx.method.optimizers(ctx.cfg)["sft"]["decay_steps"] == 30 and set(ctx.txs) == {"", "sft"}
  cfg, s2r = _method("sft_then_rl", steps=100)
  cfg.sft_then_rl.epochs = 3.0
  held = {e.uid for e in examples if algorithms.base.in_part(e.uid, 0.5, "held_out")}
  changes = algorithms.from_config(cfg).length_from_data(cfg, examples)
  sft_steps = math.ceil(3 * ((100 - len(held)) // 8))
  assert 0 < len(held) < 100 and changes == {"sft_then_rl.sft_steps": sft_steps}
  cfg.sft_then_rl.sft_steps = 10  # an explicit count wins
  assert algorithms.from_config(cfg).length_from_data(cfg, examples) == {}
  cfg.sft_then_rl.sft_steps, cfg.train.steps = -1, sft_steps
  with pytest.raises(config_lib.ConfigError, match="sft_then_rl.epochs: .* no step is left for RL"):
    algorithms.from_config(cfg).length_from_data(cfg, examples)


def test_uft_hint_probability():
  p = lambda t: schedules.uft_hint_prob(t, 300, 0.05, 0.95)
  assert p(150) == pytest.approx(0.5) and p(300) == pytest.approx(0.05) and p(301) == 0.0
  assert p(1) == pytest.approx(0.05 + 0.45 * (1 + math.cos(math.pi / 300)))
  cfg, uft = _method("uft")  # 500 steps: T_hint = 300; step s is the official timestep s + 1
  assert uft.t_hint(cfg) == 300
  assert uft.phase_at(cfg, 299).rows.guidance.prob == pytest.approx(0.05)
  assert uft.phase_at(cfg, 300).rows.guidance.prob == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Row plans.


def test_random_prefixes_cut_between_bounds():
  """Prefix-RFT: int(r x m) tokens of a random demonstration (m without EOS), at least min_prefix, at most m - 1."""
  rng = np.random.default_rng(0)
  batch = fake_batch(3)
  for bounds, expected in (((0.5, 0.5), {0: 7, 1: 2}), ((0.0, 0.0), {0: 1, 1: 1}), ((1.0, 1.0), {0: 14, 1: 4})):
    plan = microgroup.Plan(stages=(2, 3), guidance=prefix_rft_lib.DrawnRatio(bounds=bounds), imitate="all")
    rb = rollout.collect(plan, batch, fake_sampler([]), lambda t, m, a: np.zeros(len(a), np.float32), [SPLIT],
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
    rollout.collect(plan, batch, fake_sampler([]), lambda t, m, a: np.zeros(len(a)), [SPLIT])


def test_prefix_in_the_prompt_budget():
  """Prefix-RFT's official placement: the prefix is cut to prompt_budget - prompt length (the prompt is 4 tokens
  here), none left is no prefix (the row is the model's own); the rows are prompt_budget + the response budget wide
  and each continuation gets a whole response budget."""
  rng = np.random.default_rng(0)
  batch = fake_batch(3)
  grade = lambda t, m, a: np.zeros(len(a), np.float32)
  for budget, expected in ((10, {0: 6, 1: 4}), (4, {0: 0, 1: 0}), (0, {0: 14, 1: 4})):
    plan = microgroup.Plan(stages=(2, 3), guidance=prefix_rft_lib.DrawnRatio(bounds=(1.0, 1.0), prompt_budget=budget),
                           imitate="all")
    rb = rollout.collect(plan, batch, fake_sampler([]), grade, [SPLIT], rng=rng)
    for i in range(3):
      row = i * 5 + 2
      k = int(rb.prefix_mask[row].sum())
      which = 1 if k and rb.tokens[row, 0] == DEMO1[0] else 0
      assert k == expected[which] or (k == 0 and budget == 4)
    assert (rb.kind[rb.prefix_mask.sum(1) == 0] == losses.ROW_OWN).all()
  assert microgroup.response_width(plan, 96) == (96, 0)
  wider = dataclasses.replace(plan, guidance=dataclasses.replace(plan.guidance, prompt_budget=64))
  assert microgroup.response_width(wider, 96) == (160, 96)
  # The method: data.max_prompt_len by default, its own budget, or the prefix in the response (the one before).
  cfg, method = _method("prefix_rft")
  assert method.plan(cfg, 0).prompt_budget == cfg.data.max_prompt_len
  cfg.prefix_rft.prompt_budget = 200
  assert algorithms.from_config(cfg).plan(cfg, 0).prompt_budget == 200
  cfg.prefix_rft.placement = "response"
  assert algorithms.from_config(cfg).plan(cfg, 0).prompt_budget == 0


def _official_prefix_advantages(scores, index, prefix_index, num_rollouts_per_prefix, v2):
  """prefix_rft `core_algos.py:compute_dr_grpo_prefix_outcome_advantage` (v2: `_v2_`), loop for loop in float64 ->
  (each row's advantage on its own tokens, on its prefix tokens)."""
  from collections import defaultdict
  scores = np.asarray(scores, np.float64).copy()
  p_scores = np.zeros_like(scores)
  id2prefix_id2score = defaultdict(lambda: defaultdict(list))
  id2prefix_id2mean = defaultdict(dict)
  for i in range(len(scores)):
    id2prefix_id2score[index[i]][prefix_index[i]].append(scores[i])
  for idx in id2prefix_id2score:
    for prefix_id, group in id2prefix_id2score[idx].items():
      id2prefix_id2mean[idx][prefix_id] = np.mean(group) if (v2 or len(group) > 1) else 0.0
  for i in range(len(scores)):
    scores[i] = scores[i] - id2prefix_id2mean[index[i]][prefix_index[i]]
  for i in range(len(scores)):
    if prefix_index[i] != "0000-0000-0000-0000":
      p_scores[i] = scores[i] - id2prefix_id2mean[index[i]]["0000-0000-0000-0000"]
  return scores, p_scores / num_rollouts_per_prefix


@pytest.mark.parametrize("estimator", losses.PREFIX_ESTIMATORS)
@pytest.mark.parametrize("stages, unguided", [((3, 3, 3), 1), ((2, 2, 2), 2), ((1, 1, 1), 1)])
def test_prefix_estimators_against_the_official_loops(estimator, stages, unguided):
  """dr_grpo_prefix and _v2 on Prefix-RFT's rows against a float64 copy of the official loops: a prompt's rows
  without a prefix form one group (prefix_uid "0000-..."), each guided stage's rows another; groups of one row are
  where the two differ."""
  from types import SimpleNamespace
  from trapo_jax.train import trainer
  cfg, _ = _method("prefix_rft")
  cfg.rollout.n = sum(stages)
  cfg.prefix_rft.update(stages=stages, unguided=unguided, advantage=estimator)
  config_lib.validate(cfg, num_devices=1)
  method = algorithms.from_config(cfg)
  (phase,) = method.phases(cfg)
  assert phase.prefix_advantages
  rng = np.random.default_rng(sum(stages))
  for seed in range(3):
    rb = rollout.collect(phase.rows, fake_batch(4), fake_sampler([]), lambda t, m, a: np.zeros(len(a), np.float32),
                         [SPLIT], rng=rng)
    rewards = rng.choice([0.0, 1.0, 0.5, -0.25], size=rb.rewards.shape).astype(np.float32)
    own, prefix = trainer.row_advantages(SimpleNamespace(cfg=cfg, method=method), rb, rewards)
    prefix_index = [f"{g}-{s}" if k == losses.ROW_GUIDED else "0000-0000-0000-0000"
                    for g, s, k in zip(rb.group_ids, rb.stage, rb.kind)]
    ref_own, ref_prefix = _official_prefix_advantages(rewards, rb.group_ids.tolist(), prefix_index,
                                                      stages[-1], v2=estimator.endswith("v2"))
    np.testing.assert_allclose(own, ref_own, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prefix, ref_prefix, rtol=1e-6, atol=1e-6)
    assert (rb.kind == losses.ROW_GUIDED).any() and not prefix[rb.kind != losses.ROW_GUIDED].any()
  # Dr.GRPO (the default): the run's estimator over the whole prompt, no prefix advantage apart.
  cfg.prefix_rft.advantage = "dr_grpo"
  method = algorithms.from_config(cfg)
  assert not method.phases(cfg)[0].prefix_advantages and method.advantages(cfg, rb, rewards) is None


def test_prefix_rft_loss_with_prefix_advantages_and_a_scheduled_mask():
  """The prefix term reads the prefix's advantage where the batch has one and the mask share the step's schedule
  gives, against the per-term float64 reference at several steps."""
  cfg, _ = _method("prefix_rft", steps=40)
  cfg.prefix_rft.update(advantage="dr_grpo_prefix", mask_ctrl="cosine_decay", mask_init=0.9, mask_target=0.2,
                        mask_steps=30, mask_warmup=0.1)
  (phase,) = algorithms.from_config(cfg).phases(cfg)
  rng = np.random.default_rng(5)
  rb = rollout.collect(phase.rows, fake_batch(3), fake_sampler([]), lambda t, m, a: np.zeros(len(a), np.float32),
                       [SPLIT], rng=rng)
  x = random_token_inputs(rb, 0)
  x = dataclasses.replace(x, prefix_advantages=jnp.asarray(rng.normal(size=x.advantages.shape), jnp.float32),
                          old_logp=x.logp + jnp.asarray(rng.uniform(-0.5, 0.5, x.logp.shape), jnp.float32))
  traces = []

  @jax.jit
  @jax.value_and_grad
  def f(logp, w):
    traces.append(1)
    return losses.objective_loss(dataclasses.replace(x, logp=logp), phase.objective, w)[0]

  arrays = {k.name: np.asarray(getattr(x, k.name)) for k in dataclasses.fields(x)}
  arrays = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in arrays.items()}
  values = []
  for step in (0, 7, 20, 39):
    value, grad = f(x.logp, phase.objective.weights_at(step))
    ref_value, ref_grad = np_objective(phase.objective, arrays, step)
    assert abs(float(value) - ref_value) <= 2 * x.logp.size * np.finfo(np.float32).eps * (1 + abs(ref_value))
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, rtol=1e-5, atol=1e-7)
    values.append(float(value))
  assert len(set(values)) > 1 and len(traces) == 1  # the share moved the loss, through an input: one trace


def test_segment_ends():
  demo = np.asarray(DEMO0[:-1])  # 15 tokens, "\n\n" at 3, 7, 11: four steps ending after 4, 8, 12, 15 tokens
  assert uft_lib.segment_ends(demo, [SPLIT], 5) == [0, 4, 8, 12, 15]  # min(5, 4 steps) segments
  assert uft_lib.segment_ends(demo, [SPLIT], 2) == [0, 8, 15]
  assert uft_lib.segment_ends(demo, [SPLIT], 3) == [0, 4, 12, 15]  # round(4/3) = 1, round(8/3) = 3 steps
  assert uft_lib.segment_ends(np.asarray([7, 8, 9]), [SPLIT], 5) == [0, 3]  # no step boundary: all or nothing


def test_hints_and_grading_without_them():
  """UFT: k ~ Binomial(segments, p) segments of demo #0 as one prefix for all the prompt's rows; the grader reads
  only the generated tokens."""
  graded = []

  def grade(tokens, mask, answers):
    graded.append(mask.copy())
    return np.zeros(len(answers), np.float32)

  for p, k in ((0.0, 0), (1.0, 15)):
    plan = microgroup.Plan(stages=(4,), guidance=uft_lib.Hints(prob=p), imitate="all", grade_given=False)
    rb = rollout.collect(plan, fake_batch(2), fake_sampler([]), grade, [SPLIT], rng=np.random.default_rng(1))
    assert (rb.prefix_mask.sum(1) == k).all()
    np.testing.assert_array_equal(graded[-1], rb.response_mask & ~rb.prefix_mask)
    assert (rb.kind == (losses.ROW_GUIDED if k else losses.ROW_OWN)).all()
  # A probability in between: every prompt's rows share one hint, k segments long for some k.
  plan = microgroup.Plan(stages=(4,), guidance=uft_lib.Hints(prob=0.5))
  rb = rollout.collect(plan, fake_batch(3), fake_sampler([]), grade, [SPLIT], rng=np.random.default_rng(3))
  lens = rb.prefix_mask.sum(1).reshape(3, 4)
  assert (lens == lens[:, :1]).all() and set(lens[:, 0]) <= {0, 4, 8, 12, 15}


def test_gate_replaces_failed_rollouts_by_the_demonstration():
  """HPT: a prompt with at most `gate` correct rollouts keeps only its demonstration (first row, outside the group);
  the others are untouched."""
  script = [[[0, 0, 0, 0]], [[0, 1, 0, 0]]]
  plan = microgroup.Plan(stages=(4,), guidance=microgroup.Unguided(), gate=0, gate_demo=0)
  rb = rollout.collect(plan, fake_batch(2), fake_sampler([]), scripted_grader(script), [SPLIT])
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
  gate_one = microgroup.Plan(stages=(4,), guidance=microgroup.Unguided(), gate=1)
  rb = rollout.collect(gate_one, fake_batch(2), fake_sampler([]), scripted_grader(script), [SPLIT])
  assert rb.kind.tolist() == ([losses.ROW_DEMO] + [losses.ROW_OWN] * 3) * 2


def test_appended_demonstrations_are_outside_the_group():
  """CHORD: whole demonstrations after each prompt's rollouts, ungraded; advantages are over the rollouts alone."""
  calls = []
  plan = microgroup.Plan(stages=(3,), guidance=microgroup.Unguided(), demos=(0, 1))
  rb = rollout.collect(plan, fake_batch(2), fake_sampler(calls), scripted_grader([[[1, 0, 0]], [[1, 1, 0]]]), [SPLIT])
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
  ref_value, ref_grad = np_loss("policy_gradient", ref, params)
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
  from trapo_jax import rewards
  from trapo_jax.train import trainer
  monkeypatch.setattr(rewards, "grade_batch", lambda texts, answers, **kw: [0.0] * len(texts))
  workdir = str(tmp_path / "run")

  def config(steps):
    cfg = helpers.tiny(helpers.config_of("relift"), workdir, steps=steps)
    with cfg.unlocked():
      cfg.train.batch_prompts = 6  # 48 rollouts; a buffer of 8 prompts (rows split over the 4 batch shards)
      cfg.relift.buffer_batches = 8 / 6
      cfg.data.data_dir = str(tmp_path / "tfds")
    config_lib.validate(cfg, num_devices=jax.device_count())
    return cfg

  trainer.run(config(2), workdir)  # fine-tunes once, at step 2, and leaves 4 prompts in the buffer
  trainer.run(config(3), workdir)
  final, meta = helpers.restored_state(workdir, config(3))
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
  assert sft.optimizers(cfg)["sft"]["lr"] == 5e-5 and sft.optimizers(cfg)["sft"]["warmup_steps"] == 30
  assert [p.optimizer for p in sft.phases(cfg)] == ["sft"]
  optim = ml_collections.ConfigDict(dict(cfg.optim.to_dict(), **sft.optimizers(cfg)["sft"]))
  assert [state_lib.learning_rate(optim, t) for t in (0, 15, 30)] == pytest.approx([0.0, 2.5e-5, 5e-5])
  cfg, s2r = _method("sft_then_rl", steps=300)  # 150 SFT steps: the warm-up and the decay span them
  assert s2r.optimizers(cfg) == {"sft": {"lr": 5e-5, "warmup_steps": 15, "schedule": "cosine_with_min_lr",
                                         "min_lr_ratio": 0.1, "decay_steps": 150}}
  first, then = s2r.phases(cfg)
  assert (first.optimizer, then.optimizer) == ("sft", "")
  assert s2r.phase_at(cfg, 149) is not None and s2r.phase_at(cfg, 149).name == "sft"
  pg = next(t for t in then.objective.terms if t.name == "pg")
  assert dict(pg.params)["clip_eps"] == 0.2 and cfg.loss.clip_eps < 0  # its own clip, not the run's option


def test_sft_then_rl_trains_rl_on_prompts_its_sft_never_draws(tmp_path):
  """SFT->RL's RL phase draws only the held-out share of the training prompts (a fixed split by uid), its SFT phase
  only the others, as the official RL run on prompts held out from its SFT data."""
  from trapo_jax.train import trainer
  cfg = helpers.tiny(helpers.config_of("sft_then_rl"), str(tmp_path))
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
