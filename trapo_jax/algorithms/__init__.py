"""Training methods, one module each, found by name (docs/algorithm.md; adding one: the README)."""

from trapo_jax.algorithms.base import Method, Phase, from_config, get, names, register

# Importing a method's module registers it.
from trapo_jax.algorithms import grpo, luffy, sft, sft_then_rl, trapo  # noqa: E402,F401  pylint: disable=g-bad-import-order
from trapo_jax.algorithms import chord, hpt, prefix_rft, relift, srft, uft  # noqa: E402,F401
