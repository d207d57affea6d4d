"""Multi-process start-up: one process per host (TPU pods) or per GPU node, or several local CPU processes."""

from __future__ import annotations

import os

import jax
from absl import logging


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
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def process_zero_first(fn, name: str):
  """Runs `fn` on process 0, then on the others: shared outputs (a dataset prepared on a shared disk) are made once."""
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  result = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"trapo_jax:{name}")
  return result if jax.process_index() == 0 else fn()
