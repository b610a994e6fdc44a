"""Preset ``lora_dpo``: the ``dpo`` preset training LoRA adapters (rank 16, alpha 32, every
projection, the frozen base in bf16) instead of every weight; the base with the adapters off is
the reference. Its learning rate is LoRA's (1e-4, ``spo_jax.optim.learning_rate``) unless
``--config.optim.learning_rate`` is given.

    python -m spo_jax.train --config=lora_dpo --config.run_dir=runs/dpo_lora \\
        --config.model.path=/path/to/hf_model --config.data.train_path=/path/to/pairs.jsonl
"""

from spo_jax.configs import dpo

__all__ = ["get_config"]


def get_config():
    config = dpo.get_config()
    lora = config.model.lora
    lora.enabled = True
    lora.rank = 16
    lora.alpha = 32.0
    lora.targets = "all-linear"
    lora.base_dtype = "bfloat16"
    return config
