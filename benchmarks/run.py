"""One command for the performance figures, each measured against its baseline in the same run.

  python -m benchmarks.run --suite=cpu --doc=docs/performance.md [--out=benchmarks/results_cpu.json]
  python -m benchmarks.run --suite=gpu                      # on a GPU: adds roofline fraction and train-step MFU
  python -m benchmarks.run --suite=tpu_aot --doc=docs/performance.md   # libtpu, no TPU: the 7B run per TPU slice

Fields (null with a reason where a figure needs hardware this machine lacks):
  sampler: decode tokens/s of the in-graph sampler vs transformers generate (same weights, batch, lengths, greedy)
  sampler_logprob_gap: sampler log-probs against the trainer's recomputation of the same tokens, fp32 and bf16
  peers: trapo_jax against Tunix 0.1.7 (benchmarks/peers.py) on the same weights: sampling and forward+backward, the
    rows of its table (CPU: tiny10m, GPU: Qwen2-0.5B shapes, both float32); skipped with one line where Tunix is not
    installed (an optional requirements file, benchmarks/requirements-peers.txt)
  sampler_roofline: GPU only, tokens/s over the HBM bound (params + live KV cache bytes per step / copy bandwidth)
  train_mfu: GPU only, Qwen2-0.5B shapes at 4096 tokens: 6 N T + attention FLOPs over the measured bf16 matmul peak
  loss_memory: temporaries of the chunked log-prob kernel vs log_softmax-and-gather (7B head, T = 8192)
  compilations: compilations per step over a 10-step training run of the default task (with a cold cache)
  step_time_split: sampling / grading / update seconds of those steps
  compile_28_layers: seconds to compile the 7B train step (28 layers, scanned) for 8 simulated CPU devices
  tpu_aot: every program of each shipped 7B/8B config (TPU_RUNS: config@slice, --tpu_runs to pick) compiled on
    libtpu's compile-only devices (--mode=compile, trapo_jax/aot.py): fits or not, per-chip memory, compile time, and
    XLA's cost-model estimate of one layer's steps against the chip's published peak

--doc rewrites the generated part of the file: the CPU or GPU section (this run's, else the stored
benchmarks/results_cpu.json) and the TPU section (this run's, else benchmarks/results_tpu_aot.json).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_SUITE = flags.DEFINE_enum("suite", "cpu", ["cpu", "gpu", "tpu_aot"], "Which figures to measure.")
_OUT = flags.DEFINE_string("out", None, "JSON output (default benchmarks/results_<suite>.json).")
_DOC = flags.DEFINE_string("doc", None, "Also write the table, machine, date and command to this Markdown file "
                           "(keeping its hand-written part below launch.sweep.NOTES_MARKER).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each shipped 7B/8B config on the slice its docstring names (at full depth, every program it runs), then the
# README's run on the other slices it mentions.
TPU_RUNS = (("trapo_qwen25_math_7b", "v5p-32"), ("trapo_llama31_8b", "v5p-32"), ("trapo_qwen3_8b", "v5p-32"),
            ("hpt_qwen25_math_7b", "v5p-32"), ("relift_qwen25_math_7b", "v5p-32"), ("srft_qwen25_math_7b", "v5p-32"),
            ("chord_mu_qwen25_math_7b", "v5p-32"), ("chord_phi_qwen25_math_7b", "v5p-32"),
            ("prefix_rft_qwen25_math_7b", "v5p-64"), ("uft_qwen25_math_7b", "v5p-128"),
            ("trapo_qwen25_math_7b", "v6e-16"), ("trapo_qwen25_math_7b", "v6e-64"),
            ("trapo_qwen25_math_7b", "v5litepod-64"))
_TPU_RUNS = flags.DEFINE_list("tpu_runs", [f"{c}@{s}" for c, s in TPU_RUNS],
                              "--suite=tpu_aot: which config@slice to compile (the others keep their stored "
                              "figures, each with its date).")


def _timed(fn, repeats: int = 5) -> float:
  """Best-of-`repeats` seconds of fn() after one warm-up call."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def copy_bandwidth() -> float:
  """Measured device-memory copy bandwidth, bytes/s (read + write)."""
  x = jnp.ones((256 * 2**20,), jnp.float32)  # 1 GiB
  f = jax.jit(lambda a: a * 1.0001)
  return 2 * x.nbytes / _timed(lambda: f(x))


