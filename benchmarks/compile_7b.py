r"""Compile the 7B run for a topology without weights or hardware: `--mode=compile` (trapo_jax/aot.py) over every
registered method, with fewer layers if asked.

  python -m benchmarks.compile_7b --topology=v5p-8 --layers=2 --programs=train    # needs libtpu
  python -m benchmarks.compile_7b --topology=cpu:8 [--config=experiments/configs/trapo_qwen3_8b.py]

Default config: experiments/configs/trapo_qwen25_math_7b.py (8 prompts x 8 samples, prompt 1024 + response 8192
tokens). Prints, per method and program, the per-chip memory XLA plans and the compile time; exits non-zero with one
line when a program does not fit.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from trapo_jax import aot


def main(argv):
  del argv
  f = flags.FLAGS
  cfg = f.config
  depth = cfg.model.num_layers
  if f.layers > 0:  # compiled at --layers and twice as many, extrapolated to the model's depth
    cfg.model.num_layers = f.layers
  try:
    aot.run(cfg, f.topology, all_methods=f.all_methods, programs=tuple(f.programs), depth=depth)
  except aot.CompileError as e:
    sys.exit(str(e))


def define_flags():
  default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "configs",
                         "trapo_qwen25_math_7b.py")
  config_flags.DEFINE_config_file("config", default, "Experiment config whose model shapes are compiled.")
  flags.DEFINE_string("topology", "cpu:8", "A Cloud TPU accelerator type (v5p-8, ...), cpu:N, or empty.")
  flags.DEFINE_integer("layers", -1, "Decoder layers to compile (-1: the model's); fewer are extrapolated to the "
                       "model's depth.")
  flags.DEFINE_bool("all_methods", True, "Every registered method (trapo_jax.algorithms.names()), not only the "
                    "config's.")
  flags.DEFINE_list("programs", list(aot.PROGRAMS), "Which programs: train, rollout, eval.")


if __name__ == "__main__":
  define_flags()
  aot.prepare(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")), "cpu:8"))
  app.run(main)
