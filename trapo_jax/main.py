r"""trapo_jax entry point.

  python -m trapo_jax.main                                  # the default experiment (synthetic task, CPU)
  python -m trapo_jax.main --config=experiments/configs/trapo_qwen25_math_7b.py \
      --workdir=gs://bucket/run1 --config.model.hf_dir=/path/to/Qwen2.5-Math-7B
  python -m trapo_jax.main --mode=eval --workdir=...         # evaluate the workdir's latest checkpoint
  python -m trapo_jax.main --mode=export --workdir=...       # write the policy as a Hugging Face directory
  python -m trapo_jax.main --mode=compile --topology=v5p-32 --config=...  # does the run fit that slice? (aot.py)

Exit codes: 0 done; 2 a user-facing error (config, paths, data, checkpoints, a locked workdir), printed as one line
(`--verbose` or TRAPO_VERBOSE=1 adds the traceback); 143 stopped by SIGTERM, 130 by Ctrl-C, after saving a
checkpoint when training (rerun to resume; a second Ctrl-C aborts without saving); 3 another process of a
multi-process run was lost (one line names it; rerun to resume); anything else (1) is a crash, with its traceback.
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

# Before transformers is imported (by the tokenizer's loading): its import-time advice that PyTorch is missing is for
# users of its models; this project only uses its tokenizers and config classes.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from trapo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from trapo_jax import errors  # pylint: disable=g-import-not-at-top
from trapo_jax import paths  # pylint: disable=g-import-not-at-top

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
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and outputs (default: runs/<config name>, or runs/<method> with --config.algo).")
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
  """Drops the INFO chatter of checkpointing and dataset libraries, and JAX's probe of backends this machine lacks
  ("Unable to initialize backend 'tpu'" on every CPU run); warnings and errors still show."""

  NOISY = ("/orbax/", "/tensorflow_datasets/", "/etils/", "/jax/_src/xla_bridge.py")
  # Warnings that are no news: TFDS names every builder config that is not one of its builder's own (ours never are).
  EXPECTED = ("Using custom data configuration",)

  def filter(self, record) -> bool:
    if record.levelno < py_logging.WARNING:
      return not any(s in record.pathname for s in self.NOISY)
    return not (record.levelno == py_logging.WARNING and str(record.msg).startswith(self.EXPECTED))


class _BetweenBars(py_logging.Handler):
  """absl's log lines written with tqdm.write: a line logged while a progress bar is open (training, evaluation) goes
  above the bar instead of being glued to it."""

  def __init__(self):
    super().__init__()
    self.setFormatter(logging.PythonFormatter())

  def emit(self, record) -> None:
    import tqdm
    try:
      tqdm.tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def use_quiet_logging() -> None:
  """Replaces absl's handler of the root logger by _BetweenBars, without the libraries' chatter."""
  root = py_logging.getLogger()
  root.removeHandler(logging.get_absl_handler())
  handler = _BetweenBars()
  handler.addFilter(_QuietLibraries())
  root.addHandler(handler)


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


def _config_file_given(argv: list[str]) -> bool:
  """Whether the command line names a config file (`--config=FILE` or `--config FILE`), not only overrides."""
  return any(re.match(r"^--?config(=|$)", arg) for arg in argv)


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config this mode runs with, not yet validated.

  Training: --config (default experiments/configs/default.py) with the `--config.key=` overrides. Eval and export:
  the workdir's stored config (the training run's own, `<workdir>/config.json`) with the command line's
  `--config.key=` overrides on top, and `distributed.*` from the command line alone; a config file named on the
  command line replaces the stored one; a workdir without one (written before configs were stored) uses --config as
  training does."""
  cfg = loaded_config()
  if _MODE.value not in ("eval", "export"):
    return cfg
  from trapo_jax.train import workdir as workdir_lib
  try:
    stored = workdir_lib.stored_config(workdir)
  except errors.UserError as e:
    fail(f"error: {e}")
  if stored is None:
    return cfg
  if _config_file_given(sys.argv):
    logging.warning("using --config=%s, not the run's own %s/%s", config_flags.get_config_filename(
        flags.FLAGS["config"]), workdir, workdir_lib.CONFIG_NAME)
    return cfg
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  try:
    stored.update_from_flattened_dict(overrides)
  except (KeyError, TypeError, AttributeError) as e:  # a key the stored config lacks, a value of another type
    fail(f"config error: {workdir}/{workdir_lib.CONFIG_NAME}: {_reason(str(e)) or type(e).__name__}")
  # How this process joins its job is this command's: the training run's processes and coordinator are gone.
  stored.distributed = ml_collections.ConfigDict(cfg.distributed.to_dict())
  logging.info("the run's config %s/%s%s", workdir, workdir_lib.CONFIG_NAME,
               f", with {', '.join(sorted(overrides))} from the command line" if overrides else "")
  return stored


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The validated config; multi-process runs are initialised first (validation counts global devices)."""
  import jax
  from trapo_jax import distributed
  cfg = run_config(workdir)
  try:
    if "distributed" in cfg and isinstance(cfg.distributed, ml_collections.ConfigDict):
      distributed.initialize(cfg.distributed)
    config_lib.validate(cfg, num_devices=jax.device_count())
  except config_lib.ConfigError as e:
    fail(f"config error: {e}")
  return cfg


def evaluate_policy(ctx, params, name: str) -> dict:
  """The evaluation of a policy on eval.benchmarks, into <workdir>/eval/<name>."""
  from trapo_jax.eval import evaluate
  from trapo_jax.train import trainer
  out_dir = paths.join(ctx.workdir, "eval", name)
  return evaluate.evaluate(ctx.cfg, params, ctx.model_cfg, ctx.tokenizer, ctx.sampler, out_dir=out_dir,
                           data_dir=trainer.data_dir(ctx.cfg, ctx.workdir))


def default_workdir() -> str:
  return workdir_for(config_flags.get_config_filename(flags.FLAGS["config"]),
                     config_flags.get_override_values(flags.FLAGS["config"]))


def workdir_for(config_file: str, overrides: dict) -> str:
  """runs/<config name>, or runs/<method> where the command line names the method (`--config.algo=grpo` on
  default.py): two methods run from one config file never share a workdir."""
  name = os.path.splitext(os.path.basename(config_file))[0]
  return os.path.join("runs", overrides.get("algo") or name)


def main(argv: list[str]) -> None:
  use_quiet_logging()
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if _MODE.value == "compile":
    compile_run()
    return
  enable_compilation_cache()
  workdir = _WORKDIR.value or default_workdir()
  cfg = load_config(workdir)
  logging.info("mode=%s workdir=%s", _MODE.value, workdir)
  import jax
  from trapo_jax.eval import evaluate
  from trapo_jax.train import trainer
  try:
    if _MODE.value == "train":
      results = trainer.run(cfg, workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
                            evaluate=evaluate_policy)
      if "preempted" in results:
        logging.warning("exiting with %d: rerun the same command to resume", results["exit_code"])
        sys.exit(results["exit_code"])
      if "before" in results and "after" in results and jax.process_index() == 0:
        print(evaluate.before_after_table(results["before"], results["after"]))
    elif _MODE.value == "eval":
      ctx, params, step = trainer.load_policy_for_inference(cfg, workdir,
                                                            allow_initial_policy=_ALLOW_INITIAL_POLICY.value)
      results = evaluate_policy(ctx, params, f"step_{step}")  # the name a training run gives its evaluation there
      if jax.process_index() == 0:
        print(evaluate.markdown_table(results))
    else:
      trainer.export(cfg, workdir, _EXPORT_DIR.value or paths.join(workdir, "hf"),
                     allow_initial_policy=_ALLOW_INITIAL_POLICY.value)
  except config_lib.ConfigError as e:  # found late, e.g. a checkpoint with fewer positions than a sequence
    fail(f"config error: {_reason(str(e))}")
  except errors.UserError as e:
    fail(f"error: {_reason(str(e))}")
  except errors.TrainingError as e:
    fail(f"training error: {_reason(str(e))}")
  except KeyboardInterrupt:  # Ctrl-C outside the training loop (loading, compiling, evaluating): nothing to save
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_INTERRUPTED)


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
  try:
    app.run(main, flags_parser=parse_flags)
  except SystemExit as e:
    from trapo_jax import distributed
    distributed.exit_code_hook(e.code)  # a multi-process error exit also stops the peers, at once
    raise


if __name__ == "__main__":
  entry()
