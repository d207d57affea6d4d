"""Schedules of the optimizer step that methods use for weights and prefix sizes (docs/algorithm.md), each the
official function, pure and host-side."""

from __future__ import annotations

import math


def chord_mu(step: int, warmup: int, decay: int, peak: float, valley: float) -> float:
  """CHORD's mu (Trinity-RFT `chord_policy_loss.py:mu_schedule_function`): linear from 0 to `peak` over `warmup`
  steps, then a cosine from `peak` to `valley` over `decay` steps, then `valley`."""
  if step < warmup:
    return step / warmup * peak
  if step >= warmup + decay:
    return valley
  return (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay)) + valley


def cosine_bound(step: int, init: float, target: float, steps: int, warmup: int = 0) -> float:
  """A Prefix-RFT ratio bound (prefix_rft `scheduler/global_step.py`: `CosineDecayController.value`, and
  `ConstController` when init == target): linear from 0 to `init` over `warmup` steps, then a cosine from `init` to
  `target` over `steps` steps, then `target`."""
  if init == target:
    return init
  if step < warmup:
    return step / warmup * init
  after = step - warmup
  if after > steps:
    return target
  return target + 0.5 * (1 + math.cos(math.pi * after / steps)) * (init - target)


def uft_hint_prob(t: int, t_hint: int, low: float, high: float) -> float:
  """UFT's probability of keeping each hint segment at training step t (1-based, as the official dataset's
  `timestep`; UFT `rl_dataset.py:RLHFDataset.__getitem__`): low + (high - low) (1 + cos(pi t / T_hint)) / 2, and 0
  (no hint) once t > T_hint."""
  if t > t_hint:
    return 0.0
  return low + 0.5 * (high - low) * (1 + math.cos(math.pi * t / t_hint))
