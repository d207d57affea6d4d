r"""Run a sweep: one training run per point (and seed), each in its own workdir, then one table and one plot.

  python launch/sweep.py --sweep=experiments/sweeps/paper_table.py              # run every point here, in turn
  python launch/sweep.py --sweep=experiments/sweeps/alpha.py --print_only       # the commands, for a cluster
  python launch/sweep.py --sweep=experiments/sweeps/paper_table.py --collect_only --results_md=docs/results.md
  python launch/sweep.py --sweep=experiments/sweeps/paper_table.py --redo=GRPO,TRAPO_seed1  # run these again

A sweep file defines `get_sweep() -> list[dict]`: each dict is a point with an optional "name", an optional
"config" (default experiments/configs/default.py) and config overrides ({"trapo.alpha": 0.3}). Optional module
values: SEEDS (each point runs once per seed, as --config.seed), COMMON (overrides for every point).
Runs start in the repository root, whatever the directory the sweep is started from: config and workdir paths are
relative to it (a --root outside it is absolute), and the --print_only commands are run from it.
A sweep can be completed over several sittings. Runs go seed by seed (every point's first seed, then every
point's second...), so a partial sweep already has a row for every point; a run whose workdir holds
eval/after/results.json is skipped (one line lists them), an interrupted one resumes from its latest checkpoint, and
the table and plot are always rebuilt from every result present. --redo=NAME,... (a point: all its seeds; or one
run, as TRAPO_seed1) or --redo=all runs finished ones again from scratch; the old workdir is kept beside it until the
new run succeeds.
A --results_md file that exists keeps what follows its NOTES_MARKER line (the hand-written reading of the table)
when the table is rewritten.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python launch/sweep.py`: the package is beside launch/
  sys.path.insert(0, ROOT)
from trapo_jax import paths  # pylint: disable=g-import-not-at-top,wrong-import-position
DEFAULT_CONFIG = "experiments/configs/default.py"

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (Python, get_sweep()).")
_ROOT = flags.DEFINE_string("root", "runs/sweeps", "Workdirs go to <root>/<sweep name>/<point>.")
_PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print one command per run and exit.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Same as --print_only.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False, "Only collect finished runs into the table and plot.")
_RESULTS_MD = flags.DEFINE_string("results_md", None, "Also write the table to this Markdown file.")
_REDO = flags.DEFINE_list("redo", [], "Run these finished runs again: point names (all seeds), run names "
                          "(<point>_seed<n>) or 'all'.")


@dataclasses.dataclass(frozen=True)
class Run:
  point: str
  seed: int | None
  config: str
  overrides: tuple[tuple[str, Any], ...]
  workdir: str


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "point"


def load_module(path: str):
  """A Python file (sweep or config) as a fresh module, as config_flags loads a --config file."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str) -> tuple[list[dict], list[int] | None, dict]:
  """(points, seeds or None, common overrides) of a sweep file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: sweep file not found")
  module = load_module(path)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path}: defines no get_sweep()")
  points = list(module.get_sweep())
  for i, p in enumerate(points):
    if not isinstance(p, dict):
      raise ValueError(f"{path}: point {i} is {type(p).__name__}, not a dict")
  seeds = getattr(module, "SEEDS", None)
  return points, (list(seeds) if seeds is not None else None), dict(getattr(module, "COMMON", {}))


def expand(points: Sequence[dict], seeds: Sequence[int] | None, root: str, common: dict | None = None) -> list[Run]:
  """One Run per point and seed, each with its own workdir under `root`, seed by seed.

  Every point's first seed comes before any point's second, so a sweep stopped part way (or completed over several
  sittings) already has a row for every point.
  """
  per_point, seen = [], set()
  for p in points:
    p = dict(p)
    config = p.pop("config", DEFAULT_CONFIG)
    name = p.pop("name", None)
    overrides = {**(common or {}), **p}
    if name is None:
      name = ",".join(f"{k}={v}" for k, v in p.items()) or os.path.splitext(os.path.basename(config))[0]
    name = _safe(str(name))
    if name in seen:
      raise ValueError(f"two points are named {name!r}")
    seen.add(name)
    per_point.append([])
    for seed in (seeds if seeds is not None else [None]):
      o = dict(overrides, **({"seed": seed} if seed is not None else {}))
      workdir = paths.join(root, name if seed is None else f"{name}_seed{seed}")
      per_point[-1].append(Run(point=name, seed=seed, config=config, overrides=tuple(o.items()), workdir=workdir))
  return [run for seed_runs in zip(*per_point) for run in seed_runs]


def _flag_value(v: Any, inside: bool = False) -> str:
  """v as ml_collections parses a --config.<key> flag back: a bare string, but quoted inside a tuple (the tuple is
  read as a Python literal, and an unquoted name in it would make the whole text one string)."""
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(_flag_value(x, True) for x in v) + ("," if len(v) == 1 else "") + ")"
  return repr(v) if inside and isinstance(v, str) else str(v)


def command(run: Run, python: str = sys.executable) -> list[str]:
  """The run's command line, to start in the repository root; `python` "python" for one printed for elsewhere."""
  return [python, "-m", "trapo_jax.main", f"--config={run.config}", f"--workdir={run.workdir}",
          *(f"--config.{k}={_flag_value(v)}" for k, v in run.overrides)]


