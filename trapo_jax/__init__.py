"""trapo_jax: Trust-Region Adaptive Policy Optimization (TRAPO) and its baselines in JAX."""
