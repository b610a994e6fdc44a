"""Flax NNX Llama-family decoder (Llama 2/3/3.1/3.2 with llama3 RoPE scaling, Mistral, Qwen2/2.5, Qwen3)
with KV-cache generation and Hugging Face safetensors import/export.

Parameter paths (for sharding rules): ``embed/embedding [V, D]``,
``layers/<i>/attn/{q,k,v,o}_proj/kernel``, ``layers/<i>/mlp/{gate,up,down}_proj/kernel``,
``layers/<i>/{input,post_attention}_norm/scale``, ``norm/scale``, ``lm_head/kernel [D, V]``
(absent when tied).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
import math

import jax
import jax.numpy as jnp
from flax import nnx

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if k not in d:
                raise ValueError(f"model config is missing {k!r}")
        heads = int(d["num_attention_heads"])
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        theta = d.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
        if rope and rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        eos = d.get("eos_token_id")
        return cls(
            model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())) if rope else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", mt == "qwen2" and False)),
            attention_bias=bool(d.get("attention_bias", mt == "qwen2")), qk_norm=mt == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
            sliding_window=_sliding_window(mt, d))

    def to_hf(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("qk_norm")
        if d["sliding_window"] is None:
            d.pop("sliding_window")
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d


def _sliding_window(model_type: str, d: dict) -> int | None:
    """Mistral's window, or Qwen2's when ``use_sliding_window`` is on; None = full attention."""
    w = d.get("sliding_window")
    if not w or (model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False)):
        return None
    return int(w)


def _window_mask(cfg, q_pos, k_pos):
    """True where a query may see a key under the sliding window (all True without one)."""
    if cfg.sliding_window is None:
        return True
    return (q_pos[..., :, None] - k_pos[..., None, :]) < cfg.sliding_window


def rope_inv_freq(cfg: ModelConfig):
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    rs = dict(cfg.rope_scaling or ())
    if rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = jnp.where((wavelen <= old / lo) & (wavelen >= old / hi), mid, scaled)
    elif rs:
        raise ValueError(f"unsupported rope_scaling {rs}")
    return inv


def apply_rope(x_BTHK, positions_BT, inv_freq):
    ang = positions_BT[..., None].astype(jnp.float32) * inv_freq  # [B, T, K/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _linear(i, o, bias, rngs, dtype, param_dtype):
    return nnx.Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(0.02))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, dtype, param_dtype):
        D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = _linear(D, H * hd, b, rngs, dtype, param_dtype)
        self.k_proj = _linear(D, KV * hd, b, rngs, dtype, param_dtype)
        self.v_proj = _linear(D, KV * hd, b, rngs, dtype, param_dtype)
        self.o_proj = _linear(H * hd, D, False, rngs, dtype, param_dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype)
        self.cfg = cfg

    def qkv(self, x, positions, inv_freq):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend(self, q, k, v, mask_BTS):
        cfg = self.cfg
        B, T, H, hd = q.shape
        G = H // cfg.num_key_value_heads
        q = q.reshape(B, T, cfg.num_key_value_heads, G, hd)
        s = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
        s = jnp.where(mask_BTS[:, None, None], s, -1e30)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(B, T, H * hd)
        return self.o_proj(o)

    def __call__(self, x, positions, mask_BTS, inv_freq):
        q, k, v = self.qkv(x, positions, inv_freq)
        return self.attend(q, k, v, mask_BTS)


class MLP(nnx.Module):
    def __init__(self, cfg, rngs, dtype, param_dtype):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(D, F, False, rngs, dtype, param_dtype)
        self.up_proj = _linear(D, F, False, rngs, dtype, param_dtype)
        self.down_proj = _linear(F, D, False, rngs, dtype, param_dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, cfg, rngs, dtype, param_dtype):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.attn = Attention(cfg, rngs, dtype, param_dtype)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        self.mlp = MLP(cfg, rngs, dtype, param_dtype)

    def __call__(self, x, positions, mask, inv_freq):
        x = x + self.attn(self.input_norm(x), positions, mask, inv_freq)
        return x + self.mlp(self.post_attention_norm(x))


class Decoder(nnx.Module):
    """Llama-family decoder: ``model(input_ids, positions, segment_ids) -> hidden [B, T, D]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               embedding_init=nnx.initializers.normal(0.02))
        self.layers = nnx.List([Block(cfg, rngs, dtype, param_dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, rngs, dtype, param_dtype)
        self.remat = False

    def __call__(self, input_ids, positions=None, segment_ids=None):
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        causal = jnp.tril(jnp.ones((T, T), bool))
        mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        mask = mask & _window_mask(self.config, positions, positions)
        inv_freq = rope_inv_freq(self.config)
        x = self.embed(input_ids)
        for layer in self.layers:
            if self.remat:
                x = nnx.remat(lambda m, *a: m(*a))(layer, x, positions, mask, inv_freq)
            else:
                x = layer(x, positions, mask, inv_freq)
        return self.norm(x)

    def unembedding(self):
        if self.config.tie_word_embeddings:
            return self.embed.embedding[...].T, None
        return self.lm_head.kernel[...], None

    def logits(self, hidden):
        w, _ = self.unembedding()
        return jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype)).astype(jnp.float32)


