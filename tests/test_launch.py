"""Launchers' dry runs and the sweep tool (expansion, commands, collection, table, plot)."""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers

ROOT = helpers.ROOT
sys.path.insert(0, os.path.join(ROOT, "launch"))
import sweep  # noqa: E402


def _sh(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=60)


def test_local_dry_run_multi_process():
  out = _sh("local.sh", "--dry_run", "--processes=3", "--devices=4", "--port=2222", "--", "--workdir=runs/x",
            "--config.trapo.alpha=0.3")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in line and "JAX_PLATFORMS=cpu" in line
    assert "python -m trapo_jax.main --workdir=runs/x --config.trapo.alpha=0.3" in line
    assert "--config.distributed.coordinator_address=localhost:2222" in line
    assert f"--config.distributed.num_processes=3 --config.distributed.process_id={i}" in line


def test_local_dry_run_single_process():
  out = _sh("local.sh", "--dry_run", "--devices=8", "--", "--config=experiments/configs/default.py",
            "--config.algo=grpo")
  assert out.stdout.strip().splitlines() == [
      "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m trapo_jax.main "
      "--config=experiments/configs/default.py --config.algo=grpo"]


def test_gpu_dry_runs():
  one = _sh("gpu.sh", "--dry_run", "--gpus=4", "--", "--workdir=/data/run")
  assert one.stdout.strip() == "CUDA_VISIBLE_DEVICES=0,1,2,3 python -m trapo_jax.main --workdir=/data/run"
  per = _sh("gpu.sh", "--dry_run", "--gpus=2", "--process_per_gpu", "--", "--workdir=/data/run").stdout.splitlines()
  assert [line.split()[0] for line in per] == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
  assert all(f"--config.distributed.process_id={i}" in line and "--config.distributed.num_processes=2" in line
             for i, line in enumerate(per))


TPU_ENV = dict(TPU_NAME="trapo-test", ZONE="us-east5-a", PROJECT="proj", ACCELERATOR_TYPE="v5p-32",
               WORKDIR="gs://bucket/run1", EXTRA_ARGS="--config.model.hf_dir=/mnt/qwen")


def test_tpu_pod_dry_run():
  out = _sh("tpu_pod.sh", "--dry_run", env=TPU_ENV)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith("gcloud compute tpus tpu-vm create trapo-test --zone=us-east5-a --project=proj "
                             "--accelerator-type=v5p-32 --version=v2-alpha-tpuv5")
  assert lines[1].startswith("git ls-files") and "--exclude-standard" in lines[1]  # no runs/, venvs, caches
  assert " scp /tmp/trapo_jax_src.tar.gz " in lines[2] and "--worker=all" in lines[2]
  assert "pip install -q -r requirements-tpu.txt" in lines[3]  # pinned: the same jax as CPU runs
  assert "--worker=all" in lines[4] and "--config.distributed.enabled=True" in lines[4]
  assert "--config=experiments/configs/trapo_qwen25_math_7b.py --workdir=gs://bucket/run1" in lines[4]
  assert "--config.model.hf_dir=/mnt/qwen" in lines[4]
  assert lines[-1].startswith("gcloud compute tpus tpu-vm delete trapo-test")
  v6e = _sh("tpu_pod.sh", "--dry_run", env=dict(TPU_ENV, ACCELERATOR_TYPE="v6e-16")).stdout
  assert "--version=v2-alpha-tpuv6e" in v6e


def _readme_blocks() -> list[str]:
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read().split("```")[1::2]


def test_readme_pod_commands_are_what_the_launcher_runs():
  """The README's TPU example and the commands it says the launcher runs: the launcher's own dry run."""
  blocks = _readme_blocks()
  example = next(b for b in blocks if "launch/tpu_pod.sh" in b and "TPU_NAME=" in b)
  example = shlex.split(example.replace("\\\n", " "))
  env = dict(a.split("=", 1) for a in example[:example.index("launch/tpu_pod.sh")])
  out = _sh("tpu_pod.sh", "--dry_run", env=env)
  assert out.returncode == 0, out.stderr
  printed = next(b for b in blocks if b.lstrip().startswith("gcloud compute tpus tpu-vm create"))
  assert out.stdout.strip().splitlines() == printed.strip().splitlines()


def test_tpu_pod_refuses_a_local_workdir():
  out = _sh("tpu_pod.sh", "--dry_run", env=dict(TPU_ENV, WORKDIR="/data/run1"))
  assert out.returncode == 2 and "must be a gs:// path" in out.stderr


def test_tpu_pod_names_a_missing_variable():
  env = {k: v for k, v in TPU_ENV.items() if k != "WORKDIR"}
  out = subprocess.run(["bash", os.path.join(ROOT, "launch", "tpu_pod.sh"), "--dry_run"], capture_output=True,
                       text=True, env={k: v for k, v in os.environ.items() if k != "WORKDIR"} | env, timeout=60)
  assert out.returncode != 0 and "WORKDIR is required" in out.stderr


