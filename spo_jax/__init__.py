"""spo_jax: Stable Preference Optimization and the Bradley-Terry loss family in JAX."""

__version__ = "0.1.0"
__all__ = ["__version__"]