_SECONDS_FILE = "sweep_run_seconds.txt"
_REPLACED_SUFFIX = ".replaced"  # a finished run's old workdir while --redo runs it again
_COMMAND_FILE = "sweep_command.txt"  # the arguments the sweep ran a workdir with


def _command_args(run: Run) -> str:
  """The run's command without the interpreter, which differs between machines."""
  return shlex.join(command(run)[1:])


def _recorded_command(run: Run) -> str | None:
  path = paths.join(run.workdir, _COMMAND_FILE)
  if not paths.exists(path):
    return None  # made before the sweep recorded commands, or by hand
  return paths.read_text(path).strip()


def _finished(run: Run) -> bool:
  return paths.exists(paths.join(run.workdir, "eval", "after", "results.json"))


def run_name(run: Run) -> str:
  return paths.basename(run.workdir)


def select_redo(runs: Sequence[Run], names: Sequence[str]) -> set[str]:
  """The workdirs of the runs `names` asks to redo: point names (every seed), run names, or "all"."""
  if "all" in names:
    return {r.workdir for r in runs}
  by_name = {}
  for r in runs:
    by_name.setdefault(r.point, []).append(r.workdir)
    by_name.setdefault(run_name(r), []).append(r.workdir)
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f"--redo: {', '.join(unknown)} names no point or run of this sweep "
                     f"(points: {', '.join(dict.fromkeys(r.point for r in runs))})")
  return {w for n in names for w in by_name[n]}


def run_all(runs: Sequence[Run], redo: set[str] = frozenset()) -> list[Run]:
  """Runs each run not finished before, and those in `redo` (workdirs) from scratch; returns the failed ones.

  A redone run's old workdir is moved to <workdir>.replaced and deleted only once the new run succeeded.
  """
  skipped = [r for r in runs if _finished(r) and r.workdir not in redo]
  if skipped:
    print(f"skipped {len(skipped)} of {len(runs)} runs, finished before (--redo=NAME,... runs them again): "
          f"{', '.join(run_name(r) for r in skipped)}", flush=True)
  for r in skipped:
    made_by = _recorded_command(r)
    if made_by is not None and made_by != _command_args(r):
      print(f"warning: {run_name(r)} was made by another command than the sweep's now ({made_by}); "
            f"--redo={run_name(r)} runs it again", flush=True)
  failed = []
  for i, r in enumerate(runs):
    if _finished(r) and r.workdir not in redo:
      continue
    replaced = r.workdir + _REPLACED_SUFFIX
    if r.workdir in redo and paths.exists(r.workdir):
      paths.rmtree(replaced)
      paths.move(r.workdir, replaced)
    print(f"[{i + 1}/{len(runs)}] {shlex.join(command(r))}", flush=True)
    paths.write(paths.join(r.workdir, _COMMAND_FILE), _command_args(r) + "\n")
    start = time.time()
    if subprocess.run(command(r), cwd=ROOT).returncode != 0:
      kept = f"; the previous run is in {replaced}" if paths.exists(replaced) else ""
      print(f"[{i + 1}/{len(runs)}] {r.workdir}: FAILED{kept}", flush=True)
      failed.append(r)
    else:
      seconds = time.time() - start
      paths.write(paths.join(r.workdir, _SECONDS_FILE), f"{seconds:.1f}\n")
      paths.rmtree(replaced)
      print(f"[{i + 1}/{len(runs)}] {r.workdir}: done in {seconds:.0f} s", flush=True)
  return failed


def _count_finished(runs: Sequence[Run]) -> str:
  """"12" when all 12 runs finished, "5 finished (of 12)" for a sweep still being completed."""
  done = sum(_finished(r) for r in runs)
  return str(done) if done == len(runs) else f"{done} finished (of {len(runs)})"