def _write_sweep(tmp_path) -> str:
  path = tmp_path / "my_sweep.py"
  path.write_text("SEEDS = (0, 1)\nCOMMON = {'train.steps': 3}\n"
                  "def get_sweep():\n"
                  "  return [{'name': 'a b', 'trapo.alpha': 0.3}, {'config': 'experiments/configs/trapo_sft_prefix.py',"
                  " 'rollout.stages': (8,)}]\n")
  return str(path)


def test_the_help_examples_are_valid():
  from trapo_jax import config as config_lib
  keys = re.findall(r'\{"([a-z_.]+)": ', sweep.__doc__)
  assert keys
  for key in keys:  # a config key, as a sweep point names it
    node = config_lib.base_config()
    for part in key.split("."):
      assert part in node, key
      node = node[part]
  for file, redo in re.findall(r"--sweep=(\S+) --redo=(\S+)", sweep.__doc__):
    points, seeds, common = sweep.load_sweep(os.path.join(ROOT, file))
    sweep.select_redo(sweep.expand(points, seeds, "runs", common), redo.split(","))  # raises for an unknown name


def test_expand_and_commands(tmp_path):
  points, seeds, common = sweep.load_sweep(_write_sweep(tmp_path))
  runs = sweep.expand(points, seeds, "runs/s", common)
  # Seed by seed: a sweep stopped part way has a row for every point.
  assert [r.workdir for r in runs] == ["runs/s/a_b_seed0", "runs/s/rollout.stages=_8_seed0", "runs/s/a_b_seed1",
                                       "runs/s/rollout.stages=_8_seed1"]
  cmd = sweep.command(runs[2])
  assert cmd[1:] == ["-m", "trapo_jax.main", "--config=experiments/configs/default.py",
                     "--workdir=runs/s/a_b_seed1", "--config.train.steps=3", "--config.trapo.alpha=0.3",
                     "--config.seed=1"]
  assert "--config.rollout.stages=(8,)" in sweep.command(runs[1])
  printed = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"), f"--sweep={tmp_path}/my_sweep.py",
                            f"--root={tmp_path}/runs", "--print_only"], capture_output=True, text=True, cwd=ROOT,
                           timeout=60)
  assert printed.returncode == 0, printed.stderr
  assert len(printed.stdout.strip().splitlines()) == 4
  # Printed for another machine: `python`, not this venv's; started from elsewhere, paths as the repo root sees them.
  elsewhere = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"), "--sweep=my_sweep.py",
                              "--root=runs", "--print_only"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
  assert elsewhere.returncode == 0, elsewhere.stderr
  assert elsewhere.stdout.splitlines()[0] == (f"python -m trapo_jax.main --config=experiments/configs/default.py "
                                              f"--workdir={tmp_path}/runs/my_sweep/a_b_seed0 --config.train.steps=3 "
                                              f"--config.trapo.alpha=0.3 --config.seed=0")
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"), f"--sweep={tmp_path}/my_sweep.py",
                        f"--root={tmp_path}/runs", "--redo=a_b,typo"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
  assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("--redo: typo names no point")
  with pytest.raises(ValueError, match="two points are named 'x'"):
    sweep.expand([{"name": "x"}, {"name": "x"}], None, "r")


