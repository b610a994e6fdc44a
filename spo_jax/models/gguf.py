"""GGUF (llama.cpp) import for llama-architecture files: metadata -> an HF LlamaConfig dict, tensors
(dequantized to float32 with the ``gguf`` package) -> HF tensor names. No torch needed.

llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` per head from HF's half-split RoPE
layout to an interleaved one; ``unpermute_rope_rows`` undoes it (transformers' ``reverse_permute_weights``).
GGUF lists dimensions fastest-first (``[in, out]``); the reader's arrays are already row-major
``[out, in]`` = HF's ``nn.Linear`` layout.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from spo_jax.models.paths import ModelError, ModelPathError, damaged_file

__all__ = ["SUPPORTED_GGUF_ARCHITECTURES", "unpermute_rope_rows", "load_gguf", "load_tokenizer"]

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

# GGUF per-block tensor -> HF name under model.layers.<i>.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation: rows of head h go from interleaved pairs (2i, 2i+1) back to
    HF's halves (i, i + hd/2). ``w``: [n_heads * hd, ...] (a weight [out, in] or a bias [out])."""
    if w.shape[0] % (2 * n_heads):
        raise ValueError(f"cannot un-permute a tensor of {w.shape[0]} rows over {n_heads} heads")
    hd2 = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, hd2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def load_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(hf_config_dict, tensors)`` of a llama-architecture GGUF file; tensors are float32 NumPy arrays
    under HF LlamaForCausalLM names (Q/K un-permuted; no ``lm_head.weight`` when the output is tied)."""
    if not os.path.isfile(path):
        raise ModelPathError(f"no such directory or file: {path} (expected a GGUF file)")
    with damaged_file(path):
        reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ModelError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                         f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

    def need(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ModelError(f"{path}: GGUF metadata is missing {arch}.{key}")
        return v

    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none") or any(
            t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ModelError(f"{path}: GGUF RoPE scaling (rope.scaling.type / rope_freqs) is not supported")
    heads = int(need("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    hidden = int(need("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else _field(reader, f"{arch}.vocab_size")
    names = {t.name for t in reader.tensors}
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False, "hidden_act": "silu",
    }
    if config["vocab_size"] is None:
        raise ModelError(f"{path}: GGUF has neither tokenizer.ggml.tokens nor {arch}.vocab_size")
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[k] = None if config[k] is None else int(config[k])

    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(config["num_hidden_layers"]) for n in _BLOCK_NAMES}
    missing = sorted(expected - names, key=lambda n: (len(n), n))
    if missing:
        raise ModelError(f"{path}: GGUF is missing tensor(s) {missing[:5]} for a {arch} model")
    tensors = {}
    for t in reader.tensors:
        base, _, leaf = t.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
            hf = f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{leaf}"
        elif base in _GLOBAL_NAMES:
            hf = f"{_GLOBAL_NAMES[base]}.{leaf}"
        else:
            raise ModelError(f"{path}: unexpected GGUF tensor {t.name!r} for a {arch} model")
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        expect_shape = tuple(int(x) for x in reversed(t.shape))
        if w.shape != expect_shape:
            w = w.reshape(expect_shape)
        if parts[-1] == "attn_q":
            w = unpermute_rope_rows(w, heads)
        elif parts[-1] == "attn_k":
            w = unpermute_rope_rows(w, kv_heads)
        tensors[hf] = w
    return config, tensors


def load_tokenizer(path: str):
    """transformers' tokenizer rebuilt from the GGUF's vocabulary, merges and special tokens."""
    from transformers import AutoTokenizer  # heavy (seconds to import); only the tokenizer needs it
    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                         gguf_file=os.path.basename(path))
