"""Decode throughput of the in-graph sampler against transformers/torch `generate`, same weights, batch, lengths.

  python -m benchmarks.sampler_speed                # CPU: ~10M-parameter model, batch 16, 128 new tokens
  python -m benchmarks.sampler_speed --preset=qwen2_0p5b --batch=64 --new_tokens=256   # GPU

Greedy decoding with EOS disabled so both generate exactly `new_tokens` tokens per row. Each side is warmed up
once (compilation / allocator) and timed over `repeats` runs; the figure is generated tokens per second.
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


def time_jax(cfg, params, prompts: np.ndarray, new_tokens: int, repeats: int) -> float:
  sampler = Sampler(cfg)
  lens = np.full((prompts.shape[0],), prompts.shape[1], np.int32)
  run = lambda: jax.block_until_ready(sampler.sample(params, prompts, lens, max_len=new_tokens,
                                                     rng=jax.random.key(0), temperature=0.0).tokens)
  run()
  t = time.perf_counter()
  for _ in range(repeats):
    run()
  return prompts.size // prompts.shape[1] * new_tokens * repeats / (time.perf_counter() - t)


def time_torch(cfg, params, prompts: np.ndarray, new_tokens: int, repeats: int) -> float:
  import torch
  import transformers
  with tempfile.TemporaryDirectory() as d:
    hf.save_hf(d, cfg, params)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
  ids = torch.tensor(prompts, device=device)
  run = lambda: m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
  with torch.no_grad():
    run()
    t = time.perf_counter()
    for _ in range(repeats):
      out = run()
    if device == "cuda":
      torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
  assert out.shape[1] == prompts.shape[1] + new_tokens
  return prompts.shape[0] * new_tokens * repeats / elapsed


def measure(preset: str = "tiny10m", batch: int = 16, prompt_len: int = 32, new_tokens: int = 128,
            repeats: int = 3, dtype: str = "float32", with_torch: bool = True) -> dict:
  cfg, params = model(preset, dtype)
  prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
  ours = time_jax(cfg, params, prompts, new_tokens, repeats)
  theirs = time_torch(cfg, params, prompts, new_tokens, repeats) if with_torch else None
  return {"preset": preset, "params_m": cfg.num_params / 1e6, "batch": batch, "prompt_len": prompt_len,
          "new_tokens": new_tokens, "dtype": dtype, "backend": jax.default_backend(),
          "jax_tokens_per_s": ours, "torch_tokens_per_s": theirs,
          "ratio": ours / theirs if theirs else None}


def main(argv):
  del argv
  f = flags.FLAGS
  r = measure(f.preset, f.batch, f.prompt_len, f.new_tokens, f.repeats, f.dtype, f.torch)
  print(f"{r['preset']} ({r['params_m']:.1f}M params, {r['dtype']}, {r['backend']}), batch {r['batch']}, "
        f"{r['new_tokens']} new tokens")
  print(f"  trapo_jax sampler : {r['jax_tokens_per_s']:10.1f} tokens/s")
  if r["torch_tokens_per_s"]:
    print(f"  torch generate    : {r['torch_tokens_per_s']:10.1f} tokens/s")
    print(f"  ratio             : {r['ratio']:10.2f}x")


def define_flags():
  """Command-line flags, defined only when run as a script: other benchmarks import this module."""
  flags.DEFINE_enum("preset", "tiny10m", list(PRESETS), "Model shapes.")
  flags.DEFINE_integer("batch", 16, "Rows.")
  flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
  flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per side.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and parameter dtype.")
  flags.DEFINE_bool("torch", True, "Also time transformers generate.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
