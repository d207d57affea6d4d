"""Decode throughput of the in-graph sampler against transformers/torch `generate`, same weights, batch, lengths;
and the sampling time of a TRAPO step in one decode pass against stage by stage (`trapo_step_sampling`).

  python -m benchmarks.sampler_speed                # CPU: ~10M-parameter model, batch 16, 128 new tokens
  python -m benchmarks.sampler_speed --preset=qwen2_0p5b --batch=64 --new_tokens=256   # GPU
  python -m benchmarks.sampler_speed --trapo_step --batch=8 --steps=5   # decode passes and sampling s per step

Greedy decoding with EOS disabled so both generate exactly `new_tokens` tokens per row. Each side is warmed up
once (compilation / allocator), then the two alternate for `repeats` runs each; the figures are generated tokens per
second and the median ratio of back-to-back pairs.
"""

from __future__ import annotations

import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

from trapo_jax.models import hf
from trapo_jax.models import transformer as tfm
from trapo_jax.sampling.sampler import Sampler

PRESETS = {
    # ~10M parameters: a small model for CPU measurements.
    "tiny10m": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=8,
                    num_kv_heads=4, head_dim=32, tie_embeddings=False),
    # Qwen2-0.5B shapes.
    "qwen2_0p5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                       num_kv_heads=2, head_dim=64, tie_embeddings=True, rope_theta=1e6),
}


def model(preset: str, dtype: str) -> tuple[tfm.ModelConfig, dict]:
  cfg = tfm.ModelConfig(**PRESETS[preset], dtype=dtype, param_dtype=dtype)
  return cfg, nn.unbox(jax.jit(lambda: tfm.init_params(cfg, jax.random.key(0)))())


def jax_generate(cfg, params, prompts: np.ndarray, new_tokens: int):
  """A function that runs the sampler once on `prompts` (greedy, exactly `new_tokens` each), warmed up."""
  sampler = Sampler(cfg)
  lens = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
  run = lambda: jax.block_until_ready(sampler.sample(params, prompts, lens, max_len=new_tokens,
                                                     rng=jax.random.key(0), temperature=0.0).tokens)
  run()
  return run


def torch_generate(cfg, params, prompts: np.ndarray, new_tokens: int):
  """The same for transformers `generate` on the same weights (saved with `save_hf`), warmed up."""
  import torch
  import transformers
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(d, cfg, params)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
  ids = torch.tensor(prompts, device=device)

  @torch.no_grad()
  def run():
    out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    if device == "cuda":
      torch.cuda.synchronize()
    assert out.shape[1] == prompts.shape[1] + new_tokens

  run()
  return run


def _seconds(run) -> float:
  t = time.perf_counter()
  run()
  return time.perf_counter() - t


def measure(preset: str = "tiny10m", batch: int = 16, prompt_len: int = 32, new_tokens: int = 128,
            repeats: int = 5, dtype: str = "float32", with_torch: bool = True) -> dict:
  """Tokens/s of each side (median over `repeats`) and the median ratio of back-to-back pairs.

  The two sides alternate, run for run, so that a change in the machine's load hits both alike: on a shared
  machine, timing one side and then the other can move their ratio by 20 %.
  """
  cfg, params = model(preset, dtype)
  prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  ours = jax_generate(cfg, params, prompts, new_tokens)
  theirs = torch_generate(cfg, params, prompts, new_tokens) if with_torch else None
  pairs = [(_seconds(ours), _seconds(theirs) if theirs else None) for _ in range(repeats)]
  per_s = lambda ts: batch * new_tokens / float(np.median(ts))
  ratios = [b / a for a, b in pairs] if theirs else None
  return {"preset": preset, "params_m": cfg.num_params / 1e6, "batch": batch, "prompt_len": prompt_len,
          "new_tokens": new_tokens, "dtype": dtype, "backend": jax.default_backend(), "repeats": repeats,
          "jax_tokens_per_s": per_s([a for a, _ in pairs]),
          "torch_tokens_per_s": per_s([b for _, b in pairs]) if theirs else None,
          "ratio": float(np.median(ratios)) if theirs else None,
          "ratio_range": [min(ratios), max(ratios)] if theirs else None}


