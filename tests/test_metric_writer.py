"""The per-step metrics log: strict JSON rows, undefined metrics left out, a resumed run's later steps dropped."""

import json
import math

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

