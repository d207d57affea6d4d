"""The one trainer: every algorithm end to end, exact resume, SIGTERM, non-finite updates, the 7B step compiles."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trapo_jax import config as config_lib
from trapo_jax import errors
from trapo_jax.data import synthetic
from trapo_jax.train import checkpoint as ckpt_lib
from trapo_jax.train import state as state_lib
from trapo_jax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "trapo_layout.jsonl")
ALGORITHM_CONFIGS = ("default", "grpo", "luffy", "sft", "sft_then_rl", "trapo_sft_prefix", "trapo_fixed_prefix")


def tiny(cfg, workdir: str, steps: int = 3):
  """A config shrunk to a random 1-layer model on the demonstration fixture, a few seconds a step."""
  with cfg.unlocked():
    cfg.mesh.update(data=1, fsdp=4, tensor=2)  # 4 batch shards: the 4 SFT rows of 2 prompts split evenly
    cfg.model.hf_dir = ""
    cfg.model.tokenizer_dir = synthetic.TOKENIZER_DIR
    cfg.model.update(vocab_size=384, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=16, dtype="float32", param_dtype="float32", remat="none")
    cfg.data.update(source="demos", path=FIXTURE, max_prompt_len=128, max_response_len=24, levels=(),
                    data_dir=os.path.join(workdir, "tfds"))
    cfg.train.update(steps=steps, batch_prompts=2, ckpt_every=1, micro_batch_tokens=256, logprob_chunk=8)
    if cfg.algo == "sft_then_rl":
      cfg.train.sft_steps = 1
    cfg.optim.lr = 1e-2
    cfg.eval.update(at_start=False, at_end=False, every=0, grader_timeout_s=5.0)
  config_lib.validate(cfg, num_devices=jax.device_count())
  return cfg


def _config(name: str):
  return importlib.import_module(f"experiments.configs.{name}").get_config()


def _params(workdir: str, cfg):
  ctx = trainer.build_context(cfg, workdir)
  template = state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx)
  ck = ckpt_lib.Checkpointer(workdir, keep=10, every=1)
  state, meta = ck.restore(template)
  ck.close()
  return jax.device_get(state), meta


@pytest.mark.parametrize("name", ALGORITHM_CONFIGS)
def test_every_algorithm_runs_three_steps(name, tmp_path):
  workdir = str(tmp_path)
  cfg = tiny(_config(name), workdir)
  trainer.run(cfg, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tb")))
  assert os.path.exists(os.path.join(workdir, "curves.png"))
  final, meta = _params(workdir, cfg)
  assert int(final.step) == 3 and meta["algo"] == cfg.algo
  ctx = trainer.build_context(cfg, workdir)
  initial = jax.device_get(state_lib.init_params(cfg, ctx.model_cfg, ctx.mesh))
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial, final.params)
  assert all(jax.tree.leaves(changed))
  if name in ("default", "trapo_sft_prefix", "trapo_fixed_prefix", "luffy"):
    assert sum(r["num_prefix_tokens"] for r in rows) > 0  # expert prefixes were imitated
  if name == "grpo":
    assert all(r["num_prefix_tokens"] == 0 for r in rows)
  if name == "sft_then_rl":
    assert [r["phase_sft"] for r in rows] == [1.0, 0.0, 0.0]


def test_exact_resume(tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  cfg = tiny(_config("default"), straight, steps=4)
  trainer.run(cfg, straight)
  trainer.run(tiny(_config("default"), resumed, steps=2), resumed)
  trainer.run(tiny(_config("default"), resumed, steps=4), resumed)
  a, meta_a = _params(straight, cfg)
  b, meta_b = _params(resumed, cfg)
  assert meta_a["data"] == meta_b["data"]
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, optimizer state, step, rng: bitwise
  rows = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_sigterm_saves_and_resumes(tmp_path):
  workdir = str(tmp_path)
  args = [sys.executable, "-m", "trapo_jax.main", f"--workdir={workdir}", "--config.model.hf_dir=",
          f"--config.model.tokenizer_dir={synthetic.TOKENIZER_DIR}", "--config.model.vocab_size=384",
          "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=1",
          "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
          "--config.data.source=demos", f"--config.data.path={FIXTURE}", "--config.data.max_prompt_len=128",
          "--config.data.max_response_len=24", "--config.data.levels=()", "--config.train.batch_prompts=2",
          "--config.train.ckpt_every=1000", "--config.train.micro_batch_tokens=256", "--config.train.logprob_chunk=8",
          "--config.eval.at_start=False", "--config.eval.at_end=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen(args + ["--config.train.steps=1000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == errors.EXIT_PREEMPTED == 143, err[-3000:]  # a scheduler tells it from a finished run
  saved = ckpt_lib.Checkpointer(workdir, keep=10, every=1000).latest_step()
  assert saved is not None and saved >= 2  # saved although ckpt_every=1000
  done = subprocess.run(args + [f"--config.train.steps={saved + 1}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = [json.loads(line) for line in open(metrics)]
  assert [r["step"] for r in rows] == list(range(1, saved + 2))  # resumed at saved + 1, nothing redone twice


def test_non_finite_update_is_skipped(tmp_path):
  cfg = tiny(_config("default"), str(tmp_path))
  ctx = trainer.build_context(cfg, str(tmp_path))
  state = state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx)
  before = jax.device_get(state)
  m, mb, t, lb = 1, 8, 16, 8
  batch = dict(seq_tokens=jnp.ones((m, mb, t), jnp.int32), seq_mask=jnp.ones((m, mb, t), bool),
               resp_start=jnp.full((m, mb), 8, jnp.int32), resp_tokens=jnp.ones((m, mb, lb), jnp.int32),
               prefix_mask=jnp.zeros((m, mb, lb), bool), off_loss_mask=jnp.zeros((m, mb, lb), bool),
               response_mask=jnp.ones((m, mb, lb), bool), advantages=jnp.full((m, mb), jnp.nan))
  step = trainer._jit_step(ctx, "rl")
  new, metrics = step(state, batch)
  assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  after = jax.device_get(new)
  jax.tree.map(np.testing.assert_array_equal, before.params, after.params)
  jax.tree.map(np.testing.assert_array_equal, before.opt_state, after.opt_state)
  assert int(after.step) == 1
  # A finite batch does update.
  new, metrics = step(new, dict(batch, advantages=jnp.ones((m, mb))))
  assert float(metrics["skipped"]) == 0.0
  assert not np.array_equal(jax.device_get(new.params)["params"]["norm"]["scale"], before.params["params"]["norm"]["scale"])


def test_micro_batches_report_the_batch_metrics(tmp_path):
  """Split into 2 micro-batches, of which only one holds expert tokens, a step reports what 1 micro-batch does."""
  cfg = tiny(_config("default"), str(tmp_path))
  ctx = trainer.build_context(cfg, str(tmp_path))
  state = jax.device_get(state_lib.init_state(cfg, ctx.model_cfg, ctx.mesh, ctx.tx))
  rng = np.random.default_rng(0)
  n, t, lb = 8, 16, 8
  prefix = np.zeros((n, lb), bool)
  prefix[:4, :3] = True  # rows 0-3 (the first micro-batch) start with 3 expert tokens
  rows = dict(seq_tokens=rng.integers(1, 300, (n, t)).astype(np.int32), seq_mask=np.ones((n, t), bool),
              resp_start=np.full((n,), 8, np.int32), resp_tokens=rng.integers(1, 300, (n, lb)).astype(np.int32),
              prefix_mask=prefix, off_loss_mask=prefix, response_mask=np.ones((n, lb), bool),
              advantages=rng.normal(size=n).astype(np.float32))
  step = trainer._jit_step(ctx, "rl")
  out = {}
  for m in (1, 2):
    batch = {k: jnp.asarray(v.reshape(m, n // m, *v.shape[1:])) for k, v in rows.items()}
    new, metrics = step(jax.device_put(state), batch)
    out[m] = jax.device_get((new.params, metrics))
  for k in ("expert_prob", "expert_frac_below_alpha", "own_prob", "loss", "num_prefix_tokens", "num_own_tokens"):
    np.testing.assert_allclose(out[2][1][k], out[1][1][k], rtol=1e-5, err_msg=k)
  assert float(out[1][1]["num_prefix_tokens"]) == 12 and 0 < float(out[1][1]["expert_prob"]) < 1
  # Same objective, so the same update; AdamW's first step is lr * g / (|g| + eps), which turns the rounding of
  # near-zero gradients into ~1e-6 differences at lr 1e-2 (a wrong gradient would differ by ~lr).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), out[1][0], out[2][0])
  # Without expert tokens the expert figures are undefined, not 0.
  _, metrics = step(jax.device_put(state), {k: jnp.asarray(v[None]) if k not in ("prefix_mask", "off_loss_mask")
                                            else jnp.zeros((1, n, lb), bool) for k, v in rows.items()})
  assert np.isnan(float(metrics["expert_prob"])) and float(metrics["num_prefix_tokens"]) == 0


def test_too_many_bad_steps_stop_the_run(tmp_path, monkeypatch):
  cfg = tiny(_config("default"), str(tmp_path), steps=5)
  with cfg.unlocked():
    cfg.train.max_bad_steps = 2
  real = trainer.train_one_step

  def poisoned(ctx, state, batch, step_fns):
    state, m = real(ctx, state, batch, step_fns)
    return state, dict(m, skipped=1.0)

  monkeypatch.setattr(trainer, "train_one_step", poisoned)
  with pytest.raises(trainer.TrainingError, match="2 consecutive non-finite updates"):
    trainer.run(cfg, str(tmp_path))
