"""SFT on the default synthetic task (docs/algorithm.md#sft): token-mean NLL on one whole demonstration per prompt."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "sft"
  return c
