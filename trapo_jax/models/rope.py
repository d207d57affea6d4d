"""Rotary position embeddings (RoPE) and the frequency scalings that long-context checkpoints declare.

A `RopeScaling` is the `rope_scaling` block of a Hugging Face config.json; each RoPE type is one small function of it
that returns the inverse frequencies [head_dim / 2] and the factor on cos and sin. The formulas are those of
transformers' `modeling_rope_utils` (tests/test_model.py holds every type to it). The table depends on the config
alone, so it is computed once on the host in float64 and enters the graph as an fp32 constant.

Types whose frequencies change with the length of the current input (`dynamic`, `longrope`) are not here: keys
already in a KV cache would disagree with the queries that read them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """A config.json's `rope_scaling` (`rope_parameters` without `rope_theta` since transformers 5).

  Each type reads only its own keys (`KEYS`); the others keep their defaults, so two equal scalings compare equal.
  """
  rope_type: str = "default"  # default | linear | llama3 | yarn
  factor: float = 1.0  # linear, llama3, yarn: how much longer the extended context is
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  original_max_position_embeddings: int = 0  # llama3, yarn: the pretraining context
  beta_fast: float = 32.0  # yarn: rotations bounding the extrapolated (high-frequency) dimensions
  beta_slow: float = 1.0  # yarn: rotations bounding the interpolated (low-frequency) dimensions
  attention_factor: float = 0.0  # yarn: the factor on cos/sin; 0 = derived from `factor`

  def __post_init__(self):
    if self.rope_type not in TYPES:
      raise ValueError(f"rope_scaling.rope_type: {self.rope_type!r} is not supported (supported: {', '.join(TYPES)})")
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor: must be > 0, got {self.factor}")
    if "original_max_position_embeddings" in KEYS[self.rope_type] and self.original_max_position_embeddings < 1:
      raise ValueError(f"rope_scaling.original_max_position_embeddings: {self.rope_type} needs the pretraining "
                       f"context (>= 1), got {self.original_max_position_embeddings}")
    if self.rope_type == "llama3" and not self.low_freq_factor < self.high_freq_factor:
      raise ValueError(f"rope_scaling.high_freq_factor: must exceed low_freq_factor={self.low_freq_factor}, "
                       f"got {self.high_freq_factor}")


def _inv_freq(head_dim: int, theta: float) -> np.ndarray:
  return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def default(s: RopeScaling, head_dim: int, theta: float) -> tuple[np.ndarray, float]:
  return _inv_freq(head_dim, theta), 1.0


def linear(s: RopeScaling, head_dim: int, theta: float) -> tuple[np.ndarray, float]:
  """Position interpolation: every frequency divided by `factor`."""
  return _inv_freq(head_dim, theta) / s.factor, 1.0


def llama3(s: RopeScaling, head_dim: int, theta: float) -> tuple[np.ndarray, float]:
  """Llama 3.1: wavelengths above original/low_freq_factor are divided by `factor`, those below
  original/high_freq_factor are kept, and the band between is a linear blend in original/wavelength."""
  inv = _inv_freq(head_dim, theta)
  wavelen = 2 * math.pi / inv
  orig = s.original_max_position_embeddings
  smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  blended = (1 - smooth) * inv / s.factor + smooth * inv
  out = np.where(wavelen > orig / s.low_freq_factor, inv / s.factor, blended)
  return np.where(wavelen < orig / s.high_freq_factor, inv, out), 1.0


def yarn(s: RopeScaling, head_dim: int, theta: float) -> tuple[np.ndarray, float]:
  """YaRN: dimensions that turn more than `beta_fast` times over the original context keep their frequency, those
  turning less than `beta_slow` times are interpolated (divided by `factor`), with a linear ramp between; cos and sin
  are scaled by 0.1 ln(factor) + 1 unless `attention_factor` says otherwise."""
  inv = _inv_freq(head_dim, theta)

  def dim_of(rotations):  # the (fractional) dimension index that turns `rotations` times over the original context
    return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low = max(math.floor(dim_of(s.beta_fast)), 0)
  high = min(math.ceil(dim_of(s.beta_slow)), head_dim - 1)
  ramp = np.clip((np.arange(head_dim // 2) - low) / ((high - low) or 0.001), 0.0, 1.0)
  scale = s.attention_factor or (0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
  return inv / s.factor * ramp + inv * (1 - ramp), scale


_Type = Callable[[RopeScaling, int, float], tuple[np.ndarray, float]]
TYPES: dict[str, _Type] = {"default": default, "linear": linear, "llama3": llama3, "yarn": yarn}
KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"),
}
_OPTIONAL = {"beta_fast", "beta_slow", "attention_factor"}


def frequencies(s: RopeScaling, head_dim: int, theta: float) -> tuple[np.ndarray, float]:
  """(inverse frequencies [head_dim / 2] float64, factor on cos/sin) of a scaling."""
  return TYPES[s.rope_type](s, head_dim, theta)


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scaling: RopeScaling = RopeScaling()) -> tuple[jax.Array, jax.Array]:
  """positions [B, T] -> sin, cos [B, T, head_dim] (fp32), halves repeated as in `rotate_half` RoPE."""
  inv_freq, scale = frequencies(scaling, head_dim, theta)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.sin(freqs) * scale, jnp.cos(freqs) * scale


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """x [B, T, H, Dh] rotated by sin/cos [B, T, Dh]."""
  half = x.shape[-1] // 2
  x32 = x.astype(jnp.float32)
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def from_hf(params: dict, max_position_embeddings: int) -> RopeScaling:
  """A config.json's rope block (transformers-normalised: `rope_type` set, `rope_theta` inside) -> RopeScaling.

  Raises ValueError naming `rope_scaling.<key>` for a type or a key this module does not implement.
  """
  rope_type = params.get("rope_type") or params.get("type") or "default"
  if rope_type not in TYPES:
    raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported (supported: {', '.join(TYPES)})")
  keys = KEYS[rope_type]
  for key, value in params.items():
    harmless = (key in ("rope_type", "type", "rope_theta") or value is None
                or (key == "partial_rotary_factor" and value == 1.0) or (key == "truncate" and value is True))
    if key not in keys and not harmless:
      raise ValueError(f"rope_scaling.{key}={value!r} is not supported for rope_type {rope_type!r}")
  values = {k: params[k] for k in keys if params.get(k) is not None}
  if rope_type == "yarn" and "factor" not in values and values.get("original_max_position_embeddings"):
    values["factor"] = max_position_embeddings / values["original_max_position_embeddings"]  # as transformers
  missing = [k for k in keys if k not in values and k not in _OPTIONAL]
  if missing:
    raise ValueError(f"rope_scaling.{missing[0]}: required for rope_type {rope_type!r}")
  fields = {f.name: f.type for f in dataclasses.fields(RopeScaling)}
  return RopeScaling(rope_type, **{k: int(v) if fields[k] == "int" else float(v) for k, v in values.items()})


def to_hf(s: RopeScaling, theta: float) -> dict:
  """The transformers `rope_parameters` of a scaling: its type's keys only (a derived attention factor left out)."""
  out = {"rope_type": s.rope_type, "rope_theta": theta}
  out.update({k: getattr(s, k) for k in KEYS[s.rope_type] if not (k == "attention_factor" and not s.attention_factor)})
  return out
