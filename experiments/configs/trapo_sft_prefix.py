"""Ablation: TRAPO with plain SFT (NLL) instead of TrSFT on the expert-prefix tokens."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.trapo.prefix_loss = "sft"
  return c