def matmul_peak() -> float:
  """Measured bf16 matmul FLOP/s on the default device."""
  n = 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  return 2 * n ** 3 / _timed(lambda: f(a, a))


def sampler_figures(gpu: bool) -> dict:
  from benchmarks import sampler_speed
  if gpu:
    r = sampler_speed.measure("qwen2_0p5b", batch=64, prompt_len=128, new_tokens=256, repeats=3, dtype="bfloat16")
  else:
    r = sampler_speed.measure("tiny10m", batch=16, prompt_len=32, new_tokens=128, repeats=5)
  return r


def peers_figures(gpu: bool) -> dict:
  """benchmarks.peers' rows (each checked equal on both sides before it is timed), or a reason where Tunix is not
  installed (one line printed)."""
  from benchmarks import peers
  if not peers.tunix_available():
    print(peers.INSTALL_LINE, flush=True)
    return {"value": None, "reason": "Tunix is not installed (an optional benchmark dependency: pip install -r "
                                     "benchmarks/requirements-peers.txt in a venv of its own)"}
  return peers.measure(list(peers.ROWS.values()), preset="qwen2_0p5b" if gpu else "tiny10m", dtype="float32")


def roofline_figure(sampler: dict) -> dict:
  from benchmarks import sampler_speed
  from trapo_jax.models import transformer as tfm
  cfg = tfm.ModelConfig(**sampler_speed.PRESETS[sampler["preset"]], dtype="bfloat16", param_dtype="bfloat16")
  bytes_per_el = 2
  params = cfg.num_params * bytes_per_el
  # Mean live KV cache over the decode: prompt + half the new tokens, every layer, K and V.
  live = sampler["prompt_len"] + sampler["new_tokens"] / 2
  kv = 2 * cfg.num_layers * sampler["batch"] * live * cfg.num_kv_heads * cfg.head_dim * bytes_per_el
  bw = copy_bandwidth()
  bound = sampler["batch"] * bw / (params + kv)  # tokens/s if every step only read params + cache at full bandwidth
  return {"copy_bandwidth_gbs": bw / 1e9, "bound_tokens_per_s": bound,
          "fraction": sampler["jax_tokens_per_s"] / bound}


def mfu_figure() -> dict:
  """Train step of a Qwen2-0.5B-shaped model at sequence length 4096 on one device, against the bf16 peak."""
  import flax.linen as nn
  import optax
  from trapo_jax import losses
  from trapo_jax.models import transformer as tfm
  from benchmarks import sampler_speed
  cfg = tfm.ModelConfig(**sampler_speed.PRESETS["qwen2_0p5b"], dtype="bfloat16", param_dtype="float32", remat="dots")
  b, t = 4, 4096
  params = nn.unbox(jax.jit(lambda: tfm.init_params(cfg, jax.random.key(0)))())
  tx = optax.adamw(1e-6)
  opt = tx.init(params)
  tokens = jnp.ones((b, t), jnp.int32)
  mask = jnp.ones((b, t), bool)

  @jax.jit
  def step(p, o):
    def loss(p):
      h = tfm.forward(p, cfg, tokens, mask)
      logp, ent = losses.token_logprobs(h, tfm.unembed(p, cfg), tokens, chunk_size=1024)
      return -jnp.mean(logp) - 0.001 * jnp.mean(ent)
    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  seconds = _timed(lambda: step(params, opt)[0], repeats=3)
  n = cfg.num_params
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * t * t / 2  # causal: fwd 2x(QK, PV) halved, x3 bwd
  flops = (6 * n * b * t + attn * b)
  peak = matmul_peak()
  return {"seconds_per_step": seconds, "model_tflops": flops / seconds / 1e12, "peak_tflops": peak / 1e12,
          "mfu": flops / seconds / peak, "batch": b, "seq": t}


