"""trapo_jax: Trust-Region Adaptive Policy Optimization (TRAPO) and its baselines in JAX."""

import importlib.util
import os
import sys


def _skip_an_absent_tpu() -> None:
  """Where libtpu is installed (for --mode=compile) but no TPU is attached, JAX would still start libtpu as a
  backend, which prints its own initialisation errors (`E0000 ... TPU_WORKER_HOSTNAMES`) before failing quietly:
  such a machine computes on its CPU, so JAX is told so. An explicit JAX_PLATFORMS, a TPU, or a GPU plugin beside
  libtpu leave JAX's choice alone."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")):
    return
  try:
    from jax._src import hardware_utils  # what JAX itself reads to decide whether it runs on a Cloud TPU VM
    chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
  except Exception:  # a JAX without it: keep JAX's own behaviour
    return
  if chips == 0:
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # jax reads the variable when it is imported
      sys.modules["jax"].config.update("jax_platforms", "cpu")


_skip_an_absent_tpu()