def run_seconds(runs: Sequence[Run]) -> float:
  """Total wall time of the finished runs, as recorded when the sweep ran them."""
  total = 0.0
  for r in runs:
    path = paths.join(r.workdir, _SECONDS_FILE)
    if paths.exists(path):
      total += float(paths.read_text(path))
  return total


def _read_metrics(workdir: str) -> list[dict]:
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def collect(runs: Sequence[Run]) -> dict[str, Any]:
  """Per point: accuracy (avg@n) of each benchmark, pass@k and accuracy by level, as mean/std over seeds."""
  points: dict[str, dict] = {}
  for r in runs:
    entry = points.setdefault(r.point, {"runs": 0, "missing": 0, "acc": {}, "passk": {}, "by_level": {},
                                        "before": {}, "curves": []})
    path = paths.join(r.workdir, "eval", "after", "results.json")
    if not paths.exists(path):
      entry["missing"] += 1
      continue
    entry["runs"] += 1
    res = json.loads(paths.read_text(path))
    for name, b in res["benchmarks"].items():
      entry["acc"].setdefault(name, []).append(b[f"avg@{b['samples']}"])
      for k, v in b.get("pass@k", {}).items():
        entry["passk"].setdefault(name, {}).setdefault(k, []).append(v)
      for lv, v in b.get("by_level", {}).items():
        entry["by_level"].setdefault(name, {}).setdefault(lv, []).append(v)
    before = paths.join(r.workdir, "eval", "before", "results.json")
    if paths.exists(before):
      for name, b in json.loads(paths.read_text(before))["benchmarks"].items():
        entry["before"].setdefault(name, []).append(b[f"avg@{b['samples']}"])
    entry["curves"].append(_read_metrics(r.workdir))
  return points


def _ms(xs: Sequence[float]) -> str:
  xs = 100 * np.asarray(xs, np.float64)
  return f"{xs.mean():.1f} ± {xs.std():.1f}" if len(xs) > 1 else f"{xs.mean():.1f}"


def table(points: dict[str, Any]) -> str:
  """Markdown: one row per point, mean ± std (population std over seeds) in %."""
  benches = sorted({b for p in points.values() for b in p["acc"]})
  levels = sorted({lv for p in points.values() for b in p["by_level"].values() for lv in b}, key=int)
  head = ["point", "seeds"] + [f"{b} avg@n" for b in benches] + [f"{b} pass@k (max k)" for b in benches]
  head += [f"level {lv}" for lv in levels]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, p in points.items():
    if not p["runs"]:
      lines.append(f"| {name} | 0 (missing {p['missing']}) |" + " |" * (len(head) - 2))
      continue
    cells = [name, str(p["runs"])]
    cells += [_ms(p["acc"][b]) if b in p["acc"] else "-" for b in benches]
    for b in benches:
      ks = sorted(p["passk"].get(b, {}), key=int)
      cells.append(f"@{ks[-1]}: {_ms(p['passk'][b][ks[-1]])}" if ks else "-")
    merged = {lv: xs for b in p["by_level"].values() for lv, xs in b.items()}
    cells += [_ms(merged[lv]) if lv in merged else "-" for lv in levels]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# The first stage's rollouts are unguided for every method and prompt: guided and full-demo samples, or later-stage
# rollouts of prompts already solved, would make the reward incomparable across methods.
CURVE_KEYS = (("reward/stage_1", "reward of the unguided first-stage rollouts"), ("expert_prob", "expert-token probability"),
              ("hint_level_3", "prompts given the full demo"), ("hint_level_0", "prompts with no hint"))


def _curve_value(row: dict, key: str) -> float:
  if key.startswith("expert_") and row.get("num_prefix_tokens", 1) == 0:
    return np.nan  # no expert tokens in that step: undefined (logs before the trainer said so hold 0)
  return row.get(key, np.nan)