def logprob_gap() -> dict:
  """Max |sampler log-prob - trainer recomputation| over generated tokens, fp32 and bf16 compute (tiny10m)."""
  from benchmarks import sampler_speed
  from trapo_jax.sampling.sampler import Sampler
  from trapo_jax.train import step as step_lib
  out = {}
  for dtype in ("float32", "bfloat16"):
    cfg, params = sampler_speed.model("tiny10m", "float32")
    cfg = cfg.replace(dtype=dtype)
    b, p, new = 8, 16, 64
    prompts = np.random.default_rng(1).integers(1, cfg.vocab_size, (b, p)).astype(np.int32)
    r = Sampler(cfg).sample(params, prompts, np.full((b,), p), max_len=new, rng=jax.random.key(0), temperature=1.0)
    seq = np.concatenate([prompts, np.asarray(r.tokens)], 1)
    mb = dict(seq_tokens=jnp.asarray(seq), seq_mask=jnp.ones(seq.shape, bool), resp_start=jnp.full((b,), p),
              resp_tokens=jnp.asarray(r.tokens))
    logp, _ = jax.jit(lambda prm, m: step_lib.response_logprobs(prm, cfg, m, 64))(params, mb)
    gap = np.abs(np.asarray(logp) - np.asarray(r.logprobs))[np.asarray(r.response_mask)]
    out[dtype] = {"max_abs": float(gap.max()), "mean_abs": float(gap.mean())}
  return out


