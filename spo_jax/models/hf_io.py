"""Hugging Face checkpoints: parameter-name maps, safetensors import / export (``from_pretrained``,
``save_pretrained``), GGUF files through ``spo_jax.models.gguf``, and the tokenizer."""

from __future__ import annotations

import collections
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.numpy import save_file

from spo_jax.models import gguf
from spo_jax.models.config import ModelConfig
from spo_jax.models.decoder import Decoder, create_model
from spo_jax.models.paths import ModelError, damaged_file, local_or_hub

__all__ = ["params_from_hf_state", "from_pretrained", "save_pretrained", "load_tokenizer"]


def _hf_names(cfg: ModelConfig) -> dict[tuple, tuple[str, bool, tuple | None]]:
    """Our parameter path -> (HF tensor name, transpose?, fused part).

    ``fused part`` is None or ``(i, n)``: our parameter is the i-th of n equal slices along the last axis of
    the (transposed) HF tensor, e.g. GPT-2's c_attn holding q, k and v.
    """
    if cfg.model_type == "gpt2":
        return _gpt2_hf_names(cfg)
    m = {("embed", "embedding"): ("model.embed_tokens.weight", False, None),
         ("norm", "scale"): ("model.norm.weight", False, None)}
    if not cfg.tie_word_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", True, None)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for n in "qkvo":
            m[("layers", i, "attn", f"{n}_proj", "kernel")] = (p + f"self_attn.{n}_proj.weight", True, None)
            if cfg.attention_out_bias if n == "o" else cfg.attention_bias:
                m[("layers", i, "attn", f"{n}_proj", "bias")] = (p + f"self_attn.{n}_proj.bias", False, None)
        if cfg.qk_norm:
            m[("layers", i, "attn", "q_norm", "scale")] = (p + "self_attn.q_norm.weight", False, None)
            m[("layers", i, "attn", "k_norm", "scale")] = (p + "self_attn.k_norm.weight", False, None)
        for n in ("gate", "up", "down"):
            m[("layers", i, "mlp", f"{n}_proj", "kernel")] = (p + f"mlp.{n}_proj.weight", True, None)
            if cfg.mlp_bias:
                m[("layers", i, "mlp", f"{n}_proj", "bias")] = (p + f"mlp.{n}_proj.bias", False, None)
        m[("layers", i, "input_norm", "scale")] = (p + "input_layernorm.weight", False, None)
        m[("layers", i, "post_attention_norm", "scale")] = (p + "post_attention_layernorm.weight", False, None)
    return m


def _gpt2_hf_names(cfg: ModelConfig) -> dict[tuple, tuple[str, bool, tuple | None]]:
    """GPT2LMHeadModel names. Its Conv1D weights are stored [in, out] (our kernel layout, no transpose);
    c_attn [D, 3D] fuses q | k | v along the output axis."""
    t = "transformer."
    m = {("embed", "embedding"): (t + "wte.weight", False, None),
         ("pos_embed", "embedding"): (t + "wpe.weight", False, None),
         ("norm", "scale"): (t + "ln_f.weight", False, None), ("norm", "bias"): (t + "ln_f.bias", False, None)}
    if not cfg.tie_word_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", True, None)
    for i in range(cfg.num_hidden_layers):
        p = f"{t}h.{i}."
        for j, n in enumerate("qkv"):
            m[("layers", i, "attn", f"{n}_proj", "kernel")] = (p + "attn.c_attn.weight", False, (j, 3))
            m[("layers", i, "attn", f"{n}_proj", "bias")] = (p + "attn.c_attn.bias", False, (j, 3))
        for ours, hf in (("attn/o_proj", "attn.c_proj"), ("mlp/up_proj", "mlp.c_fc"), ("mlp/down_proj", "mlp.c_proj"),
                         ("input_norm", "ln_1"), ("post_attention_norm", "ln_2")):
            norm = "norm" in ours
            for leaf, hf_leaf in ((("scale" if norm else "kernel"), "weight"), ("bias", "bias")):
                m[("layers", i, *ours.split("/"), leaf)] = (p + f"{hf}.{hf_leaf}", False, None)
    return m


def _download(hub_id: str) -> str:
    """A Hub id's snapshot directory (downloaded: needs network)."""
    return snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])


