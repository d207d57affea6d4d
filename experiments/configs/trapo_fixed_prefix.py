"""Ablation: TRAPO with a fixed 50% expert prefix for every prompt after stage 1, instead of adaptive levels."""

from experiments.configs import default


def get_config():
  c = default.get_config()
  c.trapo.fixed_prefix_ratio = 0.5
  return c
