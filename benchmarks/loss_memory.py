"""Temporary memory of the chunked log-prob/entropy kernel against a naive log_softmax-and-gather, compiled only.

  python -m benchmarks.loss_memory     # B=1, T=8192, D=3584, V=151,936: the Qwen2.5-7B head

Both losses are jit(value_and_grad) over abstract shapes (no arrays are allocated); the figure is XLA's
`memory_analysis().temp_size_in_bytes` of the compiled program on this machine's default backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from trapo_jax import losses


def _naive(hidden, unembed, targets):
  logits = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], entropy


def _temp_bytes(fn, b, t, d, v, dtype) -> int:
  def loss(hidden, unembed, targets):
    logp, entropy = fn(hidden, unembed, targets)
    return jnp.mean(logp) + 0.001 * jnp.mean(entropy)
  args = (jax.ShapeDtypeStruct((b, t, d), dtype), jax.ShapeDtypeStruct((d, v), dtype),
          jax.ShapeDtypeStruct((b, t), jnp.int32))
  compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def measure(b: int = 1, t: int = 8192, d: int = 3584, v: int = 151936, chunk_size: int = 1024,
            dtype=jnp.bfloat16) -> dict:
  chunked = _temp_bytes(lambda h, w, y: losses.token_logprobs(h, w, y, chunk_size=chunk_size), b, t, d, v, dtype)
  naive = _temp_bytes(_naive, b, t, d, v, dtype)
  return {"shape": [b, t, d, v], "chunk": chunk_size, "dtype": jnp.dtype(dtype).name,
          "backend": jax.default_backend(), "chunked_temp_gib": chunked / 2**30, "naive_temp_gib": naive / 2**30,
          "ratio": chunked / naive}


def main(argv):
  del argv
  f = flags.FLAGS
  for dtype in (jnp.bfloat16, jnp.float32):
    r = measure(f.batch, f.seq, f.hidden, f.vocab, f.chunk, dtype)
    print(f"{r['dtype']:>8} B={f.batch} T={f.seq} D={f.hidden} V={f.vocab} ({r['backend']}): "
          f"chunked(chunk={r['chunk']}) {r['chunked_temp_gib']:.2f} GiB, naive {r['naive_temp_gib']:.2f} GiB, "
          f"ratio {r['ratio']:.3f}")


def define_flags():
  """Command-line flags, defined only when run as a script: other benchmarks import this module."""
  flags.DEFINE_integer("batch", 1, "Sequences.")
  flags.DEFINE_integer("seq", 8192, "Tokens per sequence.")
  flags.DEFINE_integer("hidden", 3584, "Hidden size.")
  flags.DEFINE_integer("vocab", 151936, "Vocabulary size.")
  flags.DEFINE_integer("chunk", 1024, "Chunk over T.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