def _fake_run(workdir: str, acc: float, passk: float, levels: dict, reward: list[float]) -> None:
  os.makedirs(os.path.join(workdir, "eval", "after"))
  with open(os.path.join(workdir, "eval", "after", "results.json"), "w") as f:
    json.dump({"benchmarks": {"synthetic": {"problems": 10, "samples": 2, "avg@2": acc,
                                            "pass@k": {"1": acc, "2": passk}, "by_level": levels}}}, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i, r in enumerate(reward):
      f.write(json.dumps({"step": i + 1, "reward/mean": r, "expert_prob": 0.5, "hint_level_3": 0.25}) + "\n")


def test_collect_table_and_plot(tmp_path):
  points, seeds, common = sweep.load_sweep(_write_sweep(tmp_path))
  runs = sweep.expand(points, seeds, str(tmp_path / "runs"), common)
  accs = {"a_b_seed0": 0.2, "a_b_seed1": 0.5, "rollout.stages=_8_seed0": 0.4}  # the last run never finished
  for r in runs[:3]:
    a = accs[sweep.run_name(r)]
    _fake_run(r.workdir, a, a + 0.1, {"1": a, "4": a / 2}, [0.1, 0.2, a])
  assert sweep._finished(runs[0]) and not sweep._finished(runs[3])
  assert sweep._count_finished(runs) == "3 finished (of 4)" and sweep._count_finished(runs[:3]) == "3"
  points = sweep.collect(runs)
  md = sweep.write_results(points, str(tmp_path / "out"), str(tmp_path / "results.md"), header="# header\n")
  rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
  mean, std = 100 * np.mean([0.2, 0.5]), 100 * np.std([0.2, 0.5])
  assert f"| 2 | {mean:.1f} ± {std:.1f} |" in rows["a_b"]
  assert f"@2: {100 * np.mean([0.3, 0.6]):.1f} ± {100 * np.std([0.3, 0.6]):.1f}" in rows["a_b"]
  assert f"{100 * np.mean([0.1, 0.25]):.1f} ± {100 * np.std([0.1, 0.25]):.1f}" in rows["a_b"]  # level 4
  assert "| 1 | 40.0 |" in rows["rollout.stages=_8"]
  written = open(tmp_path / "results.md").read()
  assert written.startswith("# header\n") and "![curves](results_curves.png)" in written
  assert os.path.getsize(tmp_path / "results_curves.png") > 1000
  assert os.path.getsize(tmp_path / "out" / "curves.png") > 1000
  assert json.load(open(tmp_path / "out" / "results.json"))["a_b"]["runs"] == 2


class _FakeTrainer:
  """Stands in for subprocess in sweep.run_all: a run 'trains' by writing results.json with the next accuracy."""

  def __init__(self):
    self.ran, self.fail, self.acc = [], set(), 0.1

  def run(self, cmd, cwd):
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    self.ran.append(os.path.basename(workdir))
    if os.path.basename(workdir) in self.fail:
      return subprocess.CompletedProcess(cmd, 1)
    self.acc += 0.1
    _fake_run(workdir, self.acc, self.acc, {"1": self.acc}, [0.1])
    return subprocess.CompletedProcess(cmd, 0)


def test_sweep_resumes_over_sittings_and_redoes_on_request(tmp_path, monkeypatch, capsys):
  points, seeds, common = sweep.load_sweep(_write_sweep(tmp_path))
  runs = sweep.expand(points, seeds, str(tmp_path / "runs"), common)
  names = [sweep.run_name(r) for r in runs]
  fake = _FakeTrainer()
  monkeypatch.setattr(sweep, "subprocess", fake)
  fake.fail = {names[3]}
  assert sweep.run_all(runs) == [runs[3]] and fake.ran == names  # first sitting: one run fails
  fake.ran, fake.fail = [], set()
  capsys.readouterr()
  assert sweep.run_all(runs) == [] and fake.ran == [names[3]]  # second sitting: only the missing run
  out = capsys.readouterr().out
  assert f"skipped 3 of 4 runs, finished before (--redo=NAME,... runs them again): {', '.join(names[:3])}" in out
  assert "warning" not in out

  def acc(run):
    return json.load(open(os.path.join(run.workdir, "eval", "after", "results.json")))["benchmarks"]["synthetic"]["avg@2"]

  before = [acc(r) for r in runs]
  # A point name redoes all its seeds, a run name one run; the rest keep their results.
  redo = sweep.select_redo(runs, ["a_b", names[3]])
  assert redo == {runs[0].workdir, runs[2].workdir, runs[3].workdir}
  fake.ran = []
  assert sweep.run_all(runs, redo) == [] and fake.ran == [names[0], names[2], names[3]]
  after = [acc(r) for r in runs]
  assert after[1] == before[1] and all(after[i] > before[i] for i in (0, 2, 3))
  assert not glob.glob(str(tmp_path / "runs" / "*.replaced"))
  assert sweep.select_redo(runs, ["all"]) == {r.workdir for r in runs}
  with pytest.raises(ValueError, match="--redo: nope names no point or run of this sweep"):
    sweep.select_redo(runs, ["a_b", "nope"])
  # A redo that fails keeps the finished run it was replacing.
  fake.fail = {names[1]}
  assert sweep.run_all(runs, {runs[1].workdir}) == [runs[1]]
  assert acc(dataclasses.replace(runs[1], workdir=runs[1].workdir + ".replaced")) == before[1]
  assert f"the previous run is in {runs[1].workdir}.replaced" in capsys.readouterr().out
  # The table is rebuilt from every result present: the redone values, the failed redo missing.
  rows = {line.split(" | ")[0].strip("| "): line for line in sweep.table(sweep.collect(runs)).splitlines()}
  assert f"| 2 | {100 * np.mean(after[::2]):.1f} ± {100 * np.std(after[::2]):.1f} |" in rows["a_b"]
  assert f"| 1 | {100 * after[3]:.1f} |" in rows["rollout.stages=_8"]
  # A finished run made by another command than the sweep's now is skipped with a warning.
  changed = sweep.expand(points, seeds, str(tmp_path / "runs"), {"train.steps": 4})
  fake.ran, fake.fail = [], set()
  sweep.run_all(changed[::2])  # the two seeds of a_b
  assert fake.ran == [] and f"warning: {names[0]} was made by another command" in capsys.readouterr().out


def test_rewriting_a_report_keeps_its_hand_written_notes(tmp_path):
  path = str(tmp_path / "report.md")
  sweep.write_keeping_notes(path, "# table v1\n")
  with open(path, "a") as f:
    f.write(f"{sweep.NOTES_MARKER}\n## What this run found\nread by a person\n")
  sweep.write_keeping_notes(path, "# table v2\n")
  text = open(path).read()
  assert text.startswith("# table v2\n") and "v1" not in text
  assert text.endswith(f"{sweep.NOTES_MARKER}\n## What this run found\nread by a person\n")
  sweep.write_keeping_notes(str(tmp_path / "new.md"), "# fresh\n")
  assert open(tmp_path / "new.md").read() == "# fresh\n"


def test_header_quotes_the_sweep_docstring_without_running_the_file(tmp_path):
  path = tmp_path / "doc_sweep.py"
  path.write_text('"""Why this sweep exists."""\nraise RuntimeError("executed")\n')
  assert "Why this sweep exists." in sweep.header(str(path), [], {})


def test_header_command_leaves_out_the_flags_of_one_sitting(tmp_path, monkeypatch):
  path = tmp_path / "doc_sweep.py"
  path.write_text('"""Doc."""\n')
  monkeypatch.setattr(sys, "argv", ["launch/sweep.py", f"--sweep={path}", "--redo=a,b", "--collect_only",
                                    "--results_md=r.md"])
  assert f"Made by `python launch/sweep.py --sweep={path} --results_md=r.md` on" in sweep.header(str(path), [], {})


@pytest.mark.slow
def test_two_point_sweep_runs_end_to_end(tmp_path):
  env = helpers.cpu_env(1)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "sweep.py"),
                        "--sweep=experiments/sweeps/example_two_points.py", f"--root={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  table = open(tmp_path / "example_two_points" / "results.md").read()
  assert "| trapo | 1 |" in table and "| grpo | 1 |" in table
  for point in ("trapo", "grpo"):
    assert os.path.exists(tmp_path / "example_two_points" / point / "eval" / "after" / "results.json")


