"""Per-step metrics: JSONL + TensorBoard in the workdir (process 0 only), a progress bar, and training curves.

A run that starts at step s (0 for a fresh start, else its checkpoint's step) first cuts `metrics.jsonl` and the
TensorBoard events back to step s, so that what a killed run logged after its last checkpoint is not shown twice.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import time
from typing import Iterable, Iterator

import jax
import numpy as np
import tqdm

from trapo_jax import paths


class MetricWriter:
  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = paths.join(workdir, "metrics.jsonl")
    self.tb = None
    self.bar = None
    if not self.enabled:
      return
    paths.makedirs(workdir)
    cut_back(workdir, initial_step)  # a resumed run redoes the steps after its checkpoint
    SummaryWriter = _summary_writer_class()
    # The default file name has whole seconds only: a run restarted within the second would overwrite the last one's.
    # On gs:// tensorboardX uploads the whole events file at each flush (google-cloud-storage).
    self.tb = SummaryWriter(paths.join(workdir, "tb"), filename_suffix=f".{os.getpid()}.{time.time_ns() % 10**9:09d}")
    self.bar = tqdm.tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    # A non-finite value is left out of the row: JSON has none, and readers take a missing key as undefined.
    # It is NaN when undefined at this step (expert_prob with no prefix tokens); a non-finite loss shows in `skipped`.
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items() if np.isfinite(float(v))}}
    paths.append(self.path, json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self.tb.add_scalar(k, v, step)
    self.bar.update(1)
    self.bar.set_postfix({k: f"{row[k]:.3g}" for k in ("reward/mean", "loss", "expert_prob") if k in row})

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.bar.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported with torch hidden unless torch is loaded already: tensorboardX tries
  `import torch` only to name torch tensors in its type hints, and where torch is installed that import is about
  2 s of every run's start. This writer is only given floats."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError, as tensorboardX expects where torch is absent
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide:
      del sys.modules["torch"]
  return SummaryWriter


def cut_back(workdir: str, step: int) -> None:
  """Drops every metrics.jsonl row and TensorBoard scalar of `workdir` after `step`."""
  path = paths.join(workdir, "metrics.jsonl")
  if paths.exists(path):
    rows = [r for r in read_jsonl(path, tolerant=True) if r.get("step", 0) <= step]
    paths.write(path, "".join(json.dumps(r) + "\n" for r in rows))
  tb = paths.join(workdir, "tb")
  for name in paths.listdir(tb):
    if ".tfevents." in name:
      _cut_events(paths.join(tb, name), step)


def _records(data: bytes) -> Iterator[bytes]:
  """The payloads of a TFRecord file (length, crc, payload, crc); a torn last record (a killed writer) ends it."""
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    end = pos + 12 + length + 4
    if end > len(data):
      return
    yield data[pos + 12:end - 4]
    pos = end


def _cut_events(path: str, step: int) -> None:
  """Rewrites a TensorBoard events file without the summaries after `step`; removes it if none is left."""
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  data = paths.read_bytes(path)
  kept, summaries, dropped = [], 0, 0
  for payload in _records(data):
    event = event_pb2.Event.FromString(payload)
    if event.HasField("summary"):
      if event.step > step:
        dropped += 1
        continue
      summaries += 1
    kept.append(payload)
  if not summaries:
    paths.remove(path)
    return
  if not dropped and sum(len(p) + 16 for p in kept) == len(data):
    return
  out = bytearray()
  for payload in kept:
    header = struct.pack("<Q", len(payload))
    out += header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))
  paths.write(path, bytes(out))


def read_jsonl(path: str, tolerant: bool = False) -> list[dict]:
  """The rows of a JSONL file; `tolerant` skips a line that is not JSON (the torn last row of a killed run)."""
  rows = []
  with paths.open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        if not tolerant:
          raise
  return rows


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
  with paths.writing(out_png) as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Token-probability dumps (train.dump_token_probs): the official code's per-step npz dumps of the probabilities the
# policy gives expert-prefix tokens and its own tokens, and the paper's training-dynamics figure made from them.

TOKEN_PROBS_DIR = "token_probs"


def write_token_probs(workdir: str, step: int, expert: np.ndarray, own: np.ndarray) -> str:
  """Writes <workdir>/token_probs/step_<step>.npz with 1-D arrays `expert` (imitated expert tokens) and `own`."""
  path = paths.join(workdir, TOKEN_PROBS_DIR, f"step_{step:07d}.npz")
  with paths.writing(path) as f:
    np.savez_compressed(f, expert=np.asarray(expert, np.float32), own=np.asarray(own, np.float32))
  return path


def read_token_probs(workdir: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
  """[(step, expert probabilities, own probabilities)] of a run's dumps, in step order."""
  out = paths.join(workdir, TOKEN_PROBS_DIR)
  names = [n for n in paths.listdir(out) if n.startswith("step_") and n.endswith(".npz")]
  rows = []
  for name in names:
    with np.load(io.BytesIO(paths.read_bytes(paths.join(out, name)))) as f:
      rows.append((int(name[5:-4]), f["expert"], f["own"]))
  return rows


def plot_token_probs(workdir: str, out_png: str, alpha: float = 0.1) -> bool:
  """The training-dynamics figure: per step, the distribution of expert-token probabilities (median and the
  10-90 % band; own tokens alongside) and the share of expert tokens below alpha. False if the run has no dumps."""
  rows = read_token_probs(workdir)
  if not rows:
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = np.asarray([s for s, _, _ in rows])
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
  for k, (label, colour) in enumerate((("expert tokens", "C0"), ("own tokens", "C1"))):
    q = np.asarray([np.quantile(r[1 + k], (0.1, 0.5, 0.9)) if r[1 + k].size else (np.nan,) * 3 for r in rows])
    left.fill_between(steps, q[:, 0], q[:, 2], color=colour, alpha=0.2)
    left.plot(steps, q[:, 1], color=colour, label=f"{label} (median, 10-90 %)")
  left.set_title("token probability under the policy")
  left.set_xlabel("step")
  left.legend(fontsize=7)
  below = [float((e < alpha).mean()) if e.size else np.nan for _, e, _ in rows]
  right.plot(steps, below)
  right.set_title(f"expert tokens with p < {alpha:g}")
  right.set_xlabel("step")
  fig.tight_layout()
  with paths.writing(out_png) as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
  return True


def main(argv: list[str]) -> None:
  """python -m trapo_jax.train.metrics WORKDIR [ALPHA]: token_probs.png from the run's dumps."""
  if len(argv) not in (2, 3):
    raise SystemExit("usage: python -m trapo_jax.train.metrics WORKDIR [ALPHA]")
  out = paths.join(argv[1], "token_probs.png")
  if not plot_token_probs(argv[1], out, float(argv[2]) if len(argv) == 3 else 0.1):
    raise SystemExit(f"{paths.join(argv[1], TOKEN_PROBS_DIR)}: no token-probability dumps "
                     "(train with --config.train.dump_token_probs=True)")
  print(f"wrote {out}")


if __name__ == "__main__":
  import sys
  main(sys.argv)
