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


def test_a_line_logged_under_an_open_progress_bar_starts_its_own_line(capsys):
  import logging
  import sys
  import tqdm
  from trapo_jax import main
  logger = logging.getLogger("test_between_bars")
  logger.propagate = False
  logger.setLevel(logging.INFO)
  logger.addHandler(main._BetweenBars())  # pylint: disable=protected-access
  with tqdm.tqdm(total=2, desc="train", file=sys.stderr) as bar:
    bar.update(1)
    logger.info("checkpoint saved at step 1")
  [line] = [line for line in capsys.readouterr().err.split("\n") if "checkpoint saved" in line]
  # What the terminal shows of that line: the text after its last carriage return, the log line alone.
  assert line.split("\r")[-1].startswith("I") and "train" not in line.split("\r")[-1]
