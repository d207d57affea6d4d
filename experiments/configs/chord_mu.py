"""CHORD-mu on the default synthetic task (docs/algorithm.md#chord): 8 rollouts + 2 demonstration rows per prompt (the
official 20 % of the batch, whatever its size); mu warms up over 0.4 and decays over 0.8 of train.steps (the
official 200 and 400 steps at a 500-step budget)."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "chord_mu"
  return c
