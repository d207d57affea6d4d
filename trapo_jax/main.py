r"""trapo_jax entry point.

  python -m trapo_jax.main                                  # the default experiment (synthetic task, CPU)
  python -m trapo_jax.main --config=experiments/configs/trapo_qwen25_math_7b.py \
      --workdir=gs://bucket/run1 --config.model.hf_dir=/path/to/Qwen2.5-Math-7B
  python -m trapo_jax.main --mode=eval --workdir=...         # evaluate the workdir's latest checkpoint
  python -m trapo_jax.main --mode=export --workdir=...       # write the policy as a Hugging Face directory
  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=...  # does the run fit that slice? (aot.py)

Exit codes: 0 done; 2 a user-facing error (config, paths, data, checkpoints, a locked workdir), printed as one line
(`--verbose` or TRAPO_VERBOSE=1 adds the traceback); 143 stopped by SIGTERM after saving a checkpoint (rerun to
resume); anything else (1) is a crash, with its traceback.
"""

from __future__ import annotations

import functools
import logging as py_logging
import os
import re
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from trapo_jax import config as config_lib
from trapo_jax import errors

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_ROOT, "experiments", "configs", "default.py")



def _verbose() -> bool:
  """--verbose (also read before flags are parsed: a config file fails while its flag is defined)."""
  return "--verbose" in sys.argv or os.environ.get("TRAPO_VERBOSE", "") not in ("", "0")


def fail(message: str) -> None:
  """Exits with a one-line user-facing error (EXIT_USER_ERROR); with --verbose the current traceback comes first."""
  if _verbose() and sys.exc_info()[0] is not None:
    import traceback
    traceback.print_exc()
  print(message.replace("\n", " "), file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_USER_ERROR)


def _config_error(argv: list[str], error: Exception) -> str:
  """One line naming the offending key: an unknown override, else the error's reason."""
  key = _unknown_override(argv)
  if key is not None:
    return f"config error: {key}: unknown key"
  return f"config error: {_reason(str(error)) or type(error).__name__}"


def _reason(text: str) -> str:
  """The first line of an error, or for a config file that raised (ml_collections puts the traceback into the
  message) `<file>:<line>: <exception>`, the frame being the last one outside installed packages."""
  lines = [line for line in text.strip().splitlines() if line.strip()]
  if "Traceback (most recent call last):" not in text:
    return lines[0] if lines else ""
  frames = re.findall(r'File "([^"]+)", line (\d+)', text)
  own = [f for f in frames if "site-packages" not in f[0] and "dist-packages" not in f[0]]
  where = f"{own[-1][0]}:{own[-1][1]}: " if own else ""
  return f"{where}{lines[-1].strip()}"


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
  fail(_config_error(sys.argv, e))
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and outputs (default: runs/<config name>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "compile"], "What to do.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export target (default: <workdir>/hf).")
_ALLOW_INITIAL_POLICY = flags.DEFINE_bool(
    "allow_initial_policy", False, "--mode=eval/export on a workdir without a checkpoint: use the initial policy "
    "(otherwise that is an error: a mistyped workdir would evaluate the untrained model).")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir although the config differs from its run's in keys that change "
    "what a step computes (algorithm, model shape, loss, rollouts, data, optimizer, seed).")
flags.DEFINE_bool("verbose", False, "Show the traceback of a user-facing error (also TRAPO_VERBOSE=1).")
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
    fail(_config_error(argv, e))


def enable_compilation_cache() -> None:
  """Keeps compiled programs on disk (JAX_COMPILATION_CACHE_DIR, default ~/.cache/trapo_jax/xla): a second run of
  the same shapes, or the next point of a sweep, starts without compiling."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/trapo_jax/xla"))


def loaded_config() -> ml_collections.ConfigDict:
  """--config's ConfigDict as loaded (not yet validated), or a one-line error when the file gave none."""
  cfg = _CONFIG.value
  if not isinstance(cfg, ml_collections.ConfigDict):
    fail(f"config error: --config: cannot load {config_flags.get_config_filename(flags.FLAGS['config'])}")
  return cfg


