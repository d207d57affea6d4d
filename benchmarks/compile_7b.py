"""Lower and compile the paper's 7B TRAPO train step for abstract shapes on a device mesh (no weights needed).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python -m benchmarks.compile_7b \
      [--config=experiments/configs/trapo_qwen3_8b.py] [--layers=2]

Uses an experiment config (default experiments/configs/trapo_qwen25_math_7b.py) with the model shapes it names:
8 prompts x 8 samples, prompt 1024 + response 8192 tokens, micro-batches from the per-device token budget. Prints the
compile time and the per-device memory XLA plans for the step (arguments, outputs, temporaries).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from trapo_jax import algorithms
from trapo_jax import config as config_lib
from trapo_jax import sharding
from trapo_jax.models import transformer as tfm
from trapo_jax.train import state as state_lib
from trapo_jax.train import step as step_lib

def lower_train_step(cfg, num_layers: int | None = None, seq_len: int | None = None, phase=None):
  """(compiled step, seconds to compile, micro-batch layout) for the abstract inputs of `cfg`'s model (with
  `num_layers` layers, default the model's) on all devices.

  phase: one of the configured method's phases (default: its phase at step 0).
  """
  config_lib.validate(cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else cfg,
                      num_devices=jax.device_count())
  mesh = sharding.make_mesh(cfg)
  m = cfg.model
  model_cfg = tfm.ModelConfig.from_config(m).replace(num_layers=num_layers or m.num_layers)
  tx = state_lib.make_optimizer(cfg.optim)
  param_sh = state_lib.param_shardings(model_cfg, mesh)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        jax.eval_shape(lambda: __import__("flax").linen.unbox(
                            tfm.init_params(model_cfg, jax.random.key(0)))), param_sh)
  opt_state = jax.eval_shape(tx.init, params)
  import optax
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh,
                                 transform_non_params=lambda _: sharding.replicated(mesh))
  opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), opt_state, opt_sh)
  rep = sharding.replicated(mesh)
  state = state_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=params,
                               opt_state=opt_state, rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
  phase = phase or algorithms.from_config(cfg).phase_at(cfg, 0)
  rows = cfg.train.batch_prompts * phase.rows_per_prompt
  t = seq_len or cfg.data.max_prompt_len + cfg.data.max_response_len
  lb = cfg.data.max_response_len
  mb = step_lib.micro_batch_rows(rows, t, cfg.train.micro_batch_tokens, sharding.local_batch_shards(mesh))
  nm = rows // mb
  spec = dict(seq_tokens=((nm, mb, t), jnp.int32), seq_mask=((nm, mb, t), jnp.bool_), resp_start=((nm, mb), jnp.int32),
              resp_tokens=((nm, mb, lb), jnp.int32), prefix_mask=((nm, mb, lb), jnp.bool_),
              off_loss_mask=((nm, mb, lb), jnp.bool_), response_mask=((nm, mb, lb), jnp.bool_),
              advantages=((nm, mb), jnp.float32), rewards=((nm, mb), jnp.float32), kind=((nm, mb), jnp.int32))
  batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=step_lib.micro_batch_sharding(mesh, len(shape)))
           for k, (shape, dt) in spec.items()}
  fn = jax.jit(functools.partial(step_lib.train_step, tx=tx, model_cfg=model_cfg, objective=phase.objective,
                                 chunk_size=cfg.train.logprob_chunk, temperature=phase.temperature),
               donate_argnums=(0,))
  weights = jax.ShapeDtypeStruct((len(phase.objective.terms),), jnp.float32, sharding=rep)
  start = time.perf_counter()
  with sharding.activate(mesh):
    compiled = fn.lower(state, batch, weights).compile()
  return compiled, time.perf_counter() - start, dict(rows=rows, micro_batches=nm, rows_per_micro_batch=mb, seq=t,
                                                       params_b=model_cfg.num_params / 1e9)


def main(argv):
  del argv
  f = flags.FLAGS
  cfg = f.config
  cfg.model.hf_dir, cfg.data.path = "/abstract", "/abstract"  # shapes only: nothing is read
  layers = f.layers if f.layers > 0 else cfg.model.num_layers
  compiled, seconds, layout = lower_train_step(cfg, layers, None if f.seq < 0 else f.seq)
  mem = compiled.memory_analysis()
  gib = lambda x: x / 2**30
  print(f"{config_flags.get_config_filename(f['config'])}: {cfg.algo} train step of a {cfg.model.model_type}, "
        f"{layers} layers ({layout['params_b']:.2f}B params), {jax.device_count()} "
        f"{jax.default_backend()} devices, mesh {dict(sharding.make_mesh(cfg).shape)}")
  print(f"  {layout['rows']} sequences of {layout['seq']} tokens in {layout['micro_batches']} micro-batches of "
        f"{layout['rows_per_micro_batch']}")
  print(f"  compile: {seconds:.1f} s")
  print(f"  per device: arguments {gib(mem.argument_size_in_bytes):.2f} GiB, outputs "
        f"{gib(mem.output_size_in_bytes):.2f} GiB, temporaries {gib(mem.temp_size_in_bytes):.2f} GiB, "
        f"aliased {gib(mem.alias_size_in_bytes):.2f} GiB")


def define_flags():
  """Command-line flags, defined only when run as a script: other benchmarks import this module."""
  default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs",
                         "trapo_qwen25_math_7b.py")
  config_flags.DEFINE_config_file("config", default, "Experiment config whose model shapes are compiled.")
  flags.DEFINE_integer("layers", -1, "Decoder layers (-1: the model's).")
  flags.DEFINE_integer("seq", -1, "Packed sequence length (-1: max_prompt_len + max_response_len).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
