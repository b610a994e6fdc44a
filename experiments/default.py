"""The default experiment: DPO (beta 0.1) on a local preference set from an HF checkpoint.

    python -m spo_jax.train --config experiments/default.py \
        --config.run_dir=runs/dpo --config.model.path=/path/to/hf_model \
        --config.data.train_path=/path/to/pairs.jsonl

Every field, with its meaning, is listed in ``spo_jax/config.py``.
Wrap the loss in SPO with ``--config.spo.enabled=True`` (``spo.solver``,
``spo.gamma``, ...); switch losses with ``--config.loss.name=simpo`` and its
hyperparameters under ``loss.hparams``.
"""

from spo_jax.config import get_default_config


def get_config():
    config = get_default_config()
    config.stage = "preference"
    config.loss.name = "dpo"
    config.loss.hparams.beta = 0.1
    config.reference.mode = "cached"
    config.optim.learning_rate = 5e-7
    config.optim.warmup_steps = 10
    config.optim.schedule = "cosine"
    config.train.num_steps = 1000
    config.data.batch_size = 32
    config.data.max_length = 1024
    return config
