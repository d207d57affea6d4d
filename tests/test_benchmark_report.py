"""The benchmark report: every figure lands in the table, and figures this machine cannot measure say so."""

from benchmarks import run


def _result(suite: str, compile_s):
  r = {"suite": suite, "date": "2026-01-01", "machine": "x86_64", "cpu_count": 2, "jax": "0", "backend": "cpu",
       "devices": ["cpu:0"],
       "sampler": {"preset": "tiny10m", "params_m": 12.1, "batch": 16, "new_tokens": 128, "dtype": "float32",
                   "jax_tokens_per_s": 2000.0, "torch_tokens_per_s": 1000.0, "ratio": 2.0, "repeats": 5,
                   "ratio_range": [1.8, 2.25]},
       "sampler_roofline": {"value": None, "reason": "needs a GPU"},
       "train_mfu": {"value": None, "reason": "needs a GPU"},
       "sampler_logprob_gap": {d: {"max_abs": 1e-6, "mean_abs": 1e-7} for d in ("float32", "bfloat16")},
       "loss_memory": {d: {"chunked_temp_gib": 1.25, "naive_temp_gib": 18.5, "ratio": 0.068}
                       for d in ("float32", "bfloat16")},
       "compilations_per_step": [5, 1, 0, 0], "compilations_after_step_3": 0,
       "step_time_split_s": {"sampling": 0.3, "grading": 0.03, "update": 2.2, "step": 2.5},
       "compile_28_layers_s": compile_s}
  if suite == "gpu":
    r["sampler_roofline"] = {"copy_bandwidth_gbs": 3000.0, "bound_tokens_per_s": 4000.0, "fraction": 0.5}
    r["train_mfu"] = {"model_tflops": 400.0, "peak_tflops": 800.0, "mfu": 0.5, "seconds_per_step": 1.0}
  return r


def test_cpu_report_lists_each_figure_and_the_unmeasured_ones():
  r = _result("cpu", None)
  md = run.table(r)
  assert "| 2000 | 1000 (transformers generate) | 2.00x (median of 5; 1.80-2.25) |" in md
  assert "| 1.25 GiB | 18.50 GiB (log_softmax + gather) | 0.068 |" in md
  assert "| n/a | 120 s (target) |" in md  # a failed compile measurement is reported, not a crash
  assert "roofline" not in md
  doc = run.document(r)
  assert "2026-01-01" in doc and "2 CPU cores" in doc and md in doc
  assert "sampler_roofline, train_mfu" in doc


def test_peer_rows_and_their_absence():
  """benchmarks.peers' rows land in the table; without Tunix the section says why they are missing."""
  from benchmarks import peers
  r = _result("cpu", 9.0)
  sample = dict(label="sampling, batch 16, 32-token prompts, 128 new tokens", kind="sample",
                **peers.pair_figures([1.6, 1.5, 1.7], [2.0, 2.1, 1.8], 2048))
  train = dict(label="forward+backward, 16 rows x (32+128), PG clip 0.2 token-mean", kind="train",
               **peers.pair_figures([4.0, 4.4, 4.2], [3.6, 4.0, 4.2], 1.0))
  failed = dict(label="forward+backward, 64 rows x (32+128), PG clip 0.2 token-mean", kind="train",
                error="loss: trapo_jax 1, Tunix 2")
  r["peers"] = {"tunix": "0.1.7", "model": {"preset": "tiny10m", "params_m": 12.1, "dtype": "float32"},
                "rows": [sample, train, failed]}
  md = run.table(r)
  assert ("| sampling, batch 16, 32-token prompts, 128 new tokens (tiny10m, 12M params, float32) | 1280 tok/s | "
          "1024 tok/s (Tunix 0.1.7) | 1.25x (median of 3 pairs; 1.06-1.40) |") in md
  assert "| 4.20 s | 4.00 s (Tunix 0.1.7) | 0.91x (median of 3 pairs; 0.90-1.00) |" in md
  assert "| not timed: loss: trapo_jax 1, Tunix 2 | Tunix 0.1.7 | - |" in md
  r["peers"] = {"value": None, "reason": "Tunix is not installed"}
  assert "Tunix" not in run.table(r)
  doc = run.document(r)
  assert "Not measured here (peers): Tunix is not installed." in doc
  assert "Not measured here (sampler_roofline, train_mfu): they need a GPU" in doc


def test_peers_group_skipped_with_one_line_without_tunix(monkeypatch, capsys):
  from benchmarks import peers
  monkeypatch.setattr(peers, "tunix_available", lambda: False)
  for gpu in (False, True):
    r = run.peers_figures(gpu)
    assert r["value"] is None and "requirements-peers.txt" in r["reason"]
    assert capsys.readouterr().out.splitlines() == [peers.INSTALL_LINE]


