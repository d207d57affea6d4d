"""ReLIFT on the default synthetic task (docs/algorithm.md#relift): GRPO on 8 rollouts; prompts whose rollouts
all fail fill a buffer of relift.buffer_batches x train.batch_prompts = 8 prompts (official 128 at 128-prompt
batches), fine-tuned on with a second AdamW at relift.sft_lr_scale x optim.lr once it is full."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.algo = "relift"
  return c
