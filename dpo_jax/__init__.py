"""dpo_jax: Direct Preference Optimization (Rafailov et al. 2023) and its losses in JAX/Flax."""

__version__ = "0.1.0"
