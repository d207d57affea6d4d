"""CHORD-phi on the default synthetic task (docs/algorithm.md#chord): 8 rollouts + 2 demonstration rows per prompt (the
official 20 % of the batch, whatever its size), mu = 0.1, demonstration tokens weighted by sg(p (1 - p))."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "chord_phi"
  return c
