"""CHORD-mu on the default synthetic task (docs/algorithm.md#chord): 8 rollouts + 2 demonstration rows per prompt (the
official 20 % of the batch, whatever its size); the paper's mu: no warm-up, a cosine from 0.9 to 0.05 over 0.4 of
train.steps (200 of 500 steps). The example YAML's schedule: experiments/configs/chord_example.py."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "chord_mu"
  return c
