"""SFT then GRPO on the default synthetic task, one run: the first half of the steps SFT, the rest GRPO
(`sft_then_rl.sft_steps` = -1 follows an overridden `train.steps`)."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "sft_then_rl"
  return c
