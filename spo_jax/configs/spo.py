"""Preset ``spo``: the ``dpo`` preset wrapped in SPO with the paper grid's settings (penalty
solver, the reference value, gamma 10, epsilon 0, per sample: ``spo_jax.configs.paper.SPO``).

    python -m spo_jax.train --config=spo --config.run_dir=runs/dpo_spo \\
        --config.model.path=/path/to/hf_model --config.data.train_path=/path/to/pairs.jsonl
"""

from spo_jax.configs import dpo, paper

__all__ = ["get_config"]


def get_config():
    config = dpo.get_config()
    config.spo.enabled = True
    for key, value in paper.SPO.items():
        config.spo[key] = value
    return config