def create_model(config: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> Decoder:
    return Decoder(config, rngs=rngs or nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)


def set_remat(model: Decoder, on: bool = True) -> None:
    model.remat = bool(on)


def apply(graphdef, params, input_ids, positions=None, segment_ids=None):
    return nnx.merge(graphdef, params)(input_ids, positions, segment_ids)


def unembedding(graphdef, params):
    return nnx.merge(graphdef, params).unembedding()


# ----------------------------------------------------------------------------- KV-cache forward


def forward_cached(model: Decoder, ids_BT, positions_BT, kv_valid_BS, cache, start):
    """Run ``ids_BT`` at cache slots [start, start+T): write their K/V, attend over valid earlier slots.

    cache = (k [L, B, S, KV, hd], v [L, B, S, KV, hd]). Returns (hidden [B, T, D], cache).
    """
    B, T = ids_BT.shape
    S = cache[0].shape[2]
    slot_q = start + jnp.arange(T)
    mask = (jnp.arange(S)[None, :] <= slot_q[:, None])[None] & kv_valid_BS[:, None, :]  # [B, T, S]
    mask = mask & jnp.asarray(_window_mask(model.config, slot_q, jnp.arange(S)))[None]
    inv_freq = rope_inv_freq(model.config)
    x = model.embed(ids_BT)
    ks, vs = cache
    new_k, new_v = [], []
    for i, layer in enumerate(model.layers):
        h = layer.input_norm(x)
        q, k, v = layer.attn.qkv(h, positions_BT, inv_freq)
        kc = jax.lax.dynamic_update_slice(ks[i], k.astype(ks.dtype), (0, start, 0, 0))
        vc = jax.lax.dynamic_update_slice(vs[i], v.astype(vs.dtype), (0, start, 0, 0))
        x = x + layer.attn.attend(q, kc.astype(q.dtype), vc.astype(q.dtype), mask)
        x = x + layer.mlp(layer.post_attention_norm(x))
        new_k.append(kc)
        new_v.append(vc)
    return model.norm(x), (jnp.stack(new_k), jnp.stack(new_v))


def _sample(logits_BV, key, temperature, top_k, top_p):
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    logits = logits_BV / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_l = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_l, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p
        cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_l, axis=-1) < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_l, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)


