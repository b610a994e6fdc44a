"""The tests' tiny config: the package's ``tiny`` preset (``--config=tiny``; spo_jax/configs/tiny.py)."""

from spo_jax.configs.tiny import TINY_LLAMA, get_config  # noqa: F401
