"""Orbax checkpoints in `<workdir>/checkpoints`: the train state plus a JSON record (data position, config)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from trapo_jax.train import state as state_lib


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, every: int):
    self.every = every
    self.manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
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
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_lib.abstract_state(template)), meta=ocp.args.JsonRestore()))
    logging.info("restored checkpoint of step %d", step)
    return restored.state, dict(restored.meta)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(workdir: str, template: state_lib.TrainState) -> tuple[Any, int]:
  """The params of the workdir's latest checkpoint (for eval/export)."""
  ck = Checkpointer(workdir, keep=1_000_000, every=1)
  step = ck.latest_step()
  if step is None:
    raise FileNotFoundError(f"{os.path.join(workdir, 'checkpoints')}: no checkpoint")
  state, _ = ck.restore(template, step)
  ck.close()
  return state.params, step