def training_figures() -> dict:
  """Compilations per step and the step time split over 10 steps of the default task, with a cold cache."""
  with tempfile.TemporaryDirectory() as workdir:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "cold_cache"))
    code = ("import jax, sys, json, collections\n"
            "from absl import flags\n"
            "counts = collections.Counter()\n"
            "jax.monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: counts.update("
            "[name]) if name.endswith('backend_compile_duration') else None)\n"
            "from trapo_jax.train import trainer\n"
            "from experiments.configs import default\n"
            "cfg = default.get_config(); cfg.train.steps = 10; cfg.eval.at_start = False; cfg.eval.at_end = False\n"
            "per_step = []\n"
            "real = trainer.train_one_step\n"
            "def counted(*a, **k):\n"
            "  before = counts['/jax/core/compile/backend_compile_duration']\n"
            "  out = real(*a, **k)\n"
            "  per_step.append(counts['/jax/core/compile/backend_compile_duration'] - before)\n"
            "  return out\n"
            "trainer.train_one_step = counted\n"
            f"trainer.run(cfg, {workdir!r})\n"
            "print('RESULT', json.dumps(per_step))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    if out.returncode:
      raise RuntimeError(out.stderr[-3000:])
    per_step = json.loads(out.stdout.split("RESULT", 1)[1])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  later = rows[1:]
  split = {k: float(np.mean([r[f"time/{k}"] for r in later])) for k in ("sampling", "grading", "update", "step")}
  return {"compilations_per_step": per_step, "compilations_after_step_3": int(sum(per_step[3:])),
          "step_time_split_s": split}


def tpu_aot_figures(runs: list[str], stored: dict, save) -> dict:
  """Each config@slice of `runs` (experiments/configs/<config>.py) compiled at full depth; the figures of `stored`
  for the others. save(figures) is called after each, so that an interrupted suite keeps what it compiled."""
  import importlib
  from trapo_jax import aot
  out = dict(stored)
  for run in runs:
    config, name = run.split("@")
    print(f"{run} ...", flush=True)
    cfg = importlib.import_module(f"experiments.configs.{config}").get_config()
    try:
      rep = aot.compile_run(cfg, name, estimate=config == "trapo_qwen25_math_7b")  # each estimate: 2 compiles
    except Exception as err:  # noqa: BLE001  one slice's failure must not lose the others
      out[run] = {"config": config, "slice": name, "date": datetime.date.today().isoformat(),
                  "error": str(err).splitlines()[0] if str(err) else type(err).__name__}
      continue
    tgt = rep.target
    gib = lambda x: None if x is None else x / aot.GiB
    out[run] = {
        "config": config, "slice": name, "date": datetime.date.today().isoformat(),
        "chip": tgt.chip.name, "chips": len(tgt.devices), "hbm_gib": gib(tgt.hbm_bytes), "headline": rep.headline,
        "programs": [{"name": r.program.name, "layout": r.program.layout, "fits": r.fits(tgt.hbm_bytes),
                      "params_gib": gib(r.params), "opt_state_gib": gib(r.opt_state),
                      "kv_cache_gib": gib(r.program.kv_bytes), "temp_gib": gib(r.temp), "total_gib": gib(r.total),
                      "compile_s": r.seconds, "error": r.error, "fixes": list(r.program.fixes)}
                     for r in rep.results],
        "estimates": rep.estimates, "verdict": aot.verdict(rep.results, tgt)}
    save(_in_suite_order(out))
  return _in_suite_order(out)


def _in_suite_order(runs: dict) -> dict:
  """Runs as TPU_RUNS lists them (each config on its own slice, then the README's run on others), others after."""
  order = {f"{c}@{s}": i for i, (c, s) in enumerate(TPU_RUNS)}
  return dict(sorted(runs.items(), key=lambda kv: order.get(kv[0], len(order))))


def main(argv):
  del argv
  suite = _SUITE.value
  gpu = suite == "gpu"
  if suite == "tpu_aot":
    from trapo_jax import aot
    aot.prepare("v5p-32")  # before JAX starts a backend: any TPU type
  if gpu and jax.default_backend() != "gpu":
    raise app.UsageError(f"--suite=gpu needs a GPU backend, found {jax.default_backend()}")
  result: dict = {"suite": suite, "date": datetime.date.today().isoformat(), "backend": jax.default_backend(),
                  "devices": [str(d) for d in jax.devices()], "machine": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__,
                  "command": "python -m benchmarks.run " + " ".join(sys.argv[1:])}
  path = _OUT.value or os.path.join(ROOT, "benchmarks", f"results_{suite}.json")

  def save(figures=None):
    if figures is not None:
      result["tpu_aot"] = figures
    with open(path, "w") as f:
      json.dump(result, f, indent=2)

  if suite == "tpu_aot":
    import importlib.metadata
    result["libtpu"] = importlib.metadata.version("libtpu")
    stored = {k: v for k, v in ((_stored("tpu_aot") or {}).get("tpu_aot") or {}).items() if "@" in k}
    result["tpu_aot"] = tpu_aot_figures(_TPU_RUNS.value, stored, save)
  else:
    measure(result, gpu)
  save()
  md = tpu_table(result) if suite == "tpu_aot" else table(result)
  print("\n" + md + f"\nwrote {path}")
  if _DOC.value:
    from launch.sweep import write_keeping_notes
    write_keeping_notes(_DOC.value, document(result))
    print(f"wrote {_DOC.value}")


def measure(result: dict, gpu: bool) -> None:
  """The CPU or GPU figures, into `result`."""
  no_gpu = "needs a GPU (run --suite=gpu on one)"
  print("sampler ...", flush=True)
  result["sampler"] = sampler_figures(gpu)
  result["sampler_roofline"] = roofline_figure(result["sampler"]) if gpu else {"value": None, "reason": no_gpu}
  print("against Tunix ...", flush=True)
  result["peers"] = peers_figures(gpu)
  print("train-step MFU ...", flush=True)
  result["train_mfu"] = mfu_figure() if gpu else {"value": None, "reason": no_gpu}
  print("sampling per TRAPO step ...", flush=True)
  from benchmarks import sampler_speed
  result["trapo_step_sampling"] = sampler_speed.trapo_step_sampling(steps=5, batch_prompts=8)
  print("log-prob gap ...", flush=True)
  result["sampler_logprob_gap"] = logprob_gap()
  print("loss memory ...", flush=True)
  from benchmarks import loss_memory
  result["loss_memory"] = {d: loss_memory.measure(dtype=getattr(jnp, d)) for d in ("float32", "bfloat16")}
  print("10-step training run ...", flush=True)
  result.update(training_figures())
  print("28-layer compile ...", flush=True)
  code = ("from trapo_jax import aot; from experiments.configs import trapo_qwen25_math_7b as e;"
          "r = aot.compile_run(e.get_config(), 'cpu:8', programs=('train',), estimate=False, log=lambda s: None);"
          "print('RESULT', r.results[0].seconds)")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR="")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  result["compile_28_layers_s"] = float(out.stdout.split("RESULT")[1]) if out.returncode == 0 else None


