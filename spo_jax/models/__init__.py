"""Flax NNX decoders that load and save Hugging Face checkpoints (docs/DESIGN.md, Contract 2)."""

from spo_jax.models.gguf import SUPPORTED_GGUF_ARCHITECTURES, load_gguf, unpermute_rope_rows
from spo_jax.models.llama import (
    ACTIVATIONS,
    SUPPORTED_MODEL_TYPES,
    Decoder,
    ModelConfig,
    apply,
    create_model,
    from_pretrained,
    generate,
    load_tokenizer,
    params_from_hf_state,
    save_pretrained,
    set_remat,
    unembedding,
)
