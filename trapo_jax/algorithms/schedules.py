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


# Prefix-RFT's step controllers (prefix_rft `scheduler/global_step.py`: `CTRL_MAPPING`), by their official names, with
# the defaults of their classes' __init__ (init, target, n_steps, warmup_ratio).
CONTROLLERS = ("const", "linear_decay", "cosine_decay")
CONTROLLER_DEFAULTS = {"const": (0.0, 0.0, 10000, 0.0), "linear_decay": (1.0, 0.0, 10000, 0.1),
                       "cosine_decay": (0.1, 1.0, 10000, 0.0)}


def controller(kind: str, global_step: int, init: float, target: float, n_steps: int, warmup_ratio: float) -> float:
  """`CTRL_MAPPING[kind](init, target, n_steps, warmup_ratio).value(global_step=global_step)`, the official formulas
  to the comparison: "const" is `init` whatever the step; "linear_decay" and "cosine_decay" rise linearly from 0 to
  `init` over int(warmup_ratio * n_steps) steps, then go from `init` to `target` over `n_steps` steps, linearly (at
  and after n_steps: `target`) or by a half cosine (after n_steps: `target`), then stay at `target`."""
  if kind == "const":
    return init
  if kind not in ("linear_decay", "cosine_decay"):
    raise ValueError(f"controller {kind!r} is unknown (known: {', '.join(CONTROLLERS)})")
  warmup = int(n_steps * warmup_ratio)
  if global_step < warmup:
    return global_step / warmup * init
  after = global_step - warmup
  if kind == "linear_decay":
    if after >= n_steps:
      return target
    return target + (1.0 - after / n_steps) * (init - target)
  if after > n_steps:
    return target
  decay = 0.5 * (1 + math.cos(math.pi * after / n_steps))  # 1 -> 0 over n_steps
  if init > target:
    return target + decay * (init - target)
  return init + (1 - decay) * (target - init)  # the class's "rise" mode: the same curve read from init up


# Learning-rate schedules after the warm-up: the RL runs' constant one, and OpenRLHF's SFT default.
LR_SCHEDULES = ("constant", "cosine_with_min_lr")


def cosine_with_min_lr(step: int, warmup: int, total: int, min_ratio: float) -> float:
  """The learning-rate factor of OpenRLHF's SFT (`train_sft.py`: transformers' `get_scheduler("cosine_with_min_lr",
  num_warmup_steps=warmup, num_training_steps=total, min_lr=0.1 x lr)`) at 0-based optimizer step `step` (LambdaLR
  steps after each update, so update k uses the factor of k): step / max(1, warmup) during the warm-up, then
  min_ratio + (1 - min_ratio) x (1 + cos(pi x progress)) / 2, progress = (step - warmup) / max(1, total - warmup),
  floored at 0."""
  if step < warmup:
    return step / max(1, warmup)
  progress = (step - warmup) / max(1, total - warmup)
  return max(0.0, min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def uft_hint_prob(t: int, t_hint: int, low: float, high: float) -> float:
  """UFT's probability of keeping each hint segment at training step t (1-based, as the official dataset's
  `timestep`; UFT `rl_dataset.py:RLHFDataset.__getitem__`): low + (high - low) (1 + cos(pi t / T_hint)) / 2, and 0
  (no hint) once t > T_hint."""
  if t > t_hint:
    return 0.0
  return low + 0.5 * (high - low) * (1 + math.cos(math.pi * t / t_hint))
