"""The Rollouts component (trapo_jax/sampling/rollouts.py) through its one entry, `collect`, over a recording sampler
and grader: which path and arguments it asks the sampler for, what it times and counts, demonstrations, dynamic
sampling's rounds. The rows themselves are checked in tests/test_microgroup.py and tests/test_one_pass.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from tests.helpers import L, SPLIT, config_of, fake_batch, fake_sampler
from trapo_jax import algorithms
from trapo_jax import errors
from trapo_jax.sampling import microgroup
from trapo_jax.sampling import rollout
from trapo_jax.sampling import rollouts
from trapo_jax.train import programs

CLOCK = ("time/sampling", "time/grading", "grader/timeouts", "grader/restarts")


class _Sampler:
  """Sampler.sample and sample_shared over helpers.fake_sampler's rows (each row its context, then 50, 51, EOS),
  recording each call: its method, its keywords, its key."""

  def __init__(self):
    self.calls = []

  def sample(self, params, prompt_ids, prompt_lens, prefixes, prefix_lens, *, active, n, row_ids, rng, **kw):
    self.calls.append(("sample", kw, jax.random.key_data(rng)))
    return _rows(*fake_sampler([])(prompt_ids, prompt_lens, prefixes, prefix_lens, active, n, row_ids))

  def sample_shared(self, params, prompt_ids, prompt_lens, prefixes, prefix_lens, *, branches, row_ids, sample_ids,
                    rng, **kw):
    self.calls.append(("sample_shared", kw, jax.random.key_data(rng)))
    g, r = len(prompt_ids), len(branches)
    # Each row continues its context: the bare prompt (branch 0) or prefix b - 1 of its prompt.
    ctx = np.zeros((g * r, prefixes.shape[2]), np.int32)
    lens = np.zeros((g * r,), np.int32)
    for i in range(g):
      for j, b in enumerate(branches):
        if b:
          ctx[i * r + j], lens[i * r + j] = prefixes[i, b - 1], prefix_lens[i, b - 1]
    return _rows(*fake_sampler([])(np.repeat(prompt_ids, r, 0), None, ctx, lens, np.ones(g * r, bool), 1,
                                   np.asarray(row_ids).reshape(-1)))


def _rows(tokens, prefix_mask, response_mask):
  return SimpleNamespace(tokens=tokens, prefix_mask=prefix_mask, response_mask=response_mask,
                         logprobs=np.zeros(tokens.shape, np.float32), eos=np.ones(len(tokens), bool))


def _grader(correct: float = 1.0):
  """Every row scores `correct`; each call reports one timeout and no restart."""
  calls = []

  def grade(tokens, response_mask, answers):
    calls.append(len(answers))
    return np.full(len(answers), correct, np.float32), {"timeouts": 1, "restarts": 0}
  return grade, calls


def _rollouts(cfg, correct: float = 1.0):
  grade, graded = _grader(correct)
  out = rollouts.Rollouts(cfg=cfg, sampler=_Sampler(), grader=grade, eos_ids=(2,), pad_id=0,
                          split_ids=np.asarray([SPLIT]))
  return out, graded


def _trapo(one_pass: bool):
  cfg = config_of("default")
  cfg.rollout.update(one_pass=one_pass, temperature=0.7, top_p=0.9, top_k=5)
  return cfg, algorithms.from_config(cfg).phase_at(cfg, 0).rows


@pytest.mark.parametrize("one_pass", [True, False])
def test_collect_takes_the_path_compile_mode_compiles(one_pass):
  """One Sampler.sample_shared call where rollouts.in_one_pass, else a Sampler.sample call per generating stage:
  the calls programs.rollout_calls lists for --mode=compile, with the config's sampling and the step's key."""
  cfg, plan = _trapo(one_pass)
  r, graded = _rollouts(cfg)  # every row correct: no prompt is guided, every stage samples
  key = jax.random.key(3)
  rows, rewards, m = r.collect(plan, fake_batch(2), None, key)
  phase = algorithms.from_config(cfg).phase_at(cfg, 0)
  calls = programs.rollout_calls(cfg, phase)
  assert [c[0] for c in r.sampler.calls] == (["sample_shared"] if one_pass else ["sample"] * len(plan.stages))
  assert bool(calls[0].branches) == one_pass == rollouts.in_one_pass(cfg, plan)
  assert len(calls) == len(r.sampler.calls) and len(graded) == len(r.sampler.calls)
  for _, kw, k in r.sampler.calls:
    assert kw == dict(max_len=cfg.data.max_response_len, temperature=0.7, top_p=0.9, top_k=5, eos_ids=(2,), pad_id=0,
                      continuation=0)
    np.testing.assert_array_equal(k, jax.random.key_data(jax.random.fold_in(key, 0)))  # the first round's
  assert rows.tokens.shape == (2 * plan.n, L) and (rows.rewards == 1).all()
  np.testing.assert_array_equal(rewards, rows.rewards)  # no shaping asked for
  assert m["grader/timeouts"] == len(graded) and m["grader/restarts"] == 0
  assert m["time/sampling"] > 0 and m["time/grading"] > 0
  assert m["reward/mean"] == 1 and m["rollout/decode_passes"] == len(r.sampler.calls)


def test_demonstrations_are_collected_without_sampling_or_grading():
  cfg = config_of("default")
  r, graded = _rollouts(cfg)
  batch = fake_batch(2)
  rows, rewards, m = r.collect(microgroup.DemoRows(which=(1, 0)), batch, None, jax.random.key(0))
  ref = rollout.demo_batch(batch, which=(1, 0), max_len=cfg.data.max_response_len)
  for f in dataclasses.fields(ref):
    np.testing.assert_array_equal(getattr(rows, f.name), getattr(ref, f.name), err_msg=f.name)
  assert not r.sampler.calls and not graded and (rewards == 0).all()
  assert m == {k: 0 for k in CLOCK}


def test_overlong_shaping_changes_the_rewards_not_the_rows():
  cfg, plan = _trapo(one_pass=True)
  cfg.data.max_response_len = 20
  cfg.rollout.update(overlong_buffer=18, overlong_penalty=0.5)
  rows, rewards, m = _rollouts(cfg)[0].collect(plan, fake_batch(2), None, jax.random.key(0))
  # Every row correct: every row is the model's own 3 tokens, 1 past the unpunished 20 - 18.
  assert (rows.lengths == 3).all() and (rows.rewards == 1).all()
  np.testing.assert_allclose(rewards, 1 - 0.5 / 18, rtol=1e-6)
  assert m["overlong/penalty_mean"] == pytest.approx(-0.5 / 18)


def test_dynamic_sampling_draws_further_prompts_each_round_with_its_own_key():
  """No group is informative (every row correct): each of train.max_refill_rounds rounds samples the next prompts
  under the step's key folded with the round's number; without further prompts the step cannot refill."""
  cfg = config_of("grpo")
  cfg.train.update(dynamic_sampling=True, max_refill_rounds=2)
  plan = algorithms.from_config(cfg).phase_at(cfg, 0).rows
  r, graded = _rollouts(cfg)
  key = jax.random.key(7)
  drawn = []
  more = iter(lambda: drawn.append(1) or fake_batch(2), None)
  rows, _, m = r.collect(plan, fake_batch(2), None, key, more_prompts=more)
  assert len(drawn) == 2 and m["dynamic_sampling/rounds"] == 2 and m["dynamic_sampling/kept_uninformative"] == 2
  for i, (_, _, k) in enumerate(r.sampler.calls):
    np.testing.assert_array_equal(k, jax.random.key_data(jax.random.fold_in(key, i)))
  assert len(r.sampler.calls) == 3 and m["rollout/decode_passes"] == 3 and rows.levels.shape[0] == 2
  with pytest.raises(errors.TrainingError, match="train.dynamic_sampling: this step was given no further prompts"):
    r.collect(plan, fake_batch(2), None, key)


def test_one_pass_by_default_only_off_the_cpu(monkeypatch):
  """rollout.one_pass=None: the stages where the backend is the CPU (decode bound by compute), one pass on GPU/TPU
  (bound by reading weights and cache); an explicit value wins on every backend."""
  cfg, plan = _trapo(one_pass=True)
  cfg.rollout.one_pass = None
  for backend, expected in (("cpu", False), ("gpu", True), ("tpu", True)):
    monkeypatch.setattr(rollouts.jax, "default_backend", lambda b=backend: b)
    assert rollouts.in_one_pass(cfg, plan) is expected, backend
    cfg.rollout.one_pass = not expected
    assert rollouts.in_one_pass(cfg, plan) is (not expected), backend
    cfg.rollout.one_pass = None
