"""Multi-process start-up: one process per host (TPU pods) or per GPU node, or several local CPU processes.

A process that dies must stop the others within `distributed.heartbeat_timeout_s`, with one line naming it. JAX's
own heartbeat cannot do that: its service aborts every process with a C++ stack (and a Python one) and the Python
callback that could replace the abort is not reachable from `jax.distributed.initialize`. So each process runs a
watchdog thread that beats a counter in the coordination service's key-value store and reads everyone's; a peer
whose counter stops moving (kill -9, a lost host) or that says it failed ends this process with one line and
EXIT_PROCESS_LOST. JAX's heartbeat stays as the backstop, at four times the timeout: its clients beat every half
of its timeout, so the service may find a peer dead as early as half its timeout after the peer died, and at twice
ours it raced the watchdog (a peer lost 10 s in, the survivor aborted at 12.5 s before the watchdog's line).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import jax
from absl import logging

from trapo_jax import errors

_BEATS = "trapo_jax/beat/"  # /<process>: a counter while alive; DONE after a clean exit, FAILED after an error
DONE, FAILED = "done", "failed"


def initialize(dist_cfg) -> None:
  """Calls `jax.distributed.initialize` when `distributed.enabled`; before any other JAX call.

  On TPU pods the coordinator, process count and id come from the environment (leave them unset). For GPU or
  CPU processes set `coordinator_address`, `num_processes` and `process_id` (flags or the variables
  TRAPO_COORDINATOR, TRAPO_NUM_PROCESSES, TRAPO_PROCESS_ID, which win over the config).
  """
  if not dist_cfg.enabled:
    return
  address = os.environ.get("TRAPO_COORDINATOR", dist_cfg.coordinator_address)
  kwargs = {}
  if address:
    kwargs = dict(coordinator_address=address,
                  num_processes=int(os.environ.get("TRAPO_NUM_PROCESSES", dist_cfg.num_processes)),
                  process_id=int(os.environ.get("TRAPO_PROCESS_ID", dist_cfg.process_id)))
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    # CPU collectives across processes need gloo (tests and laptops).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = dist_cfg.heartbeat_timeout_s
  errors.require(timeout >= 1, "distributed.heartbeat_timeout_s", "must be >= 1")
  jax.distributed.initialize(**kwargs, heartbeat_timeout_seconds=4 * timeout)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    _start_watchdog(timeout)


def _client():
  from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize connected
  return jax_distributed.global_state.client


class Watchdog:
  """Beats this process's counter every `timeout / 10` s (at least 1 s) and ends the process when a peer's has not
  moved for `timeout` s or says FAILED. Peers that exited cleanly (DONE) are no longer watched."""

  def __init__(self, client, me: int, count: int, timeout: float):
    self.client, self.me, self.count, self.timeout = client, me, count, timeout
    self.period = max(1.0, timeout / 10)
    self.stopped = threading.Event()
    self.beats = 0
    self.seen: dict[int, tuple[str, float]] = {}  # peer -> (its last value, when it last changed on our clock)

  def beat(self, value: str | None = None) -> None:
    self.beats += 1
    self.client.key_value_set(f"{_BEATS}{self.me}", value or str(self.beats), allow_overwrite=True)

  def lost(self, now: float) -> str | None:
    """A one-line reason to stop (a peer FAILED or silent for `timeout` s), or None."""
    values = {int(k.rsplit("/", 1)[-1]): v for k, v in self.client.key_value_dir_get(_BEATS)}
    for peer in range(self.count):
      if peer == self.me:
        continue
      value = values.get(peer, "")
      last = self.seen.get(peer)
      if last is None or last[0] != value:
        self.seen[peer] = (value, now)
      if value == FAILED:
        return f"process {peer} of {self.count} stopped with an error (see its log)"
      if value != DONE and now - self.seen[peer][1] > self.timeout:
        return f"process {peer} of {self.count} was lost (no heartbeat for {self.timeout:g} s)"
    return None

  def run(self) -> None:
    while not self.stopped.wait(self.period):
      try:
        self.beat()
        why = self.lost(time.monotonic())
      except Exception as e:  # the coordination service (process 0) is gone
        why = (f"process 0 of {self.count} (the coordinator) was lost ({str(e).strip().splitlines()[0]})"
               if self.me else f"the coordination service failed ({str(e).strip().splitlines()[0]})")
      if why is not None and not self.stopped.is_set():
        stop_now(f"error: {why}; stopping process {self.me}. Rerun the same command to resume from the last "
                 f"checkpoint.", errors.EXIT_PROCESS_LOST, tell_peers=False)

  def stop(self, value: str) -> None:
    """Stops beating and leaves `value` (DONE or FAILED) for the peers."""
    self.stopped.set()
    try:
      self.beat(value)
    except Exception:  # the service is already gone: the peers learn it from their own watchdogs
      pass


_watchdog: Watchdog | None = None


def _start_watchdog(timeout: float) -> None:
  global _watchdog
  _watchdog = Watchdog(_client(), jax.process_index(), jax.process_count(), timeout)
  _watchdog.beat()
  threading.Thread(target=_watchdog.run, name="trapo_jax-watchdog", daemon=True).start()
  # Registered after jax's own shutdown hook, so it runs first: DONE before the shutdown barrier.
  atexit.register(lambda: _watchdog.stopped.is_set() or _watchdog.stop(DONE))
  sys.excepthook = _excepthook(sys.excepthook)


def _excepthook(default):
  """A crash: a collective that failed because a peer died waits for the watchdog to name the peer (one line
  instead of a traceback); any other crash keeps its traceback and tells the peers to stop."""
  def hook(kind, value, tb):
    if issubclass(kind, KeyboardInterrupt):  # Ctrl-C reaches every process: each ends on its own
      return default(kind, value, tb)
    if _watchdog is not None and isinstance(value, jax.errors.JaxRuntimeError):
      _watchdog.stopped.wait(_watchdog.timeout + 2 * _watchdog.period)  # stop_now exits the process meanwhile
    default(kind, value, tb)
    stop_now(None, 1)
  return hook


def stop_now(message: str | None, code: int, *, tell_peers: bool = True) -> None:
  """Ends this process at once with `code`, after `message` (one line on stderr): no shutdown barrier that would
  wait for peers that are gone or still running; with `tell_peers` the others stop too, naming this process."""
  if message is not None:
    import tqdm
    tqdm.tqdm.write(message, file=sys.stderr)  # a line of its own, not glued behind an open progress bar
  if _watchdog is not None and tell_peers:
    _watchdog.stop(FAILED)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def exit_code_hook(code) -> None:
  """For SystemExit(code) of a multi-process run: an error exit ends this process at once and the peers with it.
  Not a signal's exit (143 SIGTERM, 130 Ctrl-C): every process receives the signal and saves and exits together."""
  if _watchdog is not None and code not in (0, None) and not (isinstance(code, int) and code >= 128):
    stop_now(None, code if isinstance(code, int) else 1)


def process_zero_first(fn, name: str):
  """Runs `fn` on process 0, then on the others: shared outputs (a dataset prepared on a shared disk) are made once."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"trapo_jax:{name}")
  return result if jax.process_index() == 0 else fn()
