"""The README's training config: the package's ``dpo`` preset (``--config=dpo``; spo_jax/configs/dpo.py)."""

from spo_jax.configs.dpo import get_config  # noqa: F401
