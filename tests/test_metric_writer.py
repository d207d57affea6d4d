"""The per-step metrics log: strict JSON rows, undefined metrics left out, a resumed run's later steps dropped."""

import json
import math
import os
import subprocess
import sys

from tests import helpers

from trapo_jax.train import metrics as metrics_lib


def _strict_rows(path):
  def refuse(name):
    raise ValueError(f"non-standard JSON constant {name}")
  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]


def test_rows_are_strict_json_and_leave_out_undefined_metrics(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), total_steps=2)
  w.write(1, {"loss": 0.5, "expert_prob": math.nan, "num_prefix_tokens": 0.0})
  w.write(2, {"loss": 0.25, "expert_prob": 0.75, "num_prefix_tokens": 12.0})
  w.close()
  rows = _strict_rows(w.path)
  assert rows == [{"step": 1, "loss": 0.5, "num_prefix_tokens": 0.0},
                  {"step": 2, "loss": 0.25, "expert_prob": 0.75, "num_prefix_tokens": 12.0}]


def test_resumed_run_drops_the_steps_after_its_checkpoint(tmp_path):
  w = metrics_lib.MetricWriter(str(tmp_path), total_steps=4)
  for step in range(1, 5):
    w.write(step, {"loss": float(step)})
  w.close()
  w = metrics_lib.MetricWriter(str(tmp_path), total_steps=4, initial_step=2)
  w.write(3, {"loss": 30.0})
  w.close()
  assert [(r["step"], r["loss"]) for r in _strict_rows(w.path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_the_writer_does_not_import_torch_and_leaves_it_importable(tmp_path):
  """tensorboardX imports torch where it is installed (about 2 s of a run's start) only for its type hints."""
  code = ("import sys; from trapo_jax.train import metrics; w = metrics.MetricWriter(sys.argv[1], total_steps=1); "
          "w.write(1, {'loss': 0.5}); w.close(); print('torch' in sys.modules); "
          "import torch; print(torch.ones(2).sum())")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=helpers.ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split("\n")[:2] == ["False", "tensor(2.)"]
  events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events")]
  assert len(events) == 1 and b"loss" in (tmp_path / "tb" / events[0]).read_bytes()