def _fmt(x, spec: str, unit: str = "") -> str:
  return "n/a" if x is None else f"{x:{spec}}{unit}"


def table(result: dict) -> str:
  """The figures of one run as a Markdown table: each against the baseline measured in the same run."""
  s, lm, g = result["sampler"], result["loss_memory"], result["sampler_logprob_gap"]
  rows = ["| figure | value | baseline (same run) | ratio |", "|---|---|---|---|",
          f"| sampler decode tokens/s ({s['preset']}, {s['params_m']:.0f}M params, batch {s['batch']}, "
          f"{s['new_tokens']} new, greedy, {s['dtype']}) | {s['jax_tokens_per_s']:.0f} | "
          f"{_fmt(s['torch_tokens_per_s'], '.0f')} (transformers generate) | {_fmt(s['ratio'], '.2f', 'x')}"
          + (" (median of {}; {:.2f}-{:.2f})".format(s["repeats"], *s["ratio_range"]) if s.get("ratio_range") else "")
          + " |"]
  if result["suite"] == "gpu":
    r, m = result["sampler_roofline"], result["train_mfu"]
    rows.append(f"| sampler vs HBM roofline | {s['jax_tokens_per_s']:.0f} | {r['bound_tokens_per_s']:.0f} "
                f"(params + live KV at {r['copy_bandwidth_gbs']:.0f} GB/s) | {100 * r['fraction']:.0f}% |")
    rows.append(f"| train step, 0.5B shapes, 4x4096 tokens | {m['model_tflops']:.0f} TFLOP/s | "
                f"{m['peak_tflops']:.0f} TFLOP/s (bf16 matmul peak) | MFU {100 * m['mfu']:.0f}% |")
  rows += peer_rows(result.get("peers"))
  t = result.get("trapo_step_sampling")
  if t:  # runs before this figure existed lack it
    one, seq, grpo = t["one_pass"], t["stages"], t["grpo"]
    rows.append(f"| sampling per TRAPO step, default task, {t['batch_prompts']} prompts (decode passes, s) | one pass: "
                f"{one['decode_passes']:.0f}, {one['sampling_s']:.2f} s ({one['rows_sampled']:.0f} rows for "
                f"{one['rows_used']:.0f}) | stage by stage: {seq['decode_passes']:.1f}, {seq['sampling_s']:.2f} s; "
                f"GRPO: {grpo['decode_passes']:.0f}, {grpo['sampling_s']:.2f} s | {t['one_pass_over_stages']:.2f}x "
                f"stages, {t['one_pass_over_grpo']:.2f}x GRPO |")
  rows.append(f"| sampler vs trainer log-probs, max abs | fp32 {g['float32']['max_abs']:.1e} | "
              f"bf16 {g['bfloat16']['max_abs']:.1e} | - |")
  for d in ("float32", "bfloat16"):
    rows.append(f"| loss kernel temporaries, {d} (7B head, T=8192) | {lm[d]['chunked_temp_gib']:.2f} GiB | "
                f"{lm[d]['naive_temp_gib']:.2f} GiB (log_softmax + gather) | {lm[d]['ratio']:.3f} |")
  rows.append(f"| compilations per step, 10 training steps, cold cache | {result['compilations_per_step']} | - | "
              f"{result['compilations_after_step_3']} after step 3 |")
  sp = result["step_time_split_s"]
  rows.append(f"| training step split, default task (s) | sampling {sp['sampling']:.2f}, grading "
              f"{sp['grading']:.2f}, update {sp['update']:.2f} | step {sp['step']:.2f} | - |")
  rows.append(f"| 7B train step compile, 28 layers, 8 simulated CPU devices | "
              f"{_fmt(result['compile_28_layers_s'], '.1f', ' s')} | 120 s (target) | - |")
  return "\n".join(rows) + "\n"