def plot(points: dict[str, Any], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4.2 * len(CURVE_KEYS), 3.4))
  colors = plt.get_cmap("tab20").colors
  handles = {}
  for ax, (key, title) in zip(axes, CURVE_KEYS):
    for i, (name, p) in enumerate(points.items()):
      series = [[_curve_value(r, key) for r in rows] for rows in p["curves"] if rows]
      if not series or all(np.all(np.isnan(np.asarray(s, float))) for s in series):
        continue  # a method without this quantity (no expert tokens, no hint levels) draws nothing
      n = min(len(s) for s in series)
      with np.errstate(all="ignore"):
        mean = np.nanmean(np.asarray([s[:n] for s in series], float), axis=0)
      handles[name], = ax.plot(np.arange(1, n + 1), mean, color=colors[i % len(colors)], label=name)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
  if handles:
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)), fontsize=7)
  fig.tight_layout(rect=(0, 0.12, 1, 1))
  with paths.writing(path) as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def header(sweep_path: str, runs: Sequence[Run], common: dict) -> str:
  """What a reader needs to reproduce the table: command, machine, time, and the fixed task/model/budget."""
  import platform
  import jax
  with open(sweep_path) as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""  # read, not run: load_sweep already ran the file
  # How the table is reproduced in one sitting: without the flags that only steered this sitting.
  cmd = "python launch/sweep.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]
                                             if a != "--collect_only" and not a.startswith("--redo"))
  lines = [
      f"# Sweep `{sweep_path}`", "",
      f"Made by `{cmd}` on {time.strftime('%Y-%m-%d')}, {platform.machine()} with {os.cpu_count()} CPU cores "
      f"(jax {jax.__version__}, backend {jax.default_backend()}).",
      f"Training + evaluation wall time of the {_count_finished(runs)} runs: {run_seconds(runs) / 60:.1f} min "
      "(one after another).",
      "", doc.strip(), "",
      f"Overrides for every point: `{common}`. Points:", "",
  ]
  seen = set()
  for r in runs:
    if r.point not in seen:
      seen.add(r.point)
      extra = {k: v for k, v in r.overrides if k not in common and k != "seed"}
      lines.append(f"- {r.point}: `{r.config}`" + (f" with `{extra}`" if extra else ""))
  lines += ["", "Held-out accuracy after training, % (mean ± std over seeds; avg@n = mean over n samples per problem):",
            ""]
  return "\n".join(lines) + "\n"


# A report regenerated by a command keeps what a person wrote below this line.
NOTES_MARKER = "<!-- Written by hand below this line; kept when the command rewrites this file. -->"


def write_keeping_notes(path: str, generated: str) -> None:
  """Writes `generated` to path, followed by the hand-written part of the file already there (if any)."""
  notes = ""
  if paths.exists(path):
    old = paths.read_text(path)
    if NOTES_MARKER in old:
      notes = "\n" + NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]
  paths.write(path, generated + notes)


def write_results(points: dict[str, Any], out_dir: str, results_md: str | None = None, header: str = "") -> str:
  """Writes results.md/json and curves.png into out_dir; with results_md, also that file and its curves beside it."""
  md = header + table(points)
  paths.write(paths.join(out_dir, "results.md"), md)
  paths.write(paths.join(out_dir, "results.json"), json.dumps(
      {k: {kk: vv for kk, vv in v.items() if kk != "curves"} for k, v in points.items()}, indent=2))
  plot(points, paths.join(out_dir, "curves.png"))
  if results_md:
    curves = os.path.splitext(results_md)[0] + "_curves.png"
    plot(points, curves)
    write_keeping_notes(results_md, md + f"\nTraining curves (mean over seeds): ![curves]({os.path.basename(curves)})\n")
  return md


def _from_root(path: str) -> str:
  """A path given relative to the current directory, as the repository root sees it: relative to the root inside it,
  absolute outside it."""
  path = os.path.abspath(path)
  inside = os.path.commonpath([path, ROOT]) == ROOT
  return os.path.relpath(path, ROOT) if inside else path


def main(argv):
  del argv
  if not _SWEEP.value:
    raise app.UsageError("--sweep is required")
  name = os.path.splitext(os.path.basename(_SWEEP.value))[0]
  # Local paths as the repository root sees them (the runs start there); a gs:// root is the same from anywhere.
  local = lambda p: p if not p or paths.is_remote(p) else _from_root(p)
  sweep_file, out_dir = local(_SWEEP.value), local(paths.join(_ROOT.value, name))
  results_md = local(_RESULTS_MD.value)
  os.chdir(ROOT)  # where the runs start: every path below is relative to it
  points, seeds, common = load_sweep(sweep_file)
  runs = expand(points, seeds, out_dir, common)
  if _PRINT_ONLY.value or _DRY_RUN.value:
    for r in runs:
      print(shlex.join(command(r, python="python")))
    return
  try:
    redo = select_redo(runs, _REDO.value)
  except ValueError as e:
    sys.exit(str(e))
  failed = [] if _COLLECT_ONLY.value else run_all(runs, redo)
  md = write_results(collect(runs), out_dir, results_md, header=header(sweep_file, runs, common))
  print(md)
  if failed:
    sys.exit(f"{len(failed)} of {len(runs)} runs failed: {', '.join(r.workdir for r in failed)}")


if __name__ == "__main__":
  app.run(main)