def load_config() -> ml_collections.ConfigDict:
  """The validated config; multi-process runs are initialised first (validation counts global devices)."""
  import jax
  from trapo_jax import distributed
  cfg = loaded_config()
  if "distributed" in cfg and isinstance(cfg.distributed, ml_collections.ConfigDict):
    distributed.initialize(cfg.distributed)
  try:
    config_lib.validate(cfg, num_devices=jax.device_count())
  except config_lib.ConfigError as e:
    fail(f"config error: {e}")
  return cfg


def evaluate_policy(ctx, params, name: str, *, subdir: bool) -> dict:
  """The evaluation of a policy on eval.benchmarks, into <workdir>/eval/<name> (subdir) or <workdir>/eval."""
  from trapo_jax.eval import evaluate
  from trapo_jax.train import trainer
  out_dir = os.path.join(ctx.workdir, "eval", name) if subdir else os.path.join(ctx.workdir, "eval")
  return evaluate.evaluate(ctx.cfg, params, ctx.model_cfg, ctx.tokenizer, ctx.sampler, out_dir=out_dir,
                           data_dir=trainer.data_dir(ctx.cfg, ctx.workdir))


def default_workdir() -> str:
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))[0]
  return os.path.join("runs", name)


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _MODE.value == "compile":
    compile_run()
    return
  enable_compilation_cache()
  cfg = load_config()
  workdir = _WORKDIR.value or default_workdir()
  logging.info("mode=%s workdir=%s", _MODE.value, workdir)
  import jax
  from trapo_jax.eval import evaluate
  from trapo_jax.train import trainer
  try:
    if _MODE.value == "train":
      results = trainer.run(cfg, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                            evaluate=functools.partial(evaluate_policy, subdir=True))
      if "preempted" in results:
        logging.warning("exiting with %d so that a scheduler requeues the run", errors.EXIT_PREEMPTED)
        sys.exit(errors.EXIT_PREEMPTED)
      if "before" in results and "after" in results and jax.process_index() == 0:
        print(evaluate.before_after_table(results["before"], results["after"]))
    elif _MODE.value == "eval":
      ctx, params = trainer.load_policy_for_inference(cfg, workdir, allow_initial_policy=_ALLOW_INITIAL_POLICY.value)
      results = evaluate_policy(ctx, params, "", subdir=False)
      if jax.process_index() == 0:
        print(evaluate.markdown_table(results))
    else:
      trainer.export(cfg, workdir, _EXPORT_DIR.value or os.path.join(workdir, "hf"),
                     allow_initial_policy=_ALLOW_INITIAL_POLICY.value)
  except config_lib.ConfigError as e:  # found late, e.g. a checkpoint with fewer positions than a sequence
    fail(f"config error: {_reason(str(e))}")
  except errors.UserError as e:
    fail(f"error: {_reason(str(e))}")
  except trainer.TrainingError as e:
    fail(f"training error: {_reason(str(e))}")


def declared_layers(cfg: ml_collections.ConfigDict) -> int:
  """The model's depth as the config file sets it, before the command line's overrides: --mode=compile with
  --config.model.num_layers lower extrapolates to it."""
  flag = flags.FLAGS["config"]
  if "model.num_layers" not in config_flags.get_override_values(flag):
    return cfg.model.num_layers
  return flag.parser.parse(config_flags.get_config_filename(flag)).model.num_layers


def compile_run() -> None:
  """--mode=compile: no cache (the compile times are measured), no data, no weights, no distributed start."""
  from trapo_jax import aot
  cfg = loaded_config()
  try:
    aot.prepare(_TOPOLOGY.value)
    aot.run(cfg, _TOPOLOGY.value, all_methods=_ALL_METHODS.value, depth=declared_layers(cfg))
  except config_lib.ConfigError as e:
    fail(f"config error: {e}")
  except aot.CompileError as e:
    fail(str(e))


def entry() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  entry()
