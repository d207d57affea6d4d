"""SRFT on the default synthetic task (docs/algorithm.md#srft): 7 rollouts + one whole demonstration per prompt, one
group, entropy-aware weights. Nothing scales with the batch."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "srft"
  return c