def _tpu_result():
  program = lambda name, fits, total, error="": {
      "name": name, "layout": "64 sequences of 9216 tokens", "fits": fits, "params_gib": 1.9, "opt_state_gib": 3.8,
      "kv_cache_gib": 0.0, "temp_gib": None if error else 20.0, "total_gib": total, "compile_s": 181.0,
      "error": error, "fixes": []}
  run7b = lambda slice_, **kw: {"config": "trapo_qwen25_math_7b", "slice": slice_, **kw}
  return {"suite": "tpu_aot", "date": "2026-01-02", "machine": "x86_64", "cpu_count": 2, "jax": "0", "libtpu": "1",
          "backend": "cpu", "devices": ["cpu:0"], "tpu_aot": {
              "trapo_qwen25_math_7b@v5p-32": run7b(
                  "v5p-32", chip="v5p", chips=16, hbm_gib=95.0, headline="", verdict=None, date="2026-01-03",
                  programs=[program("train step (rl)", True, 30.2)],
                  estimates={"train": {"seconds": 0.0123, "layout": "2 x 9216 tokens per chip",
                                       "flops_of_peak": 0.61, "bandwidth_of_peak": 0.2},
                             "decode": {"seconds": 2.5e-5, "layout": "4 rows per chip", "flops_of_peak": 0.01,
                                        "bandwidth_of_peak": 0.83}}),
              "trapo_qwen25_math_7b@v6e-16": run7b(
                  "v6e-16", chip="v6e", chips=16, hbm_gib=32.0, headline="", estimates={},
                  verdict="eval decode needs 70 GiB per chip, v6e has 32 GiB: try --config.eval.batch_size=32",
                  programs=[program("eval decode", False, None, "RESOURCE_EXHAUSTED: Ran out of memory")]),
              "trapo_qwen25_math_7b@v6e-64": run7b("v6e-64", error="INTERNAL: libtpu said no")}}


def test_tpu_report_has_a_row_per_slice_and_program():
  r = _tpu_result()
  md = run.tpu_table(r)
  assert "| trapo_qwen25_math_7b | v5p-32 (16 chips) | train step (rl) | 64 sequences of 9216 tokens | yes | " \
         "1.9 / 3.8 / - / 20.0 | 30.2 / 95 | 181 s |" in md
  assert "| trapo_qwen25_math_7b | v6e-16 (16 chips) | eval decode | 64 sequences of 9216 tokens | **no** | " \
         "1.9 / 3.8 / - / - | > 32 / 32 |" in md
  assert "| trapo_qwen25_math_7b | v6e-64 | not compiled: INTERNAL: libtpu said no |" in md
  assert "| trapo_qwen25_math_7b | v5p-32 | 12.3 ms (2 x 9216 tokens per chip) | 61% | 25 µs (4 rows per chip) | " \
         "83% |" in md
  assert "| trapo_qwen25_math_7b | v6e-16 | n/a (XLA gave no time estimate) |" in md
  assert ("- trapo_qwen25_math_7b on v6e-16: eval decode needs 70 GiB per chip, v6e has 32 GiB: try "
          "--config.eval.batch_size=32") in md
  doc = run.tpu_section(r)
  assert doc.startswith("## TPU, compiled here") and "libtpu 1" in doc and "not a measurement" in doc
  assert "2026-01-02, 2026-01-03" in doc  # a run without a date of its own was made with the file
  assert "https://cloud.google.com/tpu/docs/v5p" in doc and "https://cloud.google.com/tpu/docs/v4" not in doc


def test_stored_tpu_runs_are_kept_in_the_suite_order():
  """Compiling some runs keeps the others' figures; the table lists every run in TPU_RUNS's order whatever order
  they were compiled in, runs it does not name last."""
  runs = {"trapo_qwen25_math_7b@v6e-16": {}, "other@v4-8": {}, "uft_qwen25_math_7b@v5p-128": {},
          "trapo_qwen25_math_7b@v5p-32": {}}
  out = run.tpu_aot_figures([], runs, save=None)
  assert list(out) == ["trapo_qwen25_math_7b@v5p-32", "uft_qwen25_math_7b@v5p-128", "trapo_qwen25_math_7b@v6e-16",
                       "other@v4-8"]


def test_gpu_report_has_roofline_and_mfu():
  md = run.table(_result("gpu", 12.0))
  assert "| 4000 (params + live KV at 3000 GB/s) | 50% |" in md
  assert "MFU 50% |" in md and "| 12.0 s |" in md


def test_benchmark_modules_import_together():
  """benchmarks.run imports the others as libraries: their command-line flags must not collide at import."""
  import importlib
  import subprocess
  import sys
  names = ["benchmarks.run", "benchmarks.loss_memory", "benchmarks.sampler_speed", "benchmarks.compile_7b",
           "benchmarks.grade_benchmarks", "benchmarks.peers"]
  code = "; ".join(f"import {n}" for n in names)
  root = importlib.import_module("benchmarks").__path__[0].rsplit("/", 1)[0]
  out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
