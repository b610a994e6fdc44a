"""Preset ``dpo``: DPO (beta 0.1) from a checkpoint on a local preference set.

    python -m spo_jax.train --config=dpo --config.run_dir=runs/dpo \\
        --config.model.path=/path/to/hf_model --config.data.train_path=/path/to/pairs.jsonl

The learning rate is left to ``optim.learning_rate``'s default (0 = chosen by the run: 5e-7 for
full fine-tuning, 1e-4 with LoRA; ``spo_jax.optim.learning_rate``). Every field, with its
meaning, is listed by ``python -m spo_jax.train --help``.
"""

from spo_jax.config import get_default_config

__all__ = ["get_config"]


def get_config():
    config = get_default_config()
    config.stage = "preference"
    config.loss.name = "dpo"
    config.loss.hparams.beta = 0.1
    config.reference.mode = "cached"
    # warm-up over 10% of the steps (the alignment-handbook / SimPO recipes' warmup_ratio 0.1, as the paper
    # grid), following --config.train.num_steps
    config.optim.warmup_steps = config.train.get_ref("num_steps") // 10
    config.optim.schedule = "cosine"
    config.train.num_steps = 1000
    config.data.batch_size = 32
    config.data.max_length = 1024
    return config
