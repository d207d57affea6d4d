"""Errors the user can act on from their message alone (a path, a config key, a data row, a checkpoint); the bottom
of the import graph, so every layer may raise them.

`python -m trapo_jax.main` prints such an error as one line, without a traceback, and exits with
`EXIT_USER_ERROR`; `--verbose` (or TRAPO_VERBOSE=1) shows the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # the command, its config, paths, data or checkpoints need fixing: rerunning alone will not help
EXIT_PROCESS_LOST = 3  # another process of a multi-process run died or failed: rerunning resumes
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by SIGTERM after saving a checkpoint; rerunning resumes
EXIT_INTERRUPTED = 130  # 128 + SIGINT: stopped by Ctrl-C (after saving a checkpoint, while training)


class UserError(Exception):
  """A problem with the command, config, paths, data or checkpoints, explained by its message."""


class ConfigError(UserError, ValueError):
  """A config key has a value that cannot work; the message starts with the key."""


class TrainingError(RuntimeError):
  """A run that cannot go on as configured (updates non-finite train.max_bad_steps times in a row, a method asking
  for what the run lacks); main prints it as one line too. Raised by the trainer and the layers it builds on."""


def require(cond: bool, key: str, msg: str) -> None:
  """Raises ConfigError("<key>: <msg>") unless `cond`."""
  if not cond:
    raise ConfigError(f"{key}: {msg}")
