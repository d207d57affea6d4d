"""A workdir belongs to one run: a lock file while a run trains in it, and the run's identity in its checkpoints.

Lock: `<workdir>/LOCK` holds the host, pid and start time of the training run that owns the workdir (on several
processes, process 0 holds it for all); it is created exclusively (`paths.create`: O_EXCL locally, a
generation-match create on GCS). A second run on the workdir stops with one line naming the holder. A lock left
by a process that is gone (kill -9, a crash) on this host is taken over with a warning; on another host nobody can
tell, so the line says which file to delete.

Config: `<workdir>/config.json` is the config of the training run (written by process 0 when it starts, again when it
resumes), from which `--mode=eval` and `--mode=export` start (trapo_jax/main.py says how flags change it).

Identity: the config minus `MAY_CHANGE_ON_RESUME` (budgets, cadences, evaluation, logging, paths, parallelism,
memory knobs), plus the model's shape. A key added to the config later is part of it by default. Resuming a workdir
with another identity stops with one line naming the first differing key (unless allowed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
import sys
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from trapo_jax import algorithms
from trapo_jax import errors
from trapo_jax import paths

LOCK_NAME = "LOCK"
CONFIG_NAME = "config.json"

# Config keys (or whole groups) that a resumed run may change: none of them changes what a step computes.
MAY_CHANGE_ON_RESUME = (
    "train.steps", "train.ckpt_every", "train.keep_checkpoints", "train.max_bad_steps",
    "train.dump_token_probs",
    "train.micro_batch_tokens",  # gradient accumulation: the same sums, split differently
    "train.logprob_chunk",  # chunking over T: the same log-probs
    "eval",
    "data.data_dir",  # where TFDS keeps the prepared data
    "distributed", "mesh",
    "model.hf_dir", "model.tokenizer_dir",  # paths: the checkpoint holds the weights; the shape is checked below
    "model.remat", "model.attention_block",  # memory knobs: the same math
    "rollout.one_pass",  # the same rows, sampled in one pass or stage by stage
    "rollout.gather_weights",  # the same weights, gathered once per decode or in every step
)
# ModelConfig fields that are not the model's shape (compute options).
_NOT_SHAPE = ("dtype", "param_dtype", "remat", "attention_block", "platform")


class WorkdirBusy(errors.UserError):
  """Another run holds the workdir's lock."""


class IdentityMismatch(errors.UserError):
  """The checkpoint was written by a run with another identity."""


# --- lock -------------------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid from its first owner."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(pid: int, started: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
        return False
  except (OSError, IndexError):
    pass
  now = _process_start(pid)
  return started is None or now is None or now == started


def _me() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)}


def _read(path: str) -> dict | None:
  try:
    holder = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _busy(workdir: str, path: str, holder: dict | None) -> WorkdirBusy:
  if holder is None:
    return WorkdirBusy(f"{workdir}: locked by another run (unreadable lock file {path}); delete it if no run uses "
                       f"this workdir")
  return WorkdirBusy(f"{workdir}: in use by pid {holder['pid']} on {holder.get('host')} since {holder.get('started')} "
                     f"(lock file {path}); delete it if that run is gone")


@dataclasses.dataclass
class Lock:
  path: str
  holder: dict

  def release(self) -> None:
    if _read(self.path) == self.holder:  # never remove a lock that another run has taken over since
      paths.remove(self.path)


def _set_aside(path: str, holder: dict) -> bool:
  """Removes the stale lock `holder` at `path`; False if another run took it over meanwhile.

  Locally the lock is renamed first: of two runs taking over the same stale lock, only one rename succeeds. GCS has
  no atomic rename: the lock is read again and deleted, which two runs doing so within the same instant could both
  do (only on one host: a lock is only taken over from a dead process of this host).
  """
  if paths.is_remote(path):
    if _read(path) != holder:
      return False
    paths.remove(path)
    return True
  aside = f"{path}.stale.{os.getpid()}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  if _read(aside) != holder:  # another run took it over between our read and our rename: give it back
    with contextlib.suppress(FileExistsError):
      os.link(aside, path)
    os.remove(aside)
    return False
  os.remove(aside)
  return True


