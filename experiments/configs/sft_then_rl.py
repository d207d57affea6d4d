"""SFT then GRPO on the default synthetic task, one run: the first half of the steps SFT, the rest GRPO."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "sft_then_rl"
  # A reference, not a number: `--config.train.steps=N` (as a sweep passes it) moves the split to N // 2 too.
  c.train.sft_steps = c.train.get_ref("steps") // 2
  return c
