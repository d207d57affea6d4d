"""The registry's contract, for every registered method: the config alone selects it, its rows per prompt, row kinds
and masks, which terms see which tokens, and its loss against an independent float64 reference, term by term."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default
from tests.helpers import SPLIT, fake_batch, fake_sampler, np_objective, random_token_inputs
from trapo_jax import algorithms
from trapo_jax import config as config_lib
from trapo_jax import losses
from trapo_jax.errors import ConfigError
from trapo_jax.sampling import microgroup
from trapo_jax.sampling import rollout

NAMES = algorithms.names()

# What each method's phases compute: phase -> {term: (selector, per-token loss)}. A method missing here fails
# test_terms_see_the_declared_tokens: declaring a method means declaring this.
TERMS = {
    "trapo": {"rl": {"trsft": ("imitated", "trsft"), "pg": ("own", "policy_gradient"),
                     "entropy": ("response", "entropy")}},
    "grpo": {"rl": {"pg": ("own", "policy_gradient"), "entropy": ("response", "entropy")}},
    "luffy": {"rl": {"luffy": ("imitated", "luffy_shaped"), "pg": ("own", "policy_gradient"),
                     "entropy": ("response", "entropy")}},
    "sft": {"sft": {"nll": ("imitated", "nll")}},
    "sft_then_rl": {"sft": {"nll": ("imitated", "nll")},
                    "rl": {"pg": ("own", "policy_gradient"), "entropy": ("response", "entropy")}},
    "relift": {"rl": {"pg": ("own", "policy_gradient"), "entropy": ("response", "entropy")},
               "fine_tune": {"nll": ("imitated", "nll"), "entropy": ("response", "entropy")}},
    "hpt": {"rl": {"sft": ("demo_rows", "nll"), "pg": ("own", "policy_gradient"), "entropy": ("response", "entropy")}},
    "chord_mu": {"rl": {"pg": ("own", "policy_gradient"), "sft": ("demo_rows", "nll")}},
    "chord_phi": {"rl": {"pg": ("own", "policy_gradient"), "sft": ("demo_rows", "phi_nll")}},
    "srft": {"rl": {"sft": ("demo_rows", "entropy_weighted_nll"), "off": ("imitated", "luffy_shaped"),
                    "on": ("own", "srft_reinforce"), "entropy": ("response", "entropy")}},
    "prefix_rft": {"rl": {"pg": ("own", "policy_gradient"), "prefix": ("imitated", "prefix_rft_surrogate"),
                          "entropy": ("response", "entropy")}},
    "uft": {"rl": {"pg": ("own", "policy_gradient"), "hint_nll": ("imitated", "nll"), "entropy": ("own", "entropy"),
                   "kl": ("own", "reference_kl")}},
}
# The kinds of rows a prompt yields in each phase (own rollouts, guided continuations, whole demonstrations).
KINDS = {
    ("trapo", "rl"): {"own", "guided", "demo"},
    ("grpo", "rl"): {"own"},
    ("luffy", "rl"): {"own", "demo"},
    ("sft", "sft"): {"demo"},
    ("sft_then_rl", "sft"): {"demo"},
    ("sft_then_rl", "rl"): {"own"},
    ("relift", "rl"): {"own"},
    ("relift", "fine_tune"): {"demo"},
    ("hpt", "rl"): {"own", "demo"},  # a prompt whose rollouts all fail: its demonstration, the other rows emptied
    ("chord_mu", "rl"): {"own", "demo"},
    ("chord_phi", "rl"): {"own", "demo"},
    ("srft", "rl"): {"own", "demo"},
    ("prefix_rft", "rl"): {"own", "guided"},
    ("uft", "rl"): {"guided"},  # at step 0 a prompt goes without a hint with probability 0.05^segments
}


def _config(name: str):
  cfg = default.get_config()
  cfg.algo = name
  return cfg


@pytest.mark.parametrize("name", NAMES)
def test_algo_alone_runs_the_method_from_the_default_config(name):
  """--config.algo=NAME on experiments/configs/default.py is a valid run of NAME: nothing else to set (the default
  synthetic task's batch fits every method's rows and accumulation)."""
  cfg = _config(name)
  config_lib.validate(cfg, num_devices=8)
  method = algorithms.from_config(cfg)
  assert method.name == name
  assert [phase.name for phase in method.phases(cfg)]


def test_unknown_method_lists_the_registered_ones():
  with pytest.raises(ConfigError, match=r"algo: unknown method 'ppo' \(registered: chord_mu, chord_phi, grpo, hpt"):
    algorithms.from_config(_config("ppo"))


def _rows(phase, g: int, seed: int) -> rollout.RolloutBatch:
  """The phase's rows for g prompts, sampled by a fake sampler and graded at random, each prompt solved with a
  probability of 0, 1/2 or 1 (every schedule branch shows up over a few seeds)."""
  if not phase.samples:
    return rollout.demo_batch(fake_batch(g), which=phase.rows.which, max_len=40)
  rng = np.random.default_rng(seed)
  solve = dict(zip("abcd", rng.choice([0.0, 0.5, 1.0], 4)))
  grade = lambda tokens, mask, answers: (rng.random(len(answers)) < [solve[a] for a in answers]).astype(np.float32)
  return rollout.collect(phase.rows, fake_batch(g), fake_sampler([]), grade, np.asarray([SPLIT]), rng=rng)


@pytest.mark.parametrize("name", NAMES)
def test_rows_per_prompt_kinds_and_masks(name):
  cfg = _config(name)
  method = algorithms.from_config(cfg)
  for phase in method.phases(cfg):
    seen = set()
    for seed in range(6):
      rb = _rows(phase, 3, seed)
      n = phase.rows_per_prompt
      assert rb.tokens.shape[0] == 3 * n and rb.group_ids.tolist() == [i for i in range(3) for _ in range(n)]
      resp, prefix, off = rb.response_mask, rb.prefix_mask, rb.off_loss_mask
      assert not (off & ~prefix).any() and not (prefix & ~resp).any()
      own, guided, demo = (rb.kind == k for k in (losses.ROW_OWN, losses.ROW_GUIDED, losses.ROW_DEMO))
      assert not prefix[own].any()  # own rollouts hold no expert token
      assert all(prefix[r].any() and (resp[r] & ~prefix[r]).any() for r in np.flatnonzero(guided))
      assert all((prefix[r] == resp[r]).all() and resp[r].any() for r in np.flatnonzero(demo))
      seen |= {k for k, rows in zip(("own", "guided", "demo"), (own, guided, demo)) if rows.any()}
    assert seen == KINDS[(name, phase.name)]


@pytest.mark.parametrize("name", NAMES)
def test_terms_see_the_declared_tokens(name):
  cfg = _config(name)
  for phase in algorithms.from_config(cfg).phases(cfg):
    declared = {t.name: (t.tokens, t.loss) for t in phase.objective.terms}
    assert declared == TERMS[name][phase.name]
    x = random_token_inputs(_rows(phase, 3, 0), 0)
    resp, prefix = np.asarray(x.response_mask), np.asarray(x.prefix_mask) & np.asarray(x.response_mask)
    for term in phase.objective.terms:
      selected = np.asarray(losses.SELECTORS[term.tokens](x))
      assert not (selected & ~resp).any()
      if term.tokens == "own":
        assert (selected == (resp & ~prefix)).all()
      if term.tokens == "imitated":
        assert (selected == (prefix & np.asarray(x.off_loss_mask))).all()


# RL options (docs/algorithm.md#rl-options) that change the objective, in two sets that together set every one.
OPTIONS = {
    "none": {},
    "ppo": dict(clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0, tis_cap=2.0, kl_coef=0.05, kl_estimator="k3"),
    "gspo": dict(clip_eps=0.1, importance_ratio="sequence", tis_cap=1.5, tis_level="sequence", tis_mode="mask",
                 kl_coef=0.1, kl_estimator="k2", aggregation="seq_mean_token_mean"),
    "k1": dict(tis_cap=1.5, tis_mode="mask", kl_coef=0.1, kl_estimator="k1", aggregation="token_mean"),
}


@pytest.mark.parametrize("options", sorted(OPTIONS))
@pytest.mark.parametrize("name", NAMES)
def test_loss_equals_the_per_term_reference(name, options):
  cfg = _config(name)
  with cfg.unlocked():
    cfg.loss.update(OPTIONS[options])
  for phase in algorithms.from_config(cfg).phases(cfg):
    if options != "none" and any(t.loss == "policy_gradient" for t in phase.objective.terms):
      assert "kl" in {t.name for t in phase.objective.terms}
    for seed in range(3):
      x = random_token_inputs(_rows(phase, 3, seed), seed)
      # A ratio away from 1 exercises the clip branches where a method has them (and the dual clip at 3).
      spread = 0.3 if options == "none" else 1.2
      shift = np.random.default_rng(seed).uniform(-spread, spread, x.logp.shape)
      x = dataclasses.replace(x, old_logp=x.logp + jnp.asarray(shift, jnp.float32))
      weights = phase.objective.weights_at(7)
      f = lambda logp: losses.objective_loss(dataclasses.replace(x, logp=logp), phase.objective, weights)[0]
      value, grad = jax.value_and_grad(f)(x.logp)
      arrays = {f.name: np.asarray(getattr(x, f.name)) for f in dataclasses.fields(x)}
      ref_value, ref_grad = np_objective(
          phase.objective, {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in arrays.items()}, 7)
      # float32 sums of at most B * T terms: relative error within B * T * eps of the magnitudes.
      n = x.logp.size
      assert abs(float(value) - ref_value) <= 2 * n * np.finfo(np.float32).eps * (1 + abs(ref_value))
      np.testing.assert_allclose(np.asarray(grad, np.float64), ref_grad, rtol=1e-5,
                                 atol=1e-6 * max(1.0, float(np.abs(ref_grad).max())))


def test_luffy_demo_is_the_whole_response_and_grades_correct(tmp_path):
  """LUFFY's demonstration row is the whole R1 response (thought and answer), graded like any rollout: 1 for a
  correct one. TRAPO's full-expert row keeps the thought alone, as the official TRAPO code builds it."""
  from trapo_jax import rewards
  from trapo_jax.data import pipeline
  from trapo_jax.data import synthetic
  from trapo_jax.models import hf
  cfg = _config("luffy")
  with cfg.unlocked():
    cfg.data.update(source="demos", path="tests/fixtures/openr1_layout.jsonl", max_prompt_len=128, max_response_len=64)
  examples = pipeline.load_examples(cfg.data, "train", data_dir=str(tmp_path))
  tokenizer = hf.load_tokenizer(synthetic.TOKENIZER_DIR)
  texts = {}
  for name in ("luffy", "trapo"):
    method = algorithms.from_config(_config(name))
    loader = pipeline.PromptLoader(examples[:1], tokenizer, batch_size=1, max_prompt_len=128, max_response_len=64,
                                   template="train", seed=None, demo_form=method.demo_form(cfg))
    batch = next(loader)
    # LUFFY's rows; TRAPO's level-3 row alike.
    plan = microgroup.Plan(stages=(7, 1), guidance=microgroup.FixedRatio(ratio=1.0))
    rb = rollout.collect(plan, batch, fake_sampler([]), lambda t, m, a: np.zeros(len(a), np.float32),
                         np.asarray([SPLIT]))
    demo_row = int(np.flatnonzero(rb.kind == losses.ROW_DEMO)[0])
    texts[name] = tokenizer.decode(rb.tokens[demo_row][rb.response_mask[demo_row]], skip_special_tokens=True)
  assert texts["luffy"] == "<think>7*6=42</think>\\boxed{42}"  # demo #1 of the fixture's first problem, whole
  assert texts["trapo"] == "7*6=42"
  assert rewards.grade_batch([texts["luffy"]], [examples[0].answer], timeout_s=10.0, workers=1,
                             fallback=False) == [1.0]


