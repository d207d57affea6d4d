"""Multi-process runs as they are used: 2 processes x 4 CPU devices (gloo collectives) sharing one gs:// workdir (a
local GCS API server, tests/gcs.py: a pod's hosts share a bucket, not a disk) against 1 process x 8 devices on a
local one, with the default config (the shipped base policy loaded from model.hf_dir, the synthetic data built into
the run's data_dir, evaluation at start and end), a process killed mid-run, the rerun that resumes, and an export."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import jax
import numpy as np
import pytest

from experiments.configs import default
from tests import gcs
from tests import helpers
from tests.helpers import ROOT, restored_state
from tests import numerics
from trapo_jax import distributed
from trapo_jax import paths
from trapo_jax.models import hf

LR, STEPS = 1e-4, 2
# The default config, its budget cut: a small evaluation (5 problems x 2 samples in batches of 4: the last batch is
# padded, and each process holds 2 rows of a batch) before and after 2 steps, a checkpoint every step (the run is
# killed after the first, the rerun makes the second).
ARGS = [f"--config.train.steps={STEPS}", "--config.train.ckpt_every=1", f"--config.optim.lr={LR}",
        "--config.eval.max_problems=5", "--config.eval.samples.synthetic=2", "--config.eval.batch_size=4",
        # Answers are not graded here, only compared across runs: 24 of the 96 tokens the default evaluation writes.
        "--config.eval.max_new_tokens=24",
        # With eps = 1 AdamW's update lr * m / (sqrt(v) + eps) moves at most lr per unit change of the gradient, so
        # the parameters stay as close as the gradients are; at the default eps a near-zero gradient's last bits
        # become an update anywhere between 0 and lr, and no parameter tolerance could tell a right sum from a
        # machine's order.
        "--config.optim.eps=1.0",
        # A pod's backend (TPU) samples a step's stages in one pass (rollout.one_pass=None's choice there): so do these
        # processes, whose every decode step is a collective between them.
        "--config.rollout.one_pass=True"]
LOST_WITHIN_S = 60


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir: str, logs: str, processes: int, extra: tuple[str, ...] = ()) -> list[tuple[subprocess.Popen, str]]:
  """Starts trapo_jax.main in `processes` processes on `workdir` (its data_dir inside it), each logging to a file
  under the local directory `logs`; (process, log path) each."""
  base = [sys.executable, "-m", "trapo_jax.main", f"--workdir={workdir}",
          f"--config.data.data_dir={paths.join(workdir, 'tfds')}", *ARGS, *extra]
  env = helpers.cpu_env(8 // processes)
  runs = []
  port = _free_port()
  for i in range(processes):
    flags = [] if processes == 1 else [
        "--config.distributed.enabled=True", f"--config.distributed.coordinator_address=localhost:{port}",
        f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}",
        "--config.distributed.heartbeat_timeout_s=10"]
    log = os.path.join(logs, f"{len(glob.glob(os.path.join(logs, '*.log')))}.log")
    with open(log, "w") as f:
      runs.append((subprocess.Popen(base + flags, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), log))
  return runs


def _finish(runs) -> list[str]:
  """Waits for every process; each one's output (they must all succeed)."""
  logs = []
  for p, log in runs:
    p.wait(timeout=900)
    logs.append(open(log).read())
    assert p.returncode == 0, logs[-1][-4000:]
  return logs


def _wait_for(cond, what: str, runs, timeout: float = 900) -> None:
  end = time.monotonic() + timeout
  while not cond():
    assert time.monotonic() < end, f"timed out waiting for {what}"
    assert all(p.poll() is None for p, _ in runs), f"a process ended before {what}: " + "".join(
        open(log).read()[-3000:] for _, log in runs)
    time.sleep(0.2)


def _rows(workdir: str) -> list[dict]:
  path = paths.join(workdir, "metrics.jsonl")
  return [json.loads(line) for line in paths.read_text(path).splitlines()] if paths.exists(path) else []


def _generations(workdir: str, name: str) -> list[tuple]:
  return [(r["uid"], r["sample"], r["response"], r["correct"])
          for r in map(json.loads, paths.read_text(paths.join(workdir, "eval", name, "generations.jsonl")).splitlines())]


class _KeyValueStore:
  """The coordination service's key-value store, as the watchdog uses it."""

  def __init__(self):
    self.values = {}

  def key_value_set(self, key, value, allow_overwrite=False):
    assert allow_overwrite or key not in self.values
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def test_watchdog_names_a_silent_or_failed_peer_and_lets_a_finished_one_go():
  store = _KeyValueStore()
  dogs = [distributed.Watchdog(store, me, 3, timeout=10) for me in range(3)]
  for dog in dogs:
    dog.beat()
  assert dogs[0].lost(now=0.0) is None
  dogs[1].beat()
  dogs[2].stop(distributed.DONE)  # a clean exit: no longer watched
  assert dogs[0].lost(now=9.0) is None  # process 1 moved at 9 s (as seen from here), process 2 is done
  assert dogs[0].lost(now=19.0) is None
  assert dogs[0].lost(now=19.5) == "process 1 of 3 was lost (no heartbeat for 10 s)"
  dogs[1].beat()
  assert dogs[0].lost(now=20.0) is None  # beating again
  dogs[1].stop(distributed.FAILED)
  assert dogs[0].lost(now=20.5) == "process 1 of 3 stopped with an error (see its log)"


