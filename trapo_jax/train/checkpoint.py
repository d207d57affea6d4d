"""Orbax checkpoints in `<workdir>/checkpoints`: the train state plus a JSON record (data position, run identity).

A checkpoint that does not restore (a truncated array file, a missing `_METADATA`) is reported in one line and the
next older one is tried; a training run moves the broken ones aside into `<workdir>/unreadable_checkpoints/`, so
that it saves those steps again.
"""

from __future__ import annotations

import logging as logging_std
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from trapo_jax import errors
from trapo_jax import paths
from trapo_jax.train import state as state_lib

UNREADABLE_DIR = "unreadable_checkpoints"
_MAX_REASON_CHARS = 300


class CheckpointError(errors.UserError):
  """No checkpoint of a workdir can be used; the message names the workdir and what to do."""


class NoCheckpoint(CheckpointError):
  pass


def reason(error: BaseException) -> str:
  """One line for a restore failure: the innermost cause's first line (orbax wraps TensorStore's message)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS] + "..."


def _from_orbax(tb) -> bool:
  while tb is not None:
    if "orbax" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _OrphanedReadFilter(logging_std.Filter):
  """Drops asyncio's "exception was never retrieved" records of orbax's abandoned reads."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and "never retrieved" in record.getMessage() and _from_orbax(error.__traceback__))


def _silence_orphaned_reads() -> None:
  """Drops the stderr tracebacks of orbax's orphaned reads, once a read has failed.

  When one array of a checkpoint fails to read, orbax raises the first error and abandons the sibling reads; each
  one, collected later (often at exit), prints its own error and a TensorStore spec: through asyncio's logger (a
  future whose exception was never retrieved) or sys.unraisablehook (a coroutine that never finished). The failure
  is already reported in one line (`_unreadable`), so only those are filtered; anything else gets through.
  """
  previous = sys.unraisablehook
  if getattr(previous, "trapo_jax_filter", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is None or "orbax" not in code.co_filename:
      previous(unraisable)

  hook.trapo_jax_filter = True
  sys.unraisablehook = hook
  logging_std.getLogger("asyncio").addFilter(_OrphanedReadFilter())


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, every: int, create: bool = True):
    self.every = every
    self.workdir = workdir
    self.directory = paths.absolute(paths.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: state_lib.TrainState, meta: dict, *, force: bool = False) -> bool:
    if not force and step % self.every:
      return False
    if step in self.manager.all_steps():
      return False
    saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)), force=True)
    if saved:
      logging.info("checkpoint saved at step %d", step)
    return saved

  def restore(self, template: state_lib.TrainState, step: int | None = None) -> tuple[state_lib.TrainState, dict]:
    """Restores onto the shardings of `template` (an initialised state)."""
    step = self.latest_step() if step is None else step
    meta = self.restore_meta(step)
    return self._restore_state(template, step), meta

  def restore_meta(self, step: int) -> dict:
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def _restore_state(self, template: state_lib.TrainState, step: int) -> state_lib.TrainState:
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_lib.abstract_state(template))))
    logging.info("restored checkpoint of step %d", step)
    return restored.state

  def restore_newest(self, template: state_lib.TrainState, *, check_meta: Callable[[dict], None] | None = None,
                     move_unreadable: bool = False) -> tuple[state_lib.TrainState, dict] | None:
    """(state, meta) of the newest checkpoint that restores, or None if there is none.

    check_meta(meta) runs before a step's state is read and may raise (a run-identity mismatch): its error is not a
    broken checkpoint and stops the search. Steps newer than the restored one that failed are moved into
    `<workdir>/unreadable_checkpoints/` when `move_unreadable` (training), so that the run saves them again.
    Raises CheckpointError when checkpoints exist and none restores.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        failed.append(self._unreadable(step, e))
        continue
      if check_meta is not None:
        check_meta(meta)
      try:
        state = self._restore_state(template, step)
      except Exception as e:  # pylint: disable=broad-except
        failed.append(self._unreadable(step, e))
        continue
      _same_step_everywhere(step)
      if failed and move_unreadable:
        self._move_aside([s for s, _ in failed])
      return state, meta
    if failed:
      steps = ", ".join(str(s) for s, _ in failed)
      raise CheckpointError(
          f"{self.workdir}: no checkpoint restores (steps {steps}; newest: {failed[0][1]}); delete {self.directory} "
          f"to start the run afresh, or restore the files")
    return None

  def _unreadable(self, step: int, error: Exception) -> tuple[int, str]:
    _silence_orphaned_reads()
    why = reason(error)
    logging.warning("checkpoint %s/%d does not restore (%s); trying the next older one", self.directory, step, why)
    return step, why

  def _move_aside(self, steps: list[int]) -> None:
    target = paths.join(self.workdir, UNREADABLE_DIR)
    if jax.process_index() == 0:
      paths.makedirs(target)
      for step in steps:
        dest = paths.join(target, str(step))
        paths.rmtree(dest)
        paths.move(paths.join(self.directory, str(step)), dest)
        logging.warning("moved the unreadable checkpoint of step %d to %s", step, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("trapo_jax:move_unreadable_checkpoints")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _same_step_everywhere(step: int) -> None:
  """Every process must continue from the same checkpoint (a file one host cannot read would split the run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.assert_equal(np.int32(step), "processes restored different checkpoint steps")


def has_checkpoint(workdir: str) -> bool:
  """Whether `<workdir>/checkpoints` holds a finished checkpoint; creates nothing."""
  return any(name.isdigit() for name in paths.listdir(paths.join(workdir, "checkpoints")))


def restore_params(workdir: str, template: state_lib.TrainState, *,
                   check_meta: Callable[[dict], None] | None = None) -> tuple[Any, int]:
  """The params of the workdir's newest checkpoint that restores, and its step (for eval/export); creates nothing.

  Raises NoCheckpoint if there is none, CheckpointError if none restores.
  """
  if not has_checkpoint(workdir):
    raise NoCheckpoint(f"{paths.join(workdir, 'checkpoints')}: no checkpoint")
  ck = Checkpointer(workdir, keep=1_000_000, every=1, create=False)
  try:
    restored = ck.restore_newest(template, check_meta=check_meta)
  finally:
    ck.close()
  if restored is None:
    raise NoCheckpoint(f"{paths.join(workdir, 'checkpoints')}: no checkpoint")
  return restored[0].params, int(restored[0].step)

