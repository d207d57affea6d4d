"""SFT on the default synthetic task: token-mean NLL on both expert demos of every prompt."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "sft"
  return c
