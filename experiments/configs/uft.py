"""UFT on the default synthetic task (docs/algorithm.md#uft): each prompt's 8 rollouts continue a hint of k of its
solution's steps, p(t) decaying to no hint after 0.6 x train.steps (the official 300 of 500 steps). Nothing scales
with the batch."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "uft"
  return c
