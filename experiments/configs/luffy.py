"""LUFFY on the default synthetic task (docs/algorithm.md#luffy): 7 rollouts + one whole demonstration per prompt."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "luffy"
  return c
