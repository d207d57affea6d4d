"""Where benchmarks.peers' forward+backward spends its time: XLA:CPU's trace of each executed op, trapo_jax (as
compiled on this backend, and in the [B, T, D] form of the projections that GPU and TPU get) against Tunix.

  python -m benchmarks.step_profile                        # in the Tunix venv (benchmarks/requirements-peers.txt)
  python -m benchmarks.step_profile --row=train_b64 --rounds=3 --top=12
  python -m benchmarks.step_profile --row=sample_b64 --rounds=3 --top=12   # the samplers' decode

Each side is compiled once; then, for --rounds rounds, one call of each side is traced in turn (jax.profiler, a
Perfetto trace), so that the machine's load hits the sides alike. XLA:CPU names each executed op (a thunk: a fusion, a
dot, a loop) in the trace as in the compiled HLO; the HLO's op_name metadata (`compiled.as_text()`) says what JAX
operation it came from, and `category` sorts it by pass (backward: the op name holds a `transpose(`), part of the
model (output head, attention, MLP, norms, embedding, else "other": the loops' own buffers and copies) and kind
(matmul, or element-wise and copies). Printed: each side's seconds per call and their ratio to Tunix's in the same
round (time, not speed: below 1 is faster), then milliseconds per call by category, summed over the thunks (threads
run some thunks side by side, so a total can exceed the call's time). docs/performance.md, "Against Tunix", has a
reading of one run.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time
import warnings

import numpy as np

from benchmarks import peers

_OP = re.compile(r"\n\s*(?:ROOT )?%([\w.\-]+) = (\S+) .*?op_name=\"([^\"]+)\"")
# Tunix's Qwen2 and trapo_jax's Decoder name their parts differently: the pattern of each part, first match wins.
_PARTS = (("head", r"bcd,dv|BTD,DV|log_softmax|logsumexp|jit\(loss_fn\)/(transpose\(jvp\(\)\)|jvp\(\))/while"),
          ("mlp", r"mlp|feed_forward"), ("attention", r"attn|attention"), ("norm", r"norm"), ("embed", r"embed"))


def hlo_ops(text: str) -> dict[str, tuple[str, str]]:
  """Compiled HLO text -> {instruction name: (shape, op_name)} for every instruction with op_name metadata."""
  return {m.group(1): (m.group(2), m.group(3)) for m in _OP.finditer(text)}


def category(thunk: str, op_name: str) -> str:
  """A thunk's name and its HLO op_name -> "<fwd|bwd> <part> <matmul|elementwise/copy>", or "loops" for a while
  loop's own control (its body's thunks are traced on their own)."""
  if thunk.startswith(("while", "call", "conditional")):
    return "loops"
  p = "bwd" if "transpose(" in op_name else "fwd"
  part = next((name for name, pat in _PARTS if re.search(pat, op_name)), "other")
  if part in ("mlp", "attention"):
    return f"{p} {part} " + ("matmul" if thunk.startswith("ynn") or "dot" in thunk else "elementwise/copy")
  return f"{p} {part}"


def _thunks(trace_dir: str) -> list[tuple[str, float]]:
  """(name, microseconds) of every op XLA:CPU executed in a trace, without the runtime's own spans."""
  (path,) = glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  return [(e["name"], e.get("dur", 0)) for e in events if e.get("ph") == "X"
          and not e["name"].startswith(("ThunkExecutor", "$", "SlinkyThreadPool", "Pjit"))]