def acquire(workdir: str) -> Lock:
  """Creates `<workdir>/LOCK` for this process; WorkdirBusy if a live run holds it. A dead holder's lock on this
  host is taken over with a warning."""
  path = paths.join(workdir, LOCK_NAME)
  me = _me()
  for _ in range(5):
    if paths.create(path, json.dumps(me)):
      return Lock(path, me)
    holder = _read(path)
    if holder is None or holder.get("host") != me["host"] or _alive(holder["pid"], holder.get("process_start")):
      raise _busy(workdir, path, holder)
    if _set_aside(path, holder):
      logging.warning("%s: taking over the lock of pid %d on %s (started %s), which is gone", workdir, holder["pid"],
                      holder["host"], holder.get("started"))
  raise _busy(workdir, path, _read(path))


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock for the duration (process 0 for all processes); creates the workdir."""
  paths.makedirs(workdir)
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir)
    except WorkdirBusy as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    locked = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not locked and error is None:
      error = WorkdirBusy(f"{workdir}: in use by another run (process 0 could not lock it)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


# --- the run's config -----------------------------------------------------------------------------------------


def save_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes `<workdir>/config.json` (process 0): the config eval and export of this workdir start from."""
  if jax.process_index() == 0:
    paths.write(paths.join(workdir, CONFIG_NAME), cfg.to_json(indent=2, sort_keys=True))


def _tuples(node: Any) -> Any:
  """JSON's lists back to the config's tuples."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  return tuple(_tuples(v) for v in node) if isinstance(node, list) else node


def stored_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config `save_config` wrote in the workdir, or None when there is none (a run from before it was stored)."""
  path = paths.join(workdir, CONFIG_NAME)
  if not paths.exists(path):
    return None
  try:
    return ml_collections.ConfigDict(_tuples(json.loads(paths.read_text(path))))
  except ValueError as e:
    raise errors.UserError(f"{path}: not a stored config ({e}); delete it, or give --config") from None


# --- identity ---------------------------------------------------------------------------------------------------


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(node, (ml_collections.ConfigDict, dict)):
    out = {}
    for key in node.keys():
      out.update(_flatten(node[key], f"{prefix}{key}."))
    return out
  return {prefix[:-1]: node}


def _may_change(key: str) -> bool:
  return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)


def run_identity(cfg, model_cfg) -> dict[str, Any]:
  """{dotted key: value} (JSON values) of what makes a run the same run: the config minus MAY_CHANGE_ON_RESUME and
  minus the config groups of the methods it does not run, and `model_shape.*` from the policy's ModelConfig (its
  shape as loaded, from `model.hf_dir` when set)."""
  others = tuple(f"{name}." for name in algorithms.names() if name != cfg.algo)
  identity = {k: v for k, v in _flatten(cfg).items() if not _may_change(k) and not k.startswith(others)}
  shape = {f"model_shape.{k}": v for k, v in dataclasses.asdict(model_cfg).items() if k not in _NOT_SHAPE}
  return json.loads(json.dumps({**identity, **shape}))  # as it reads back from the checkpoint


def differences(stored: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """(key, stored, current) for every key under `prefix` whose value differs (a missing key reads as '<absent>')."""
  keys = sorted(k for k in set(stored) | set(current) if k.startswith(prefix))
  pairs = ((k, stored.get(k, "<absent>"), current.get(k, "<absent>")) for k in keys)
  return [(k, was, now) for k, was, now in pairs if was != now]


def check_resume(meta: dict, current: dict, *, workdir: str, allow_change: bool = False) -> None:
  """Stops a run whose identity differs from the one of the checkpoint it would resume (IdentityMismatch)."""
  stored = meta.get("identity")
  if stored is None:  # a checkpoint from before identities were stored: only its algorithm is known
    stored = {"algo": meta["algo"]} if "algo" in meta else {}
    current = {k: v for k, v in current.items() if k in stored}
  diff = differences(stored, current)
  if not diff:
    return
  key, was, now = diff[0]
  if allow_change:
    logging.warning("%s: resuming with a changed config (--allow_config_change): %s", workdir,
                    ", ".join(k for k, _, _ in diff))
    return
  more = f" (and {len(diff) - 1} more: {', '.join(k for k, _, _ in diff[1:])})" if len(diff) > 1 else ""
  raise IdentityMismatch(f"{workdir}: the checkpoint's run has {key}={was!r}, this one {now!r}{more}; use another "
                         f"workdir, or --allow_config_change to continue this run with the new config")


def check_model(meta: dict, current: dict, *, workdir: str) -> None:
  """For eval/export: the checkpoint must hold a policy of the configured shape (IdentityMismatch)."""
  diff = differences(meta.get("identity", {}), current, "model_shape.") if "identity" in meta else []
  if diff:
    key, was, now = diff[0]
    raise IdentityMismatch(f"{workdir}: the checkpoint's policy has {key.replace('model_shape.', 'model.')}={was!r}, "
                           f"the config {now!r}; set the model config of the run that wrote it")
