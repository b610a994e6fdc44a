"""Flax NNX decoders that load and save Hugging Face checkpoints (docs/DESIGN.md, Contract 2).

``config`` (ModelConfig, HF config mapping) <- ``decoder`` (layers, Decoder, apply / unembedding)
<- ``generation`` (KV-cache generation) and ``hf_io`` (HF name maps, safetensors / GGUF import, export,
tokenizer); ``gguf`` reads llama.cpp files into HF names; ``paths`` tells a local path from a Hub id;
``lora`` (imported as ``spo_jax.models.lora``) adds PEFT-compatible LoRA adapters.
"""

from spo_jax.models.config import ACTIVATIONS, SUPPORTED_MODEL_TYPES, ModelConfig
from spo_jax.models.decoder import (ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES, Decoder, apply, create_model, set_attention, set_remat,
                                    unembedding)
from spo_jax.models.generation import batch_bucket, generate, length_bucket, prompt_bucket
from spo_jax.models.gguf import SUPPORTED_GGUF_ARCHITECTURES, load_gguf, unpermute_rope_rows
from spo_jax.models.paths import ModelError, ModelPathError, looks_like_path
from spo_jax.models.hf_io import from_pretrained, load_tokenizer, params_from_hf_state, save_pretrained

__all__ = [
    "ACTIVATIONS", "SUPPORTED_MODEL_TYPES", "ModelConfig", "ATTENTION_IMPLEMENTATIONS", "REMAT_POLICIES", "Decoder", "apply",
    "create_model", "set_attention", "set_remat",
    "unembedding", "generate", "length_bucket", "prompt_bucket", "batch_bucket", "SUPPORTED_GGUF_ARCHITECTURES", "load_gguf", "unpermute_rope_rows",
    "from_pretrained", "load_tokenizer", "params_from_hf_state", "save_pretrained", "ModelError", "ModelPathError",
    "looks_like_path",
]
