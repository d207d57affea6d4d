"""LUFFY on the default synthetic task (spec §5): 7 rollouts + the whole demo #1, advantage x p/(p+0.1) on it."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "luffy"
  c.loss.prefix_loss = "luffy"
  return c
