"""Preset ``dpo``: DPO (beta 0.1) from a checkpoint on a local preference set.

    python -m spo_jax.train --config=dpo --config.run_dir=runs/dpo \\
        --config.model.path=/path/to/hf_model --config.data.train_path=/path/to/pairs.jsonl

The learning rate is left to ``optim.learning_rate``'s default (0 = chosen by the run: 5e-7 for
full fine-tuning, 1e-4 with LoRA; ``spo_jax.optim.learning_rate``). Every field, with its
meaning, is listed by ``python -m spo_jax.train --help``.
"""

from spo_jax.config import get_default_config
from spo_jax.configs import recipe

__all__ = ["get_config"]


def get_config():
    config = get_default_config()
    config.stage = "preference"
    config.loss.name = "dpo"
    config.loss.hparams.beta = 0.1
    config.reference.mode = "cached"
    return recipe(config)