def _open_tensors(path: str):
    """name -> zero-copy getter over the checkpoint's safetensors file(s)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if not files:
        raise ModelError(f"no .safetensors weights in {path}")
    where = {}
    for f in files:
        with damaged_file(os.path.join(path, f)):
            with safe_open(os.path.join(path, f), framework="numpy") as h:
                for k in h.keys():
                    where[k] = os.path.join(path, f)

    def get(name):
        with damaged_file(where[name]), safe_open(where[name], framework="numpy") as h:
            return h.get_tensor(name)
    return where, get



def _hf_extra_ok(cfg: ModelConfig, name: str) -> bool:
    """HF tensors that are not parameters of ours and are ignored on load."""
    if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
        return True
    # old GPT-2 checkpoints carry the causal-mask buffers h.<i>.attn.bias / masked_bias
    return cfg.model_type == "gpt2" and re.search(r"\.attn\.(masked_)?bias$", name) is not None


def params_from_hf_state(model: Decoder, names: set, get, source: str, shardings=None) -> None:
    """Fill ``model`` (possibly abstract) from HF-named tensors; each placed on its sharding.

    ``get(name)`` returns a NumPy array; it is cast to the model's ``param_dtype``.
    """
    cfg = model.config
    mapping = _hf_names(cfg)
    names = set(names)
    if cfg.model_type == "gpt2" and not any(n.startswith("transformer.") for n in names):
        # original OpenAI-converted checkpoints (openai-community/gpt2) have no "transformer." prefix
        names = {n if n == "lm_head.weight" else "transformer." + n for n in names}
        get_raw = get
        get = lambda n: get_raw(n.removeprefix("transformer."))  # noqa: E731
    wanted = {hf for hf, _, _ in mapping.values()}
    missing = sorted(wanted - names)
    extra = sorted(n for n in names - wanted if not _hf_extra_ok(cfg, n))
    if missing:
        raise ModelError(f"{source}: missing weight(s) {missing[:5]} for a {cfg.model_type} model")
    if extra:
        raise ModelError(f"{source}: unexpected weight(s) {extra[:5]} for a {cfg.model_type} model "
                         f"(wrong model_type in config.json?)")
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    new = {}
    uses = collections.Counter(hf for hf, _, _ in mapping.values())
    fused = {}  # a fused tensor is read once and dropped after its last part
    for path, var in flat.items():
        hf, transpose, part = mapping[tuple(path)]
        if uses[hf] > 1:
            arr = fused[hf] if hf in fused else fused.setdefault(hf, get(hf))
            uses[hf] -= 1
        else:
            arr = fused.pop(hf) if hf in fused else get(hf)
        arr = arr.T if transpose else arr
        if part is not None:
            i, n = part
            if arr.shape[-1] % n:
                raise ModelError(f"{source}: fused weight {hf} has shape {arr.shape}; its last axis does "
                                 f"not split into {n} equal parts")
            w = arr.shape[-1] // n
            arr = arr[..., i * w:(i + 1) * w]
        if arr.shape != var.shape:
            raise ModelError(f"{source}: weight {hf} has shape {arr.shape}, expected {var.shape} "
                             f"(parameter {'/'.join(map(str, path))})")
        arr = np.asarray(arr)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise ModelError(f"{source}: weight {hf} holds {int((~np.isfinite(arr)).sum())} non-finite value(s) "
                             "(NaN/Inf): the checkpoint is damaged or was saved from a diverged run; use another one")
        arr = arr.astype(var.dtype)
        sh = shardings(path, arr.shape) if callable(shardings) else None
        new[path] = var.replace(jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr))
    nnx.update(model, nnx.from_flat_state(new))


def from_pretrained(path_or_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32, shardings=None) -> Decoder:
    """A decoder from a local HF directory (config.json + safetensors, sharded or not), a Hub id, or a
    llama-architecture ``.gguf`` file (dequantized to float32, then cast to ``param_dtype``).

    A path-like name that does not exist raises ``ModelPathError`` (see ``spo_jax.models.paths``)."""
    name, local = local_or_hub(path_or_id)
    if local and name.endswith(".gguf"):
        hf_cfg, tensors = gguf.load_gguf(name)
        cfg = _model_config(hf_cfg, name)
        model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
        params_from_hf_state(model, set(tensors), tensors.pop, name, shardings)
        return model
    path = name if local else _download(name)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ModelError(f"{path_or_id}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            hf_cfg = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{cfg_file} is not valid JSON ({e}): the file is damaged; download or export it "
                         "again") from e
    cfg = _model_config(hf_cfg, cfg_file)
    model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    where, get = _open_tensors(path)
    params_from_hf_state(model, set(where), get, path, shardings)
    return model


def _model_config(hf_cfg, source: str) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf_cfg if isinstance(hf_cfg, dict) else {"model_type": None})
    except (ValueError, TypeError, KeyError) as e:
        raise ModelError(f"{source}: {e}") from e


def save_pretrained(model: Decoder, path: str) -> None:
    """config.json + model.safetensors that transformers' PyTorch classes load."""
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    parts = collections.defaultdict(dict)  # HF name -> {part index: array}; fused tensors have several
    transposed = {}
    for p, (hf, transpose, part) in _hf_names(cfg).items():
        parts[hf][0 if part is None else part[0]] = np.asarray(jax.device_get(flat[p][...]), np.float32)
        transposed[hf] = transpose
    out = {}
    for hf, ps in parts.items():
        a = np.concatenate([ps[i] for i in range(len(ps))], axis=-1) if len(ps) > 1 else ps[0]
        out[hf] = np.ascontiguousarray(a.T if transposed[hf] else a)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                            "gpt2": "GPT2LMHeadModel"}[cfg.model_type]]
    hf["torch_dtype"] = "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def load_tokenizer(path_or_id: str):
    """The tokenizer via transformers (a local directory, a Hub id, or a ``.gguf`` file)."""
    name, local = local_or_hub(path_or_id)
    if local and name.endswith(".gguf"):
        return gguf.load_tokenizer(name)
    from transformers import AutoTokenizer  # heavy (seconds to import); only the tokenizer needs it
    return AutoTokenizer.from_pretrained(name)