def trapo_step_sampling(steps: int = 5, batch_prompts: int = 8) -> dict:
  """Sampling per TRAPO step of the default experiment (its policy, task and lengths), in one decode pass
  (`rollout.one_pass`) and stage by stage, and GRPO's single pass of as many rows per prompt, on the same prompts.

  Each step's prompts go through every path twice, in alternating order, and the second, compiled run is timed.
  Figures per path: median sampling seconds per step (the sampler's wall time, decode and host transfer), mean decode
  passes, rows generated and generated rows used per step.
  """
  import dataclasses
  from experiments.configs import default
  from trapo_jax import algorithms
  from trapo_jax import config as config_lib
  from trapo_jax import losses
  from trapo_jax import sharding
  from trapo_jax.data import pipeline, synthetic
  from trapo_jax.sampling import microgroup
  from trapo_jax.sampling import rollouts as rollouts_lib
  from trapo_jax.train import state as state_lib
  cfg = default.get_config()
  cfg.train.batch_prompts = batch_prompts
  config_lib.validate(cfg, num_devices=jax.device_count())
  model_cfg, mesh = state_lib.model_config(cfg), sharding.make_mesh(cfg)
  tokenizer = hf.load_tokenizer(state_lib.tokenizer_dir(cfg))
  rollouts = rollouts_lib.Rollouts.build(cfg, Sampler(model_cfg, mesh=mesh), tokenizer)  # the trainer's rollouts
  params = state_lib.init_params(cfg, model_cfg, mesh)
  records = synthetic.generate_split("train", steps * batch_prompts, seed=1)
  examples = [pipeline.Example(uid=i, problem=r["problem"], answer=r["answer"], demos=tuple(r["demos"]),
                               level=r["level"]) for i, r in enumerate(records)]
  loader = pipeline.PromptLoader(examples, tokenizer, batch_size=batch_prompts,
                                 max_prompt_len=cfg.data.max_prompt_len, max_response_len=cfg.data.max_response_len,
                                 template=cfg.data.template, seed=None)
  trapo = algorithms.from_config(cfg).phase_at(cfg, 0).rows
  paths = {"one_pass": (trapo, True), "stages": (trapo, False),
           "grpo": (microgroup.Plan(stages=(trapo.n,), guidance=microgroup.Unguided()), False)}
  runs = {k: [] for k in paths}
  for step in range(steps):
    batch = next(loader)
    order = list(paths) if step % 2 == 0 else list(paths)[::-1]
    for timed in (False, True):
      for name in order:
        plan, one_pass = paths[name]
        run_cfg = cfg.copy_and_resolve_references()
        run_cfg.rollout.one_pass = one_pass
        rb, _, m = dataclasses.replace(rollouts, cfg=run_cfg).collect(plan, batch, params, jax.random.key(step))
        if timed:
          runs[name].append((m["time/sampling"], rb.decode_passes, rb.sampled_rows,
                             int((rb.kind != losses.ROW_DEMO).sum())))
  out = {"steps": steps, "batch_prompts": batch_prompts, "max_response_len": int(cfg.data.max_response_len),
         "params_m": model_cfg.num_params / 1e6, "one_pass_rows_per_prompt": trapo.one_pass_rows}
  for name, r in runs.items():
    seconds, passes, sampled, used = (np.asarray(x, np.float64) for x in zip(*r))
    out[name] = {"sampling_s": float(np.median(seconds)), "decode_passes": float(passes.mean()),
                 "rows_sampled": float(sampled.mean()), "rows_used": float(used.mean())}
  out["one_pass_over_stages"] = out["one_pass"]["sampling_s"] / out["stages"]["sampling_s"]
  out["one_pass_over_grpo"] = out["one_pass"]["sampling_s"] / out["grpo"]["sampling_s"]
  out["stages_over_grpo"] = out["stages"]["sampling_s"] / out["grpo"]["sampling_s"]
  return out


def print_trapo_step(r: dict) -> None:
  print(f"sampling per TRAPO step, default task ({r['params_m']:.1f}M params, {r['batch_prompts']} prompts, "
        f"{r['max_response_len']}-token responses, median of {r['steps']} steps, {jax.default_backend()})")
  for name, label in (("one_pass", "TRAPO, one pass"), ("stages", "TRAPO, stage by stage"), ("grpo", "GRPO")):
    x = r[name]
    print(f"  {label:22s}: {x['decode_passes']:.2f} decode passes, {x['sampling_s']:.3f} s, "
          f"{x['rows_sampled']:.0f} rows sampled, {x['rows_used']:.0f} used")
  print(f"  one pass / stages {r['one_pass_over_stages']:.2f}x, one pass / GRPO {r['one_pass_over_grpo']:.2f}x, "
        f"stages / GRPO {r['stages_over_grpo']:.2f}x")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.trapo_step:
    print_trapo_step(trapo_step_sampling(steps=f.steps, batch_prompts=f.batch))
    return
  r = measure(f.preset, f.batch, f.prompt_len, f.new_tokens, f.repeats, f.dtype, f.torch)
  print(f"{r['preset']} ({r['params_m']:.1f}M params, {r['dtype']}, {r['backend']}), batch {r['batch']}, "
        f"{r['new_tokens']} new tokens")
  print(f"  trapo_jax sampler : {r['jax_tokens_per_s']:10.1f} tokens/s")
  if r["torch_tokens_per_s"]:
    print(f"  torch generate    : {r['torch_tokens_per_s']:10.1f} tokens/s")
    print(f"  ratio             : {r['ratio']:10.2f}x  (median of {r['repeats']} back-to-back pairs; "
          f"range {r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f})")


def define_flags():
  """Command-line flags, defined only when run as a script: other benchmarks import this module."""
  flags.DEFINE_enum("preset", "tiny10m", list(PRESETS), "Model shapes.")
  flags.DEFINE_integer("batch", 16, "Rows.")
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
  flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")
  flags.DEFINE_integer("repeats", 5, "Timed runs per side.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
  flags.DEFINE_bool("torch", True, "Also time transformers generate.")
  flags.DEFINE_bool("trapo_step", False, "Instead: sampling per TRAPO step in one pass, stage by stage, and GRPO's, "
                    "on the default task (--batch prompts per step, --steps steps).")
  flags.DEFINE_integer("steps", 5, "--trapo_step: timed steps.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
