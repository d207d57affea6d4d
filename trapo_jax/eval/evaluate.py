"""Benchmark evaluation: sample n answers per problem, grade them, report avg@n and unbiased pass@k.

Writes into its output directory: results.json (all figures), results.md (a table), pass_at_k.png and
generations.jsonl (every generation with its grade). `--mode=eval` evaluates a workdir's newest checkpoint (the
configured initial policy only with `--allow_initial_policy`) on `eval.benchmarks`; trapo_jax.main composes it with
the trainer's policy loading, and hands training an evaluation function: evaluation and training never import
each other.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging

from trapo_jax import paths
from trapo_jax.eval import metrics as metrics_lib

MATH_BENCHMARKS = ("aime24", "aime25", "amc", "math500", "minerva", "olympiadbench")


def load_problems(cfg, name: str, data_dir: str):
  """Examples of a benchmark; "synthetic" is the held-out split of the synthetic task."""
  from trapo_jax import distributed
  from trapo_jax.data import pipeline
  if name == "synthetic":
    load = lambda: pipeline.load_examples(cfg.data, "test", data_dir=data_dir)
  else:
    load = lambda: pipeline.load_benchmark_examples(name, data_dir=data_dir)
  examples = distributed.process_zero_first(load, f"eval:{name}")
  if cfg.eval.max_problems >= 0:
    examples = examples[:cfg.eval.max_problems]
  return examples


def _batches(loader, batch_size: int):
  """Full-size batches (the last one padded by repeating its first row) and the count of real rows."""
  for batch in loader:
    g = batch.prompt_ids.shape[0]
    yield (batch if g == batch_size else batch.take(np.concatenate([np.arange(g), np.zeros(batch_size - g, int)]))), g


def evaluate_benchmark(cfg, params, tokenizer, sampler, examples, n: int, rng: jax.Array, *,
                       bar: tqdm.tqdm | None = None) -> tuple[list[list[float]], list[dict]]:
  """Correctness [problems][n] and one record per generation."""
  from trapo_jax import rewards
  from trapo_jax.data import pipeline
  e = cfg.eval
  loader = pipeline.PromptLoader(examples, tokenizer, batch_size=e.batch_size, max_prompt_len=cfg.data.max_prompt_len,
                                 max_response_len=e.max_new_tokens, template=e.template, seed=None,
                                 require_demos=False, drop_remainder=False)
  eos = (int(tokenizer.eos_token_id),)
  pad = pipeline.pad_id(tokenizer)
  # Each process samples and grades its own share of every batch; row ids keep each row's samples what they are
  # on one process.
  procs, share = jax.process_count(), e.batch_size // jax.process_count()
  if share * procs != e.batch_size:
    raise ValueError(f"eval.batch_size={e.batch_size} does not split over {procs} processes")
  rows = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
  correct: list[list[float]] = []
  records: list[dict] = []
  batches = 0
  for b, (batch, real) in enumerate(_batches(loader, e.batch_size)):
    batches += 1
    out = sampler.sample(params, batch.prompt_ids[rows], batch.prompt_lens[rows], max_len=e.max_new_tokens,
                         rng=jax.random.fold_in(rng, b), n=n, row_ids=np.arange(rows.start, rows.stop),
                         temperature=e.temperature, top_p=e.top_p, eos_ids=eos, pad_id=pad)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
    texts = pipeline.decode_responses(tokenizer, tokens, mask)
    answers = [a for a in batch.answers[rows] for _ in range(n)]
    scores = np.asarray(rewards.grade_batch(texts, answers, timeout_s=e.grader_timeout_s,
                                            workers=e.grader_workers), np.float32)
    if procs > 1:  # every process ends with every row's outcome
      from jax.experimental import multihost_utils
      tokens, mask, scores = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                              for x in (tokens, mask, scores))
      texts = pipeline.decode_responses(tokenizer, tokens, mask)
    tokens, mask, scores, texts = tokens[:real * n], mask[:real * n], scores[:real * n], texts[:real * n]
    for i in range(real):
      correct.append([float(s) for s in scores[i * n:(i + 1) * n]])
      for j in range(n):
        records.append({"uid": int(batch.uids[i]), "problem": batch.problems[i], "answer": batch.answers[i],
                        "sample": j, "response": texts[i * n + j], "correct": float(scores[i * n + j]),
                        "length": int(mask[i * n + j].sum())})
    if bar is not None:
      bar.update(real * n)
  logging.info("eval: this process sampled %d of %d prompt rows", batches * share, batches * e.batch_size)
  return correct, records


def evaluate(cfg, params, model_cfg, tokenizer, sampler, *, out_dir: str, data_dir: str) -> dict[str, Any]:
  """Evaluates on every benchmark of `cfg.eval.benchmarks`; writes the four outputs into out_dir."""
  problems = {name: load_problems(cfg, name, data_dir) for name in cfg.eval.benchmarks}
  total = sum(len(p) * cfg.eval.samples[name] for name, p in problems.items())
  results: dict[str, Any] = {"benchmarks": {}}
  all_records = []
  rng = jax.random.PRNGKey(cfg.seed + 1)
  t0 = time.perf_counter()
  with tqdm.tqdm(total=total, desc="eval", unit="sample", dynamic_ncols=True,
                 disable=jax.process_index() != 0) as bar:
    for k, (name, examples) in enumerate(problems.items()):
      n = cfg.eval.samples[name]
      bar.set_postfix_str(name)
      correct, records = evaluate_benchmark(cfg, params, tokenizer, sampler, examples, n,
                                            jax.random.fold_in(rng, k), bar=bar)
      level_of = {e.uid: e.level for e in examples if e.level}
      by_level = {str(lv): float(np.mean([r["correct"] for r in records if level_of.get(r["uid"]) == lv]))
                  for lv in sorted(set(level_of.values()))}
      results["benchmarks"][name] = {
          "problems": len(correct), "samples": n, f"avg@{n}": metrics_lib.avg_at_n(correct) if correct else 0.0,
          "pass@k": {str(k_): v for k_, v in metrics_lib.pass_at_k_table(correct).items()} if correct else {},
          "mean_length": float(np.mean([r["length"] for r in records])) if records else 0.0}
      if by_level:
        results["benchmarks"][name]["by_level"] = by_level
      all_records += [{"benchmark": name, **r} for r in records]
  math = [results["benchmarks"][b] for b in MATH_BENCHMARKS if b in results["benchmarks"]]
  if math:
    results["math_avg"] = float(np.mean([accuracy(r) for r in math]))
  results["seconds"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    write_outputs(results, all_records, out_dir)
  logging.info("eval: %s", {b: round(accuracy(r), 4) for b, r in results["benchmarks"].items()})
  return results


def accuracy(bench: dict) -> float:
  """A benchmark's headline number: mean accuracy over all its samples (avg@n)."""
  return bench[f"avg@{bench['samples']}"]


