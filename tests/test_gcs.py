"""The command line on a gs:// workdir, weights and data, against a local GCS API server (tests/gcs.py).

One scenario, as a run on a pod lives it: the base policy (config.json, safetensors, tokenizer) and the
demonstrations (parquet) in the bucket, the workdir in the bucket (TFDS data, checkpoints through orbax/TensorStore,
metrics.jsonl, TensorBoard, LOCK); training killed with SIGKILL and resumed; a second run refused by the lock;
evaluation; export into the bucket and loading it back. Its results must be those of the same run on local paths.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import default
from trapo_jax import paths
from trapo_jax.models import hf
from trapo_jax.train import metrics as metrics_lib
from trapo_jax.train import state as state_lib
from trapo_jax.train import trainer
from trapo_jax.train import workdir as workdir_lib
from tests import helpers
from tests.helpers import ENV, ROOT, TINY_FLAGS, tiny

pytestmark = pytest.mark.slow

PARQUET = os.path.join(ROOT, "tests", "fixtures", "openr1_layout.parquet")
BUCKET = "gs://test-bucket"
# Everything the run reads comes from --config.model.hf_dir and --config.data.path: no size or tokenizer flags.
FLAGS = [f for f in TINY_FLAGS if not f.startswith(("--config.model.", "--config.data.path="))]
EVAL_FLAGS = ["--config.data.max_prompt_len=1024", "--config.eval.benchmarks=('math500',)", "--config.eval.max_problems=2", "--config.eval.max_new_tokens=8",
              "--config.eval.batch_size=2"]
# Runs are cut short by their time: 1 s steps after compiling, a few seconds per process start.
_DEADLINE = 600


def _main(env: dict, workdir: str, base: str, data: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "trapo_jax.main", f"--workdir={workdir}", *FLAGS,
                         f"--config.model.hf_dir={base}", f"--config.data.path={data}", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=_DEADLINE)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _base_policy(local: str, remote: str) -> None:
  """A random-init tiny policy with its tokenizer, written to a local directory and (by save_hf itself) to gs://."""
  cfg = tiny(default.get_config(), local)
  ctx = trainer.build_context(cfg, local)
  params = jax.device_get(state_lib.init_params(cfg, ctx.model_cfg, ctx.mesh))
  for path in (local, remote):
    hf.save_hf(path, ctx.model_cfg, params, tokenizer=ctx.tokenizer)


def _checkpoints(workdir: str) -> list[int]:
  return sorted(int(n) for n in paths.listdir(paths.join(workdir, "checkpoints")) if n.isdigit())


