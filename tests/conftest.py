"""Every test process sees 8 simulated CPU devices, so sharded paths run on a (2, 2, 2) mesh.

Compiled programs go to a persistent cache shared by the whole session (subprocesses included): the end-to-end
tests build the same tiny model many times, and compiling dominates their run time on CPU.
"""

import os
import tempfile

# Compiling is most of the suite's time, so XLA:CPU compiles cheaply every program the tests compile, here and in the
# processes they start (tests/helpers.py cpu_env); XLA's HLO passes are a run's. A developer's own XLA_FLAGS are kept.
# - The backend at optimization level 0: a tiny run's 81 programs compile in 32 s instead of 44, metrics bit-identical.
# - Its elemental emitters instead of the fusion emitters: a tiny GRPO run's programs compile in 3.5 s instead of 8.0.
#   Values differ in their last bits: a fused loop's rounding then depends on what it is fused with, so the same math
#   in two programs may disagree in the last bit. The one test that holds two programs to the same bits runs under
#   the default emitters (helpers.rerun_with_fusion_emitters). The flag is the pinned jaxlib's (requirements.txt): a
#   jaxlib without it refuses to start, and then it goes from here.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
if "--xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
if "--xla_cpu_use_fusion_emitters" not in _flags:
  _flags += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "trapo_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """The modules with an end-to-end test (marked slow) first, then the others, each group in collection order.

  pytest.ini's `--dist loadfile --no-loadscope-reorder` hands modules to the workers in this order: the runs of
  minutes start early and the short modules fill in behind them. xdist's own order (most tests first) left the
  2-process test, a module of 2 tests, to start last and run alone for 4 minutes while the other worker idled.
  """
  del config
  slow = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow)  # stable: collection order within each group


@pytest.fixture(scope="module")
def gcs_env():
  """A local GCS API server (tests/gcs.py) for a test module (a fresh bucket: one module's leftovers, such as the
  connections of a killed run, never reach the next), with this process's environment pointed at it; the
  variables (a dict) are for the processes a test starts."""
  from tests import gcs
  with gcs.emulator() as env:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
      yield env
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