def markdown_table(results: dict) -> str:
  lines = ["| benchmark | problems | samples | avg@n | pass@k |", "|---|---|---|---|---|"]
  for name, r in results["benchmarks"].items():
    passk = ", ".join(f"@{k}: {100 * v:.1f}" for k, v in r["pass@k"].items())
    lines.append(f"| {name} | {r['problems']} | {r['samples']} | {100 * accuracy(r):.1f} | {passk} |")
  if "math_avg" in results:
    lines.append(f"| math average | | | {100 * results['math_avg']:.1f} | |")
  return "\n".join(lines) + "\n"


def write_outputs(results: dict, records: list[dict], out_dir: str) -> None:
  paths.write(paths.join(out_dir, "results.json"), json.dumps(results, indent=2))
  paths.write(paths.join(out_dir, "results.md"), markdown_table(results))
  paths.write(paths.join(out_dir, "generations.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
  plot_pass_at_k(results, paths.join(out_dir, "pass_at_k.png"))


def plot_pass_at_k(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for name, r in results["benchmarks"].items():
    ks = sorted(int(k) for k in r["pass@k"])
    if ks:
      ax.plot(ks, [100 * r["pass@k"][str(k)] for k in ks], marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k")
  ax.set_ylabel("pass@k (%)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  with paths.writing(path) as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def before_after_table(before: dict, after: dict) -> str:
  lines = ["| benchmark | before | after |", "|---|---|---|"]
  for name, r in after["benchmarks"].items():
    b = before["benchmarks"].get(name)
    lines.append(f"| {name} | {100 * accuracy(b):.1f} | {100 * accuracy(r):.1f} |" if b else
                 f"| {name} | - | {100 * accuracy(r):.1f} |")
  return "\n".join(lines)
