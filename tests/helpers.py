"""What several test modules share."""

from __future__ import annotations

from trapo_jax import paths
from trapo_jax.train import checkpoint as ckpt_lib


def newest_checkpoint(workdir: str) -> int | None:
  """The newest *committed* checkpoint step of a workdir (local or gs://), as a restarted run sees it. On GCS a step's
  directory appears when its save starts and counts once orbax writes its commit file, so a directory listing is not
  enough to know what a resumed run will restore."""
  if not paths.exists(paths.join(workdir, "checkpoints")):
    return None
  ck = ckpt_lib.Checkpointer(workdir, keep=10, every=1, create=False)
  try:
    return ck.latest_step()
  finally:
    ck.close()
