"""Multi-process training: 2 processes x 4 CPU devices (gloo collectives) against 1 process x 8 devices."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import default
from tests import numerics
from tests.test_trainer import FIXTURE, ROOT, _params, tiny

pytestmark = pytest.mark.slow

ARGS = ["--config.model.hf_dir=", "--config.model.vocab_size=384", "--config.model.hidden_size=32",
        "--config.model.intermediate_size=64", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1", "--config.model.head_dim=16", "--config.data.source=demos",
        f"--config.data.path={FIXTURE}", "--config.data.max_prompt_len=128", "--config.data.max_response_len=24",
        "--config.data.levels=()", "--config.train.batch_prompts=2", "--config.train.ckpt_every=1",
        "--config.train.micro_batch_tokens=4096", "--config.train.logprob_chunk=8", "--config.optim.lr=0.01",
        "--config.eval.at_start=False", "--config.eval.at_end=False"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(workdir: str, steps: int, processes: int, extra: tuple[str, ...] = ()) -> list[str]:
  """Runs trapo_jax.main in `processes` processes; returns each one's stderr (its log)."""
  from trapo_jax.data import synthetic
  base = [sys.executable, "-m", "trapo_jax.main", f"--workdir={workdir}", f"--config.train.steps={steps}",
          f"--config.model.tokenizer_dir={synthetic.TOKENIZER_DIR}", *ARGS, *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
  if processes == 1:
    procs = [subprocess.Popen(base, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
  else:
    port = _free_port()
    procs = [subprocess.Popen(
        base + ["--config.distributed.enabled=True", f"--config.distributed.coordinator_address=localhost:{port}",
                f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(processes)]
  errors = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-4000:]
  return errors


def _state(workdir: str):
  return _params(workdir, tiny(default.get_config(), workdir))


def test_two_processes_equal_one_and_checkpoints_cross_over(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  # With eps = 1 AdamW's update lr * m / (sqrt(v) + eps) moves at most lr per unit change of the gradient, so the
  # parameters stay as close as the gradients are; at the default eps a near-zero gradient's last bits become an
  # update anywhere between 0 and lr, and no parameter tolerance could tell a right sum from a machine's order.
  adam_linear = ("--config.optim.eps=1.0",)
  _run(one, steps=2, processes=1, extra=adam_linear)
  _run(two, steps=2, processes=2, extra=adam_linear)
  a, meta_a = _state(one)  # the 2-process checkpoint restores in this single process
  b, meta_b = _state(two)
  assert int(a.step) == int(b.step) == 2 and meta_a["data"] == meta_b["data"]
  # Each device computes the same partial gradient in both runs; only the sum over the 8 devices is taken in another
  # order (4 + 4 across processes), which rounds within 2 * 7 eps of the partials' magnitudes: at most 8 (partials)
  # times 1, the largest element of a gradient clipped to global norm 1, taking no partial to exceed that norm. A
  # step moves a parameter by at most lr times the change of its gradient, and by as much again through Adam's
  # moments.
  lr, steps, devices = 0.01, 2, 8
  bound = 2 * lr * steps * numerics.float32_sum_bound(devices, devices)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=bound), a.params, b.params)
  # Adam's moments at step 2 hold the two steps' gradients linearly (first) and squared (second, |g| <= 1).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=2 * bound / lr), a.opt_state, b.opt_state)
  rows_a = [json.loads(line) for line in open(os.path.join(one, "metrics.jsonl"))]
  rows_b = [json.loads(line) for line in open(os.path.join(two, "metrics.jsonl"))]  # written by process 0 only
  assert [r["step"] for r in rows_b] == [1, 2]
  # Step 1 samples from the same parameters, each row on the same device with the same key: the same rollouts.
  # (Step 2 samples from parameters that may differ in their last bits, where a draw may fall the other way.)
  assert rows_a[0]["reward/mean"] == rows_b[0]["reward/mean"]
  # The reverse: the 1-process checkpoint resumes in 2 processes.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(one, resumed)
  _run(resumed, steps=3, processes=2, extra=adam_linear)
  c, _ = _state(resumed)
  assert int(c.step) == 3
  assert [json.loads(line)["step"] for line in open(os.path.join(resumed, "metrics.jsonl"))] == [1, 2, 3]


def test_two_processes_split_evaluation_and_agree_with_one(tmp_path):
  """--mode=eval over 2 processes: each samples its share of every batch, the outputs equal one process's."""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  _run(one, steps=1, processes=1)
  shutil.copytree(one, two)
  # 5 problems x 2 samples in batches of 4: the last batch is padded, and each process holds 2 rows of a batch.
  extra = ("--mode=eval", "--config.eval.benchmarks=('math500',)", "--config.eval.max_problems=5",
           "--config.eval.batch_size=4", "--config.eval.samples.math500=2", "--config.eval.max_new_tokens=12",
           "--config.data.max_prompt_len=1024")  # math500 prompts are longer than the training fixture's
  logs_one = _run(one, steps=1, processes=1, extra=extra)
  logs_two = _run(two, steps=1, processes=2, extra=extra)
  # 2 batches of 4 prompt rows (the second padded); each process samples only its half of each.
  assert "this process sampled 8 of 8 prompt rows" in logs_one[0]
  assert all("this process sampled 4 of 8 prompt rows" in log for log in logs_two)
  a = json.load(open(os.path.join(one, "eval", "step_1", "results.json")))["benchmarks"]["math500"]
  b = json.load(open(os.path.join(two, "eval", "step_1", "results.json")))["benchmarks"]["math500"]
  assert a["problems"] == b["problems"] == 5 and a["mean_length"] == b["mean_length"]
  gen = lambda d: [(r["uid"], r["sample"], r["response"], r["correct"])
                   for r in map(json.loads, open(os.path.join(d, "eval", "step_1", "generations.jsonl")))]
  assert len(gen(one)) == 10 and gen(one) == gen(two)
  assert len({r[2] for r in gen(one)}) > 1  # rows really differ: a mix-up of rows would show