def profile(sides: dict, rounds: int) -> dict:
  """{name: (run, lower)} -> {"seconds": {name: [per round]}, "ms": {name: {category: ms per call}},
  "top": {name: Counter((thunk, shape, op_name) -> ms per call)}}."""
  import jax  # pylint: disable=import-outside-toplevel
  ops = {name: hlo_ops(lower().compile().as_text()) if lower else {} for name, (_, lower) in sides.items()}
  seconds = collections.defaultdict(list)
  ms = collections.defaultdict(collections.Counter)
  top = collections.defaultdict(collections.Counter)
  for _ in range(rounds):
    for name, (run, _) in sides.items():
      with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        t = time.perf_counter()
        run()
        seconds[name].append(time.perf_counter() - t)
        jax.profiler.stop_trace()
        for thunk, us in _thunks(d):
          shape, op = ops[name].get(thunk, ("?", "?"))
          ms[name][category(thunk, op)] += us / 1e3 / rounds
          top[name][(thunk, shape, op)] += us / 1e3 / rounds
  return {"seconds": dict(seconds), "ms": dict(ms), "top": dict(top)}


def report(result: dict, top: int = 0) -> str:
  names = list(result["seconds"])
  ref = np.asarray(result["seconds"]["tunix"])
  lines = ["seconds per call (traced); time / Tunix's time in the same round: median [range]"]
  for n in names:
    v = np.asarray(result["seconds"][n])
    lines.append(f"  {n:16s} {np.median(v):6.2f} s  {np.median(v / ref):.3f} [{(v / ref).min():.3f}-"
                 f"{(v / ref).max():.3f}]")
  cats = sorted(set().union(*result["ms"].values()))
  lines += ["", "ms per call by category:", " " * 28 + "".join(f"{n:>18s}" for n in names)]
  lines += [f"  {c:26s}" + "".join(f"{result['ms'][n][c]:18.0f}" for n in names) for c in cats]
  lines.append(f"  {'total':26s}" + "".join(f"{sum(result['ms'][n].values()):18.0f}" for n in names))
  for n in names if top else ():
    lines += ["", f"{n}: the {top} longest ops, ms per call"]
    lines += [f"  {t:7.1f} {k:28s} {s:30s} {op[:100]}" for (k, s, op), t in result["top"][n].most_common(top)]
  return "\n".join(lines)


def main(argv) -> int:
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  from benchmarks import sampler_speed  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if not peers.tunix_available():
    print(peers.INSTALL_LINE)
    return 0
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  cfg, params = sampler_speed.model(f.preset, "float32")
  model = peers.tunix_model(cfg, params)
  row = peers.ROWS[f.row]
  if row.kind == "sample":  # the samplers: trapo_jax's decode program names its ops, Tunix's show as "other"
    ours, theirs = peers.sample_runs(cfg, params, model, peers.sample_prompts(cfg, row), row.new_tokens)
    sides = {"tunix": theirs, "trapo_jax": ours}
  else:
    batch = peers.train_batch(cfg, row)
    ours, theirs, _ = peers.train_runs(cfg, params, model, batch)
    # The same model traced for an accelerator ("gpu"): projections over [B, T, D] (trapo_jax/models/transformer.py,
    # _project), the program every backend ran before the CPU form.
    ours_btd, _, _ = peers.train_runs(cfg.replace(platform="gpu"), params, model, batch)
    sides = {"tunix": theirs, "trapo_jax": ours, "trapo_jax [B,T,D]": ours_btd}
  for run in sides.values():
    run()  # compiles
  print(report(profile({n: (r, r.lower) for n, r in sides.items()}, f.rounds), f.top))
  return 0


def define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from benchmarks import sampler_speed  # pylint: disable=import-outside-toplevel
  flags.DEFINE_enum("row", "train_b16", list(peers.ROWS), "Shapes (a sampling row profiles the two samplers).")
  flags.DEFINE_integer("rounds", 5, "Traced calls of each side, interleaved.")
  flags.DEFINE_integer("top", 0, "Also list each side's longest ops.")
  flags.DEFINE_enum("preset", "tiny10m", list(sampler_speed.PRESETS), "Model shapes (random-init weights).")


if __name__ == "__main__":
  if not peers.tunix_available():
    print(peers.INSTALL_LINE)
    sys.exit(0)
  from absl import app  # pylint: disable=import-outside-toplevel
  define_flags()
  app.run(main)