def peer_rows(peers: dict | None) -> list[str]:
  """The rows against Tunix (benchmarks/peers.py): none where they were not measured (an older run, or no Tunix)."""
  if not peers or peers.get("value", 0) is None:
    return []
  m, out = peers["model"], []
  for r in peers["rows"]:
    what = f"{r['label']} ({m['preset']}, {m['params_m']:.0f}M params, {m['dtype']})"
    if "error" in r:
      out.append(f"| {what} | not timed: {r['error']} | Tunix {peers['tunix']} | - |")
      continue
    unit = (lambda side: f"{r[side + '_per_s']:.0f} tok/s") if r["kind"] == "sample" else \
        (lambda side: f"{r[side + '_s']:.2f} s")
    out.append(f"| {what} | {unit('ours')} | {unit('theirs')} (Tunix {peers['tunix']}) | {r['ratio']:.2f}x "
               f"(median of {r['pairs']} pairs; {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) |")
  return out


def _stored(suite: str) -> dict | None:
  path = os.path.join(ROOT, "benchmarks", f"results_{suite}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _command(result: dict) -> str:
  return result.get("command") or f"python -m benchmarks.run --suite={result['suite']} --doc=docs/performance.md"


def document(latest: dict) -> str:
  """The generated part of docs/performance.md: the CPU (or GPU) section and the TPU section, each from its latest
  run: this one, or its stored JSON."""
  runs = {s: r for s in ("cpu", "gpu", "tpu_aot") if (r := _stored(s))}
  runs[latest["suite"]] = latest
  host = latest if latest["suite"] in ("cpu", "gpu") else runs.get("cpu") or runs.get("gpu")
  out = "# Performance\n\n"
  if host:
    out += host_section(host)
  if "tpu_aot" in runs:
    out += "\n" + tpu_section(runs["tpu_aot"])
  return out


def host_section(result: dict) -> str:
  skipped: dict[str, list[str]] = {}  # reason -> the figures it kept from being measured
  for k, v in result.items():
    if isinstance(v, dict) and v.get("value", 0) is None:
      skipped.setdefault(v.get("reason", ""), []).append(k)
  notes = "".join(
      f"\nNot measured here ({', '.join(keys)}): they need a GPU; run `python -m benchmarks.run --suite=gpu` on "
      "one.\n" if "GPU" in reason else f"\nNot measured here ({', '.join(keys)}): {reason}.\n"
      for reason, keys in skipped.items())
  return (f"Made by `{_command(result)}` on {result['date']}: {result['machine']}, {result['cpu_count']} CPU "
          f"cores, jax {result['jax']}, backend {result['backend']} ({len(result['devices'])} devices). "
          f"Raw figures: `benchmarks/results_{result['suite']}.json`.\n\n" + table(result) + notes)


def tpu_table(result: dict) -> str:
  """One row per config, slice and program: fits, per-chip memory against HBM, compile time; then XLA's
  estimates."""
  def gib(x):
    return "-" if x is None else f"{x:.1f}"

  runs = result["tpu_aot"]
  rows = ["| config | slice | program | shapes | fits | per chip, GiB: params / optimizer / KV cache / temporaries | "
          "total / HBM | compile |", "|---|---|---|---|---|---|---|---|"]
  for t in runs.values():
    if "error" in t:
      rows.append(f"| {t['config']} | {t['slice']} | not compiled: {t['error']} | | | | | |")
      continue
    for p in t["programs"]:
      fits = "?" if p["fits"] is None else ("yes" if p["fits"] else "**no**")
      total = gib(p["total_gib"]) if p["total_gib"] is not None else f"> {t['hbm_gib']:.0f}"
      rows.append(f"| {t['config']} | {t['slice']} ({t['chips']} chips) | {p['name']} | {p['layout']} | {fits} | "
                  f"{gib(p['params_gib'])} / {gib(p['opt_state_gib'])} / "
                  f"{gib(p['kv_cache_gib']) if p['kv_cache_gib'] else '-'} / {gib(p['temp_gib'])} | {total} / "
                  f"{t['hbm_gib']:.0f} | {p['compile_s']:.0f} s |")
  est = ["", "XLA's cost model for one decoder layer, per chip: an estimate of the compiler, not a measurement. The "
         "train step is one layer's forward and backward (full remat) on one micro-batch of the first phase, its "
         "attention blocks unrolled because XLA counts a loop body once; the decode step is one layer's step for one "
         "token per row of the largest rollout call over a full cache, without the output head. The percentages are "
         "the FLOP/s and bytes/s XLA's time implies, against the chip's published peaks. For the README's run only.", "",
         "| config | slice | one layer's train step | of peak bf16 FLOP/s | one layer's decode step | of peak HBM "
         "bandwidth |", "|---|---|---|---|---|---|"]
  for t in runs.values():
    e = t.get("estimates")
    if t["config"] != "trapo_qwen25_math_7b":  # not asked for (see tpu_aot_figures)
      continue
    if not e:
      est.append(f"| {t['config']} | {t['slice']} | n/a (XLA gave no time estimate) | - | - | - |")
      continue
    tr, de = e["train"], e["decode"]
    est.append(f"| {t['config']} | {t['slice']} | {tr['seconds'] * 1e3:.1f} ms ({tr['layout']}) | "
               f"{100 * tr['flops_of_peak']:.0f}% | {de['seconds'] * 1e6:.0f} µs ({de['layout']}) | "
               f"{100 * de['bandwidth_of_peak']:.0f}% |")
  verdicts = [f"- {t['config']} on {t['slice']}: {t['verdict']}" for t in runs.values() if t.get("verdict")]
  return "\n".join(rows + est) + "\n" + ("\nWhat `--mode=compile` says where a program does not fit:\n\n" +
                                          "\n".join(verdicts) + "\n" if verdicts else "")


def tpu_section(result: dict) -> str:
  from trapo_jax import aot
  chips = {t.get("chip") for t in result["tpu_aot"].values()}
  specs = "; ".join(f"{c.name}: {c.hbm_gib:g} GiB HBM, {c.peak_bf16_tflops:g} TFLOP/s bf16, {c.hbm_gbps:g} GB/s "
                    f"([spec]({c.spec}))" for c in aot.CHIPS.values() if c.name in chips)
  # A run stored without a date of its own was made with the file.
  dates = sorted({t.get("date", result["date"]) for t in result["tpu_aot"].values()})
  return ("## TPU, compiled here\n\n"
          f"Made by `python -m benchmarks.run --suite=tpu_aot --doc=docs/performance.md` (`--tpu_runs=config@slice,...` "
          f"compiles some and keeps the others' stored figures) on {', '.join(dates)}: {result['machine']}, "
          f"{result['cpu_count']} CPU cores, jax {result['jax']}, libtpu {result['libtpu']}. No TPU was used: "
          "libtpu's compile-only devices of each slice, what `python -m trapo_jax.main --mode=compile "
          "--topology=<slice> --config=experiments/configs/<config>.py` compiles (trapo_jax/aot.py), at the model's "
          "full depth. Each shipped 7B/8B config is compiled on the slice its docstring names, then the README's run "
          "(trapo_qwen25_math_7b) on other slices: for each, the train step of every phase, the rollout sampler at "
          "its largest call at the config's batch (with rollout.one_pass, one call of every alternative; prompts "
          "padded to a multiple of the batch shards) and the evaluation sampler at eval.batch_size prompts. "
          "Per chip: XLA's memory plan; total = arguments + outputs - donated + temporaries + code, plus, while "
          "sampling, the optimizer state that stays in memory. A program XLA refuses for memory shows its need "
          "as reported, else `>` the HBM. Compile times are this machine's (shared, 2 cores, `nice`d, beside other "
          f"jobs). Per-chip HBM and peaks are Google's published figures: {specs}. Raw figures: "
          "`benchmarks/results_tpu_aot.json`." + "".join(
              f" {t['config']} on {t['slice']} was compiled by `{t['command']}` (the same aot.compile_run) and its "
              "printed table stored." for t in result["tpu_aot"].values() if t.get("command"))
          + "\n\n" + tpu_table(result))


if __name__ == "__main__":
  app.run(main)
