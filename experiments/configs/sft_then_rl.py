"""SFT then GRPO on the default synthetic task, one run: the first half of the steps SFT, the rest GRPO."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "sft_then_rl"
  c.train.sft_steps = c.train.steps // 2
  return c