def _validated(config: str, overrides: dict) -> None:
  """Loads a config file, applies a run's overrides as its flags would, and validates the result."""
  from trapo_jax import config as config_lib
  cfg = sweep.load_module(os.path.join(ROOT, config)).get_config()
  cfg.update_from_flattened_dict(overrides)  # a wrong type raises here, an unknown leaf key in validate
  config_lib.validate(cfg)


@pytest.mark.parametrize("path", sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "sweeps", "*.py"))
                                        if not p.endswith("__init__.py")), ids=os.path.basename)
def test_every_shipped_sweep_names_real_config_keys(path):
  """A mistyped override would fail only when its run starts, maybe an hour into a sweep: catch it here."""
  points, seeds, common = sweep.load_sweep(path)
  for run in sweep.expand(points, seeds, "runs/s", common):
    _validated(run.config, dict(run.overrides))
    parsed = _parsed_flags(run)
    for key, value in run.overrides:  # the command line gives the run the value the sweep file wrote
      assert parsed[key] == (tuple(value) if isinstance(value, list) else value), (sweep.run_name(run), key)


def test_a_tuple_of_names_on_the_command_line_parses_back_to_the_tuple():
  """ml_collections reads a tuple flag as a Python literal: unquoted names made the whole text one string."""
  run = sweep.Run(point="p", seed=0, workdir="runs/p", config="experiments/configs/default.py",
                  overrides=(("eval.benchmarks", ("synthetic", "math500")), ("algo", "grpo")))
  parsed = _parsed_flags(run)
  assert parsed["eval.benchmarks"] == ("synthetic", "math500") and parsed["algo"] == "grpo"


def _parsed_flags(run) -> dict:
  """{key: value} of the run's overrides in the config its command line gives trapo_jax.main, as ml_collections
  parses its --config flags."""
  from absl import flags
  from ml_collections import config_flags
  args = sweep.command(run)[2:]  # [program name, --config=<file relative to the root>, ...]
  argv = [args[0], f"--config={os.path.join(ROOT, run.config)}", *args[2:]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)  # it reads its overrides from argv
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return {key: functools.reduce(getattr, key.split("."), fv.config) for key, _ in run.overrides}


def test_sweep_check_catches_a_mistyped_key():
  from trapo_jax.config import ConfigError
  with pytest.raises(ConfigError, match="train.stepz: unknown key"):
    _validated("experiments/configs/default.py", {"train.stepz": 3})
  with pytest.raises(TypeError, match="steps"):
    _validated("experiments/configs/default.py", {"train.steps": "many"})
