"""GRPO on the default synthetic task: n = 8 pure rollouts per prompt, group-mean baseline, no demonstrations."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "grpo"
  return c