@pytest.mark.slow
def test_two_processes_on_a_bucket_run_as_one_survive_a_lost_process_and_export(gcs_env, tmp_path):
  del gcs_env  # this process's environment points at the server, and the processes started here inherit it
  one, two = str(tmp_path / "one"), f"gs://{gcs.BUCKET}/dist-{uuid.uuid4().hex[:8]}"
  logs_one, logs_two = str(tmp_path / "logs_one"), str(tmp_path / "logs_two")
  for d in (one, logs_one, logs_two):
    os.makedirs(d)
  # kill -9 of process 1 once step 1 is checkpointed: process 0 stops within seconds, naming it in one line.
  runs = _start(two, logs_two, processes=2)
  _wait_for(lambda: len(_rows(two)) >= 1 and helpers.newest_checkpoint(two), "the checkpoint of step 1", runs)
  runs[1][0].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  runs[0][0].wait(timeout=LOST_WITHIN_S + 30)
  assert time.monotonic() - killed < LOST_WITHIN_S
  out = open(runs[0][1]).read()
  assert runs[0][0].returncode == 3, out[-3000:]
  lines = [line for line in out.splitlines() if "process 1 of 2" in line]
  assert len(lines) == 1 and lines[0].startswith("error: process 1 of 2 was lost"), out[-3000:]
  assert "Traceback" not in out and "Fatal Python error" not in out, out[-3000:]
  assert len(_rows(two)) < STEPS  # it was stopped mid-run
  committed = helpers.newest_checkpoint(two)  # what the rerun must restore
  # Process 0 built the data into the shared data_dir once, and process 1 read it: a single prepared copy.
  versions = paths.join(two, "tfds", "synthetic", "default")
  assert paths.listdir(versions) == ["1.0.0"] and paths.exists(paths.join(versions, "1.0.0", "dataset_info.json"))
  # Each process sampled its half of every evaluation batch (2 of 4 prompt rows, over 2 padded batches).
  before = [open(log).read() for _, log in runs]
  assert all("this process sampled 4 of 8 prompt rows" in log for log in before)

  # The same command again resumes from the newest checkpoint and finishes.
  logs = _finish(_start(two, logs_two, processes=2))
  resumed = [int(s) for s in re.findall(r"restored checkpoint of step (\d+)", logs[0])]
  assert resumed == [committed], logs[0][-3000:]
  # Written by process 0 only, cut back to the checkpoint.
  assert [r["step"] for r in _rows(two)] == list(range(1, STEPS + 1))

  _finish(_start(one, logs_one, processes=1))
  cfg = default.get_config()
  a, meta_a = restored_state(one, cfg)  # the 2-process checkpoint restores in this single process
  b, meta_b = restored_state(two, cfg)
  assert int(a.step) == int(b.step) == STEPS and meta_a["data"] == meta_b["data"]
  # Each device computes the same partial gradient in both runs; only the sum over the 8 devices is taken in another
  # order (4 + 4 across processes), which rounds within 2 * 7 eps of the partials' magnitudes: at most 8 (partials)
  # times 1, the largest element of a gradient clipped to global norm 1, taking no partial to exceed that norm. A
  # step moves a parameter by at most lr times the change of its gradient, and by as much again through Adam's
  # moments.
  devices = 8
  bound = 2 * LR * STEPS * numerics.float32_sum_bound(devices, devices)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=bound), a.params, b.params)
  # Adam's moments hold the steps' gradients linearly (first) and squared (second, |g| <= 1).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=2 * bound / LR), a.opt_state, b.opt_state)
  # Step 1 samples from the same parameters, each row on the same device with the same key: the same rollouts.
  # (Later steps sample from parameters that may differ in their last bits, where a draw may fall the other way.)
  assert _rows(one)[0]["reward/mean"] == _rows(two)[0]["reward/mean"]
  # The evaluation before training: the same policy, each row sampled with the same key, wherever it ran.
  assert len(_generations(one, "before")) == 10 and _generations(one, "before") == _generations(two, "before")
  assert len({g[2] for g in _generations(one, "before")}) > 1  # rows really differ: a mix-up of rows would show
  for workdir in (one, two):
    assert json.loads(paths.read_text(paths.join(workdir, "eval", "after", "results.json")))["benchmarks"][
        "synthetic"]["problems"] == 5

  # 2 processes export the 1-process run's checkpoint (it restores across process counts); the export loads as it.
  _finish(_start(one, logs_one, processes=2, extra=("--mode=export",)))
  _, exported = hf.load_hf(os.path.join(one, "hf"))
  jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(a.params))