def generate(model: Decoder, prompt_ids, prompt_mask, *, max_new_tokens: int, key=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id=None, pad_id: int = 0):
    """Batched generation from left-padded prompts with a KV cache.

    prompt_ids, prompt_mask: [B, Tp] (mask 1 on real tokens, left padding 0).
    Greedy when temperature == 0, else sampling (top-k / top-p) from ``key``.
    Returns (tokens [B, max_new_tokens] int32, mask [B, max_new_tokens] float32): after EOS
    (which is kept) rows emit ``pad_id`` with mask 0. One compile per (B, Tp, max_new_tokens).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0; got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"invalid sampling settings temperature={temperature} top_k={top_k} top_p={top_p}")
    key = jax.random.PRNGKey(0) if key is None else key
    graphdef, params = nnx.split(model)
    eos = -1 if eos_id is None else int(eos_id)
    return _generate_jit(graphdef, params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, bool),
                         key, int(max_new_tokens), float(temperature), int(top_k), float(top_p), eos, int(pad_id))


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9, 10))
def _generate_jit(graphdef, params, prompt_ids, prompt_mask, key, max_new, temperature, top_k, top_p, eos, pad):
    model = nnx.merge(graphdef, params)
    cfg = model.config
    B, Tp = prompt_ids.shape
    S = Tp + max_new
    dt = model.dtype
    cache = (jnp.zeros((cfg.num_hidden_layers, B, S, cfg.num_key_value_heads, cfg.head_dim), dt),) * 2
    kv_valid = jnp.concatenate([prompt_mask, jnp.ones((B, max_new), bool)], axis=1)
    pos = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)
    hidden, cache = forward_cached(model, prompt_ids, pos, kv_valid, cache, 0)
    last_logits = model.logits(hidden[:, -1:])[:, 0]
    next_pos = pos[:, -1] + 1

    def step(carry, i):
        cache, logits, p, done, key = carry
        key, sub = jax.random.split(key)
        tok = _sample(logits, sub, temperature, top_k, top_p).astype(jnp.int32)
        out = jnp.where(done, pad, tok)
        valid = ~done
        done = done | (tok == eos)
        h, cache = forward_cached(model, out[:, None], p[:, None], kv_valid, cache, Tp + i)
        return (cache, model.logits(h)[:, 0], p + 1, done, key), (out, valid)

    init = (cache, last_logits, next_pos, jnp.zeros((B,), bool), key)
    _, (toks, valid) = jax.lax.scan(step, init, jnp.arange(max_new))
    return toks.T, valid.T.astype(jnp.float32)


# ----------------------------------------------------------------------------- HF checkpoints


def _hf_names(cfg: ModelConfig) -> dict[tuple, tuple[str, bool]]:
    """Our parameter path -> (HF tensor name, transpose?)."""
    m = {("embed", "embedding"): ("model.embed_tokens.weight", False), ("norm", "scale"): ("model.norm.weight", False)}
    if not cfg.tie_word_embeddings:
        m[("lm_head", "kernel")] = ("lm_head.weight", True)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for n in "qkvo":
            m[("layers", i, "attn", f"{n}_proj", "kernel")] = (p + f"self_attn.{n}_proj.weight", True)
            if cfg.attention_bias and n != "o":
                m[("layers", i, "attn", f"{n}_proj", "bias")] = (p + f"self_attn.{n}_proj.bias", False)
        if cfg.qk_norm:
            m[("layers", i, "attn", "q_norm", "scale")] = (p + "self_attn.q_norm.weight", False)
            m[("layers", i, "attn", "k_norm", "scale")] = (p + "self_attn.k_norm.weight", False)
        for n in ("gate", "up", "down"):
            m[("layers", i, "mlp", f"{n}_proj", "kernel")] = (p + f"mlp.{n}_proj.weight", True)
        m[("layers", i, "input_norm", "scale")] = (p + "input_layernorm.weight", False)
        m[("layers", i, "post_attention_norm", "scale")] = (p + "post_attention_layernorm.weight", False)
    return m


def _resolve(path_or_id: str) -> str:
    if os.path.isdir(path_or_id) or os.path.isfile(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download  # a Hub id: needs network
    return snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])


def _open_tensors(path: str):
    """name -> zero-copy getter over the checkpoint's safetensors file(s)."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if not files:
        raise ValueError(f"no .safetensors weights in {path}")
    where = {}
    for f in files:
        with safe_open(os.path.join(path, f), framework="numpy") as h:
            for k in h.keys():
                where[k] = os.path.join(path, f)

    def get(name):
        with safe_open(where[name], framework="numpy") as h:
            return h.get_tensor(name)
    return where, get


def params_from_hf_state(model: Decoder, names: set, get, source: str, dtype=None, shardings=None) -> None:
    """Fill ``model`` (possibly abstract) from HF-named tensors; each placed on its sharding."""
    cfg = model.config
    mapping = _hf_names(cfg)
    wanted = {hf for hf, _ in mapping.values()}
    missing = sorted(wanted - set(names))
    extra = sorted(n for n in set(names) - wanted if not n.endswith("rotary_emb.inv_freq")
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if missing:
        raise ValueError(f"{source}: missing weight(s) {missing[:5]} for a {cfg.model_type} model")
    if extra:
        raise ValueError(f"{source}: unexpected weight(s) {extra[:5]} for a {cfg.model_type} model "
                         f"(wrong model_type in config.json?)")
    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    new = {}
    for path, var in flat.items():
        hf, transpose = mapping[tuple(path)]
        arr = get(hf)
        arr = arr.T if transpose else arr
        if arr.shape != var.shape:
            raise ValueError(f"{source}: weight {hf} has shape {arr.shape}, expected {var.shape} "
                             f"(parameter {'/'.join(map(str, path))})")
        arr = arr.astype(var.dtype)
        sh = shardings(path, arr.shape) if callable(shardings) else None
        new[path] = var.replace(jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr))
    nnx.update(model, nnx.from_flat_state(new))


def from_pretrained(path_or_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32, shardings=None) -> Decoder:
    """A decoder from a local HF directory (config.json + safetensors, sharded or not) or a Hub id."""
    path = _resolve(path_or_id)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ValueError(f"{path_or_id}: no config.json (expected a Hugging Face checkpoint directory)")
    cfg = ModelConfig.from_hf(json.load(open(cfg_file)))
    model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    where, get = _open_tensors(path)
    params_from_hf_state(model, set(where), get, path, dtype, shardings)
    return model


def save_pretrained(model: Decoder, path: str) -> None:
    """config.json + model.safetensors that transformers' PyTorch classes load."""
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = {}
    for p, (hf, transpose) in _hf_names(cfg).items():
        a = np.asarray(jax.device_get(flat[p][...]), np.float32)
        out[hf] = np.ascontiguousarray(a.T if transpose else a)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.model_type]]
    hf["torch_dtype"] = "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def load_tokenizer(path_or_id: str):
    """The tokenizer via transformers (a local directory or a Hub id)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path_or_id)
