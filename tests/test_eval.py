"""--mode=eval on the six benchmarks with a tiny random model, and a shortened default experiment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from trapo_jax.data import synthetic

ROOT = helpers.ROOT
BENCHMARKS = ("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench")


def _main(*args: str) -> subprocess.CompletedProcess:
  env = helpers.cpu_env(1)
  return subprocess.run([sys.executable, "-m", "trapo_jax.main", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


def test_eval_mode_writes_the_four_outputs(tmp_path):
  out = _main("--mode=eval", "--allow_initial_policy", f"--workdir={tmp_path}", "--config.model.hf_dir=",
              f"--config.model.tokenizer_dir={synthetic.TOKENIZER_DIR}", "--config.model.vocab_size=384",
              "--config.model.num_layers=1", "--config.data.max_prompt_len=1024",
              f"--config.eval.benchmarks=({','.join(repr(b) for b in BENCHMARKS)})", "--config.eval.max_problems=3",
              "--config.eval.max_new_tokens=8", "--config.eval.batch_size=4", "--config.eval.samples.aime24=4",
              "--config.eval.samples.aime25=4", "--config.eval.samples.amc=2")
  assert out.returncode == 0, out.stderr[-3000:]
  d = tmp_path / "eval" / "step_0"  # the initial policy
  results = json.load(open(d / "results.json"))
  assert set(results["benchmarks"]) == set(BENCHMARKS)
  assert results["benchmarks"]["aime24"]["samples"] == 4 and results["benchmarks"]["math500"]["samples"] == 1
  assert all(r["problems"] == 3 for r in results["benchmarks"].values())
  assert sorted(results["benchmarks"]["aime24"]["pass@k"], key=int) == ["1", "2", "4"]
  assert "math_avg" in results
  rows = [json.loads(line) for line in open(d / "generations.jsonl")]
  assert len(rows) == 3 * (4 + 4 + 2 + 1 + 1 + 1)
  assert {"benchmark", "problem", "answer", "response", "correct", "sample"} <= set(rows[0])
  # The figures are the generations' grades, averaged as the paper does.
  for name, r in results["benchmarks"].items():
    grades = [g["correct"] for g in rows if g["benchmark"] == name]
    assert r[f"avg@{r['samples']}"] == pytest.approx(np.mean(grades))
  assert "| aime24 | 3 | 4 |" in open(d / "results.md").read()
  assert os.path.getsize(d / "pass_at_k.png") > 1000
  assert "| benchmark |" in out.stdout


@pytest.mark.slow
def test_shortened_default_experiment(tmp_path):
  out = _main(f"--workdir={tmp_path}", "--config.train.steps=3", "--config.eval.max_problems=32",
              "--config.eval.samples.synthetic=2")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "| synthetic |" in out.stdout and "| benchmark | before | after |" in out.stdout
  before = json.load(open(tmp_path / "eval" / "before" / "results.json"))["benchmarks"]["synthetic"]
  after = json.load(open(tmp_path / "eval" / "after" / "results.json"))["benchmarks"]["synthetic"]
  assert before["problems"] == after["problems"] == 32
  assert set(before["by_level"]) == {str(lv) for lv in synthetic.LEVELS}
  assert 0.0 < before["avg@2"] < 1.0  # the shipped base policy solves some, not all
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3] and all(r["num_prefix_tokens"] > 0 for r in rows)
  assert os.path.getsize(tmp_path / "curves.png") > 1000