def test_the_readme_example_method_is_a_working_method():
  """The README's "Adding a method" code registers a method that validates and whose loss matches the reference."""
  import os
  import re
  import sys
  import types
  from trapo_jax import config as config_lib
  readme = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")).read()
  code = re.search(r"## Adding a method.*?```python\n(.*?)```", readme, re.S).group(1)
  module = types.ModuleType("readme_method")
  sys.modules[module.__name__] = module  # dataclasses look their module up
  try:
    exec(compile(code, "README.md", "exec"), module.__dict__)
    cfg = config_lib.base_config()  # now with the new method's group
    cfg.update(default.get_config().to_dict())
    cfg.algo = "grpo_nll"
    config_lib.validate(cfg, num_devices=8)
    (phase,) = algorithms.from_config(cfg).phases(cfg)
    x = random_token_inputs(_rows(phase, 3, 0), 0)
    assert (np.asarray(x.kind).reshape(3, -1)[:, -1] == losses.ROW_DEMO).all()
    value = losses.objective_loss(x, phase.objective, phase.objective.weights_at(0))[0]
    arrays = {f.name: np.asarray(getattr(x, f.name)) for f in dataclasses.fields(x)}
    ref, _ = np_objective(phase.objective, {k: v.astype(np.float64) if v.dtype.kind == "f" else v
                                             for k, v in arrays.items()}, 0)
    assert abs(float(value) - ref) <= 2 * x.logp.size * np.finfo(np.float32).eps * (1 + abs(ref))
  finally:
    algorithms.base._REGISTRY.pop("grpo_nll", None)
    sys.modules.pop(module.__name__, None)