def _kill_after_two_checkpoints(env: dict, workdir: str, base: str, data: str, log: str) -> int:
  """Trains until 2 checkpoints exist, then SIGKILL; returns the newest checkpoint step seen."""
  with open(log, "w") as err:  # a file, not a pipe: nobody reads a pipe while the run logs, and it would block
    proc = subprocess.Popen([sys.executable, "-m", "trapo_jax.main", f"--workdir={workdir}", *FLAGS,
                             f"--config.model.hf_dir={base}", f"--config.data.path={data}",
                             "--config.train.steps=1000"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
  deadline = time.monotonic() + _DEADLINE
  try:
    while time.monotonic() < deadline:
      assert proc.poll() is None, open(log).read()[-4000:]
      if len(_checkpoints(workdir)) >= 2:
        break
      time.sleep(0.5)
    else:
      pytest.fail(f"no second checkpoint in time: {open(log).read()[-4000:]}")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  return _checkpoints(workdir)[-1]


def _scalar_steps(tb_dir: str) -> dict[str, list[int]]:
  """{tag: [step, ...]} of every scalar of a TensorBoard directory (any path the path layer reads)."""
  from tensorboardX.proto import event_pb2
  out: dict[str, list[int]] = {}
  for name in paths.listdir(tb_dir):
    for payload in metrics_lib._records(paths.read_bytes(paths.join(tb_dir, name))):  # pylint: disable=protected-access
      event = event_pb2.Event.FromString(payload)
      for v in event.summary.value:
        out.setdefault(v.tag, []).append(event.step)
  return out


def test_gcs_workdir_weights_and_data_match_local_paths(gcs_env, tmp_path):
  env = {**ENV, **gcs_env, paths.CACHE_ENV: str(tmp_path / "cache")}
  local_base, gcs_base = str(tmp_path / "base"), f"{BUCKET}/models/tiny"
  _base_policy(local_base, gcs_base)
  gcs_data = f"{BUCKET}/data/openr1_layout.parquet"
  with open(PARQUET, "rb") as f:
    paths.write(gcs_data, f.read())
  assert paths.exists(paths.join(gcs_base, "model.safetensors")) and paths.exists(paths.join(gcs_base, "tokenizer.json"))

  run = f"{BUCKET}/run"
  newest = _kill_after_two_checkpoints(env, run, gcs_base, gcs_data, str(tmp_path / "killed.log"))
  assert paths.exists(paths.join(run, "LOCK"))  # the killed run's, taken over below (its pid is gone, same host)
  steps = newest + 1
  committed = helpers.newest_checkpoint(run)  # the newest directory may be a save the kill interrupted
  resumed = _ok(_main(env, run, gcs_base, gcs_data, f"--config.train.steps={steps}"))
  assert "taking over the lock" in resumed.stderr and not paths.exists(paths.join(run, "LOCK"))
  assert committed and f"restored checkpoint of step {committed}" in resumed.stderr, resumed.stderr[-3000:]

  local = str(tmp_path / "local")
  _ok(_main(env, local, local_base, PARQUET, f"--config.train.steps={steps}"))
  gcs_rows = metrics_lib.read_jsonl(paths.join(run, "metrics.jsonl"))
  local_rows = metrics_lib.read_jsonl(os.path.join(local, "metrics.jsonl"))
  assert [r["step"] for r in gcs_rows] == [r["step"] for r in local_rows] == list(range(1, steps + 1))
  wall_clock = lambda k: k.startswith("time/") or k == "tokens_per_s"
  for g, l in zip(gcs_rows, local_rows):  # bit-exact: the same floats in the JSON; wall-clock figures aside
    diff = {k: (g.get(k), l.get(k)) for k in set(g) | set(l) if not wall_clock(k) and g.get(k) != l.get(k)}
    assert not diff, (g["step"], diff)
  scalars = _scalar_steps(paths.join(run, "tb"))
  # Each step at most once (the killed run's steps after the checkpoint resumed from were cut), the last ones all
  # there. What the killed run logged since its last upload is lost: tensorboardX uploads the whole events file to
  # GCS at each flush (every 120 s), while metrics.jsonl is rewritten at every step.
  logged = scalars["loss"]
  assert len(set(logged)) == len(logged) and logged == sorted(logged) and logged[-1] == steps, logged
  assert paths.exists(paths.join(run, "curves.png"))
  assert paths.exists(f"{BUCKET}/tfds")  # TFDS's data_dir defaults beside the (gs://) workdir

  # A live run holds the lock (this process, on this host): a second run is refused in one line.
  lock = paths.join(run, "LOCK")
  assert paths.create(lock, json.dumps(workdir_lib._me()))  # pylint: disable=protected-access
  refused = _main(env, run, gcs_base, gcs_data, f"--config.train.steps={steps + 1}")
  paths.remove(lock)
  assert refused.returncode == 2, refused.stderr[-3000:]
  lines = [line for line in refused.stderr.splitlines() if f"in use by pid {os.getpid()}" in line]
  assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]

  _ok(_main(env, run, gcs_base, gcs_data, "--mode=eval", *EVAL_FLAGS))
  evaluated = paths.join(run, "eval", f"step_{steps}")  # the checkpoint's step
  results = json.loads(paths.read_text(paths.join(evaluated, "results.json")))
  assert results["benchmarks"]["math500"]["problems"] == 2
  assert len(paths.read_text(paths.join(evaluated, "generations.jsonl")).splitlines()) == 2
  assert {"results.md", "pass_at_k.png"} <= set(paths.listdir(evaluated))

  gcs_export, local_export = f"{BUCKET}/export", str(tmp_path / "export")
  _ok(_main(env, run, gcs_base, gcs_data, "--mode=export", f"--export_dir={gcs_export}"))
  _ok(_main(env, local, local_base, PARQUET, "--mode=export", f"--export_dir={local_export}"))
  cfg_gcs, params_gcs = hf.load_hf(gcs_export)
  cfg_local, params_local = hf.load_hf(local_export)
  assert cfg_gcs == cfg_local
  _, params_base = hf.load_hf(gcs_base)
  jax.tree.map(np.testing.assert_array_equal, params_gcs, params_local)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params_gcs), jax.tree.leaves(params_base)))
  assert hf.load_tokenizer(gcs_export)("1+1").input_ids == hf.load_tokenizer(local_export)("1+1").input_ids

