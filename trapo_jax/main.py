r"""trapo_jax entry point.

  python -m trapo_jax.main                                  # the default experiment (synthetic task, CPU)
  python -m trapo_jax.main --config=experiments/configs/trapo_qwen25_math_7b.py \
      --workdir=gs://bucket/run1 --config.model.hf_dir=/path/to/Qwen2.5-Math-7B
  python -m trapo_jax.main --mode=eval --workdir=...         # evaluate the workdir's latest checkpoint
  python -m trapo_jax.main --mode=export --workdir=...       # write the policy as a Hugging Face directory
  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=...  # does the run fit that slice? (aot.py)
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from trapo_jax import config as config_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_ROOT, "experiments", "configs", "default.py")



def _config_error(argv: list[str], error: Exception) -> str:
  """One line naming the offending key: an unknown override, else the first line of the error."""
  key = _unknown_override(argv)
  if key is not None:
    return f"config error: {key}: unknown key"
  return f"config error: {str(error).splitlines()[0] if str(error) else type(error).__name__}"


def _unknown_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=...` whose key the schema lacks."""
  schema = config_lib.base_config()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node = schema
    path = arg[len("--config."):].split("=", 1)[0]
    for part in path.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        return path
      node = node[part]
  return None


try:
  # Without --config, the default file is loaded (and the overrides applied) right here, at definition.
  _CONFIG = config_flags.DEFINE_config_file("config", default=DEFAULT_CONFIG, help_string="Experiment config file.")
except Exception as e:  # an override of the default config that cannot apply
  sys.exit(_config_error(sys.argv, e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and outputs (default: runs/<config name>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "compile"], "What to do.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export target (default: <workdir>/hf).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "--mode=compile target: a Cloud TPU accelerator type (v5p-32, "
                                "v6e-16, ...), cpu:N, or empty for this machine's devices.")
_ALL_METHODS = flags.DEFINE_bool("all_methods", False, "--mode=compile: every registered method, not only the "
                                 "config's.")


class _QuietLibraries(py_logging.Filter):
  """Drops the INFO chatter of checkpointing and dataset libraries (warnings and errors still show)."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or not any(s in record.pathname for s in self.NOISY)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a one-line error naming the key instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl raises different types for a bad value and an unknown key
    sys.exit(_config_error(argv, e))


def enable_compilation_cache() -> None:
  """Keeps compiled programs on disk (JAX_COMPILATION_CACHE_DIR, default ~/.cache/trapo_jax/xla): a second run of
  the same shapes, or the next point of a sweep, starts without compiling."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/trapo_jax/xla"))


def load_config() -> ml_collections.ConfigDict:
  """The validated config; multi-process runs are initialised first (validation counts global devices)."""
  import jax
  from trapo_jax import distributed
  cfg = _CONFIG.value
  if not isinstance(cfg, ml_collections.ConfigDict):
    sys.exit(f"config error: --config: cannot load {config_flags.get_config_filename(flags.FLAGS['config'])}")
  if "distributed" in cfg and isinstance(cfg.distributed, ml_collections.ConfigDict):
    distributed.initialize(cfg.distributed)
  try:
    config_lib.validate(cfg, num_devices=jax.device_count())
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  return cfg


def default_workdir() -> str:
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  return os.path.join("runs", name)


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    sys.exit(f"unexpected arguments: {' '.join(argv[1:])}")
  if _MODE.value == "compile":
    compile_run()
    return
  enable_compilation_cache()
  cfg = load_config()
  workdir = _WORKDIR.value or default_workdir()
  logging.info("mode=%s workdir=%s", _MODE.value, workdir)
  try:
    if _MODE.value == "train":
      from trapo_jax.train import trainer
      trainer.run(cfg, workdir)
    elif _MODE.value == "eval":
      from trapo_jax.eval import evaluate
      evaluate.run(cfg, workdir)
    else:
      from trapo_jax.train import trainer
      trainer.export(cfg, workdir, _EXPORT_DIR.value or os.path.join(workdir, "hf"))
  except config_lib.ConfigError as e:  # e.g. a checkpoint with fewer positions than a sequence (train/state.py)
    sys.exit(f"config error: {e}")


def compile_run() -> None:
  """--mode=compile: no cache (the compile times are measured), no data, no weights, no distributed start."""
  from trapo_jax import aot
  cfg = _CONFIG.value
  if not isinstance(cfg, ml_collections.ConfigDict):
    sys.exit(f"config error: --config: cannot load {config_flags.get_config_filename(flags.FLAGS['config'])}")
  try:
    aot.prepare(_TOPOLOGY.value)
    aot.run(cfg, _TOPOLOGY.value, all_methods=_ALL_METHODS.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  except aot.CompileError as e:
    sys.exit(str(e))


def entry() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
