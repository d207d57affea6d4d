"""Prefix-RFT on the default synthetic task (docs/algorithm.md#prefix-rft): per prompt 4 rollouts of the model's own
and 4 continuing one random-length prefix of a demonstration; the ratio's bounds follow train.steps. Nothing scales
with the batch."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "prefix_rft"
  return c
