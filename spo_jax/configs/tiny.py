"""Preset ``tiny``: a smoke test of an install, not an experiment. A 2-layer, width-32 Llama built
from an inline config (random weights), fp32, the synthetic task's tokenizer, T <= 32, 10 steps.

The data path is left empty on purpose (any small preference file will do):

    python -m spo_jax.train --config=tiny --config.run_dir=/tmp/tiny --config.data.train_path=pairs.jsonl
"""

import ml_collections

from spo_jax.config import get_default_config

__all__ = ["TINY_LLAMA", "get_config"]

# Vocabulary of spo_jax.data.synthetic.build_tokenizer() is < 128 tokens.
TINY_LLAMA = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)


def get_config():
    config = get_default_config()
    config.stage = "preference"
    config.seed = 0
    config.model.config = ml_collections.ConfigDict(TINY_LLAMA)  # --config.model.config.hidden_size=... works
    config.model.tokenizer = "synthetic"
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"
    config.reference.mode = "cached"
    config.loss.name = "dpo"
    config.loss.hparams.beta = 0.1
    config.data.max_length = 32
    config.data.min_prompt_length = 4
    config.data.length_bucket = 16
    config.data.batch_size = 4
    config.data.eval_batch_size = 4
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 2
    config.optim.grad_clip = 1.0
    config.train.num_steps = 10
    config.checkpoint.every = 5
    config.checkpoint.keep = 2
    config.checkpoint.async_save = False
    config.checkpoint.export_hf = False
    config.metrics.progress_bar = False
    config.metrics.tensorboard = False
    config.metrics.peak_tflops = 1.0
    return config
