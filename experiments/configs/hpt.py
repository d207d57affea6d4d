"""HPT on the default synthetic task (docs/algorithm.md#hpt): per prompt, 8 rollouts, or its demonstration with NLL
when at most hpt.gate = 0 of them are correct. Nothing scales with the batch."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "hpt"
  return c
