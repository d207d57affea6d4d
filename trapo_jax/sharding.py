"""The device mesh (data, fsdp, tensor), logical-axis rules, and helpers to place parameters and batches on it.

Weights name their axes logically ("embed", "heads", "mlp", ...); `DEFAULT_RULES` maps those names to mesh axes.
Batches are split over (data, fsdp): every device of those two axes holds different sequences.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from trapo_jax.errors import ConfigError, require

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),  # the KV cache's heads (models/transformer.py, KVCache)
    ("activation_head_dim", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


def mesh_shape(cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) from `cfg.mesh`, a -1 entry resolved to the devices left over."""
  shape = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  require(shape.count(-1) <= 1, "mesh", f"at most one axis may be -1, got {tuple(shape)}")
  for name, s in zip(MESH_AXES, shape):
    require(s == -1 or s >= 1, f"mesh.{name}", f"must be >= 1 or -1, got {s}")
  known = int(np.prod([s for s in shape if s > 0]))
  if -1 in shape:
    require(num_devices % known == 0, "mesh", f"{tuple(shape)} cannot fill {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  require(int(np.prod(shape)) == num_devices, "mesh",
          f"shape {tuple(shape)} needs {int(np.prod(shape))} devices, {num_devices} present")
  return tuple(shape)


def make_mesh(cfg=None, devices: Sequence[jax.Device] | None = None,
              shape: tuple[int, int, int] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (all by default), shaped by `cfg.mesh` or `shape`."""
  devices = list(jax.devices() if devices is None else devices)
  if shape is None:
    shape = mesh_shape(cfg, len(devices)) if cfg is not None else (1, len(devices), 1)
  if int(np.prod(shape)) != len(devices):
    raise ConfigError(f"mesh: shape {shape} needs {int(np.prod(shape))} devices, {len(devices)} present")
  if len(devices) == len(jax.devices()) or devices[0].platform != jax.default_backend():
    # All devices (of this machine, or of a compile-only topology: trapo_jax/aot.py): let JAX order them for the
    # physical topology (ICI rings on TPU, NVLink on GPU).
    # Auto axes: XLA's partitioner propagates shardings from the inputs and the logical constraints.
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
  """Within: the model's logical activation constraints resolve against `mesh` with `rules`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(boxed: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """A tree of nn.Partitioned (real or abstract) -> the same tree of NamedShardings, boxes removed."""
  specs = nn.get_partition_spec(boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def dividing(s: NamedSharding, shape: tuple[int | None, ...]) -> NamedSharding:
  """`s` without the mesh axes that do not divide their dimension of `shape` (None: a size always padded to fit).

  E.g. 4 KV heads on tensor=8 stay whole on every device rather than fail to split.
  """
  spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
  for i, (axes, size) in enumerate(zip(spec, shape)):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if size is not None and size % int(np.prod([s.mesh.shape[a] for a in names])):
      spec[i] = None
  return NamedSharding(s.mesh, P(*spec))


def without_axis(s: NamedSharding, axis: str) -> NamedSharding:
  """`s` with mesh axis `axis` dropped from every dimension (those dimensions whole along it)."""
  def drop(entry):
    if entry is None or isinstance(entry, str):
      return None if entry == axis else entry
    kept = tuple(a for a in entry if a != axis)
    return kept or None
  return NamedSharding(s.mesh, P(*map(drop, s.spec)))


def put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays identical on every process -> global arrays with `shardings` (each device reads its slice)."""
  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(put, tree, shardings)


def put_batch(mesh: Mesh, tree: Any) -> Any:
  """This process's rows of a batch (numpy) -> global arrays sharded over (data, fsdp) on the leading axis.

  On one process the local rows are the whole batch; on several, each process passes its own consecutive share.
  """
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)), tree)


def local_batch_shards(mesh: Mesh) -> int:
  """How many different row slices this process's devices hold under `batch_sharding`."""
  return max(1, mesh.shape["data"] * mesh.shape["fsdp"] // jax.process_count())


def to_host(mesh: Mesh, tree: Any, batch_axis: int = 0) -> Any:
  """Global arrays with rows over (data, fsdp) on `batch_axis` -> this process's rows as numpy (all on one process)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils
  local = multihost_utils.global_array_to_host_local_array(tree, mesh, P(*([None] * batch_axis), BATCH_AXES))
  return jax.tree.map(np.asarray, local)


def agree_max(*values: int) -> tuple[int, ...]:
  """The elementwise max over processes of host-chosen sizes, so every process compiles the same shapes."""
  if jax.process_count() == 1:
    return tuple(int(v) for v in values)
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
  return tuple(int(v) for v in np.max(np.asarray(gathered).reshape(-1, len(values)), axis=0))
