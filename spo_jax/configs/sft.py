"""Preset ``sft``: supervised fine-tuning (token-mean NLL of the completions) on prompt /
completion, messages or question / answer rows; no reference model.

    python -m spo_jax.train --config=sft --config.run_dir=runs/sft \\
        --config.model.path=/path/to/hf_model --config.data.train_path=/path/to/sft.jsonl

The learning rate is left to ``optim.learning_rate``'s default (0 = chosen by the run: 2e-5 for
full fine-tuning, 1e-4 with LoRA; ``spo_jax.optim.learning_rate``).
"""

from spo_jax.config import get_default_config
from spo_jax.configs import recipe

__all__ = ["get_config"]


def get_config():
    config = get_default_config()
    config.stage = "sft"
    config.reference.mode = "none"
    return recipe(config)
