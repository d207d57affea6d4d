"""Per-step metrics: JSONL + TensorBoard in the workdir (process 0 only), a progress bar, and training curves."""

from __future__ import annotations

import json
import os
from typing import Iterable

import jax
import numpy as np
import tqdm


class MetricWriter:
  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    self.bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if initial_step > 0 and os.path.exists(self.path):
      _truncate_after(self.path, initial_step)  # a resumed run redoes the steps after its checkpoint
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    # A non-finite value is left out of the row: JSON has none, and readers take a missing key as undefined.
    # It is NaN when undefined at this step (expert_prob with no prefix tokens); a non-finite loss shows in `skipped`.
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items() if np.isfinite(float(v))}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self.tb.add_scalar(k, v, step)
    self.bar.update(1)
    self.bar.set_postfix({k: f"{row[k]:.3g}" for k in ("reward/mean", "loss", "expert_prob") if k in row})

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.bar.close()


def _truncate_after(path: str, step: int) -> None:
  rows = read_jsonl(path)
  with open(path, "w") as f:
    for r in rows:
      if r["step"] <= step:
        f.write(json.dumps(r) + "\n")


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


CURVES = (("reward/mean", "reward"), ("expert_prob", "expert-token probability"), ("entropy", "entropy"),
          ("length/own", "own response length"))


def plot_curves(rows: list[dict], out_png: str, keys: Iterable[tuple[str, str]] = CURVES) -> None:
  """Training curves (and hint-level fractions) of one run's metrics rows into a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = [(k, t) for k, t in keys if any(k in r for r in rows)]
  levels = sorted({k for r in rows for k in r if k.startswith("hint_level_")})
  panels = len(keys) + (1 if levels else 0)
  fig, axes = plt.subplots(1, max(panels, 1), figsize=(4 * max(panels, 1), 3.2), squeeze=False)
  steps = np.asarray([r["step"] for r in rows])
  for ax, (k, title) in zip(axes[0], keys):
    ax.plot(steps, [r.get(k, np.nan) for r in rows])
    ax.set_title(title)
    ax.set_xlabel("step")
  if levels:
    ax = axes[0][-1]
    for k in levels:
      ax.plot(steps, [r.get(k, np.nan) for r in rows], label=k.replace("hint_level_", "level "))
    ax.set_title("prompts per hint level")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
