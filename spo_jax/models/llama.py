"""Flax NNX decoder for the Llama family (Llama 2/3/3.1/3.2 with llama3 RoPE scaling, Mistral,
Qwen2/2.5, Qwen3) and GPT-2, with KV-cache generation and Hugging Face safetensors (and GGUF, see
``spo_jax.models.gguf``) import/export.

One config-driven ``Decoder``: GPT-2 differs from Llama only in ModelConfig fields (LayerNorm with bias,
learned absolute positions instead of RoPE, a non-gated MLP with a GELU, biases everywhere).

Parameter paths (for sharding rules): ``embed/embedding [V, D]``, ``pos_embed/embedding [P, D]``
(GPT-2 only), ``layers/<i>/attn/{q,k,v,o}_proj/{kernel,bias}``, ``layers/<i>/mlp/{gate,up,down}_proj/
{kernel,bias}`` (no ``gate_proj`` in GPT-2), ``layers/<i>/{input,post_attention}_norm/{scale,bias}``,
``norm/{scale,bias}``, ``lm_head/kernel [D, V]`` (absent when tied). Biases exist only where the
family has them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os

import numpy as np
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")

# HF activation names -> functions. The "gelu_new" family is GELU's tanh approximation.
ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters; ``from_hf`` / ``to_hf`` convert from / to an HF ``config.json`` dict.

    ``rms_norm_eps`` is the epsilon of every norm (GPT-2's ``layer_norm_epsilon`` too).
    ``eos_token_id`` is an int, a tuple of ints (Llama 3.x lists several) or None.
    """
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
    norm_type: str = "rms"  # "rms" (RMSNorm, scale only) or "layer" (LayerNorm with bias)
    position_embedding: str = "rope"  # "rope" or "learned" (absolute, indexed by ``positions``)
    hidden_act: str = "silu"  # a key of ACTIVATIONS
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x)))
    mlp_bias: bool = False
    attention_out_bias: bool = False  # o_proj bias (attention_bias covers q/k/v)

    @property
    def eos_token_ids(self) -> tuple:
        """All EOS ids as a tuple (empty when there is none)."""
        e = self.eos_token_id
        return () if e is None else tuple(e) if isinstance(e, (tuple, list)) else (int(e),)

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type", "llama")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if mt == "gpt2":
            return cls._from_gpt2(d)
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if k not in d:
                raise ValueError(f"model config is missing {k!r}")
        heads = int(d["num_attention_heads"])
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        theta = d.get("rope_theta") or (rope or {}).get("rope_theta", 10000.0)
        if rope and rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        attention_bias = bool(d.get("attention_bias", mt == "qwen2"))
        return cls(
            model_type=mt, vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())) if rope else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=attention_bias, qk_norm=mt == "qwen3",
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=_eos(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            sliding_window=_sliding_window(mt, d),
            hidden_act=_act(d.get("hidden_act", "silu"), "hidden_act"),
            mlp_bias=bool(d.get("mlp_bias", False)),
            attention_out_bias=attention_bias and mt != "qwen2")  # Qwen2: q/k/v biases only

    @classmethod
    def _from_gpt2(cls, d: dict) -> "ModelConfig":
        """GPT-2 names (n_embd, n_layer, n_head, n_positions, n_inner, ...) -> ModelConfig."""
        for k in ("vocab_size", "n_embd", "n_layer", "n_head"):
            if k not in d:
                raise ValueError(f"gpt2 config is missing {k!r}")
        if d.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("gpt2 config: scale_attn_by_inverse_layer_idx=True is not supported "
                             "(set it to false or use another implementation)")
        if not d.get("scale_attn_weights", True):
            raise ValueError("gpt2 config: scale_attn_weights=False is not supported (only 1/sqrt(head_dim))")
        if d.get("add_cross_attention", False):
            raise ValueError("gpt2 config: add_cross_attention=True (encoder-decoder) is not supported")
        # reorder_and_upcast_attn only changes the order/precision of the same product: accepted.
        D, H = int(d["n_embd"]), int(d["n_head"])
        if D % H:
            raise ValueError(f"gpt2 config: n_embd={D} is not divisible by n_head={H}")
        return cls(
            model_type="gpt2", vocab_size=int(d["vocab_size"]), hidden_size=D,
            intermediate_size=int(d.get("n_inner") or 4 * D), num_hidden_layers=int(d["n_layer"]),
            num_attention_heads=H, num_key_value_heads=H, head_dim=D // H,
            rms_norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            attention_bias=True, attention_out_bias=True, mlp_bias=True,
            max_position_embeddings=int(d.get("n_positions", 1024)),
            bos_token_id=d.get("bos_token_id"), eos_token_id=_eos(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            norm_type="layer", position_embedding="learned", gated_mlp=False,
            hidden_act=_act(d.get("activation_function", "gelu_new"), "activation_function"))

    def to_hf(self) -> dict:
        """An HF config.json dict (without ``architectures``) that the family's config class loads."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        if self.model_type == "gpt2":
            return dict(model_type="gpt2", vocab_size=self.vocab_size, n_embd=self.hidden_size,
                        n_layer=self.num_hidden_layers, n_head=self.num_attention_heads,
                        n_positions=self.max_position_embeddings, n_inner=self.intermediate_size,
                        layer_norm_epsilon=self.rms_norm_eps, activation_function=self.hidden_act,
                        tie_word_embeddings=self.tie_word_embeddings, scale_attn_weights=True,
                        bos_token_id=self.bos_token_id, eos_token_id=eos, pad_token_id=self.pad_token_id)
        d = dataclasses.asdict(self)
        for k in ("qk_norm", "norm_type", "position_embedding", "gated_mlp", "attention_out_bias"):
            d.pop(k)
        if self.model_type != "llama" and not self.mlp_bias:
            d.pop("mlp_bias")  # a LlamaConfig field only
        if d["sliding_window"] is None:
            d.pop("sliding_window")
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        d["eos_token_id"] = eos
        return d


def _eos(e):
    """HF eos_token_id (int, list or None) -> int, tuple or None (hashable)."""
    if isinstance(e, (list, tuple)):
        return tuple(int(x) for x in e) if len(e) != 1 else int(e[0])
    return None if e is None else int(e)


def _act(name: str, field: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported {field} {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return name


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


def _at_least_f32(dtype):
    """fp32 for bf16/fp16/fp32 compute; fp64 kept under jax x64 (exact finite-difference tests)."""
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


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
    ang = positions_BT[..., None].astype(inv_freq.dtype) * inv_freq  # [B, T, K/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHK.astype(_at_least_f32(x_BTHK.dtype)), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(_at_least_f32(x.dtype))
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(xf.dtype)).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim, eps, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(_at_least_f32(x.dtype))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(xf.dtype) + self.bias[...].astype(xf.dtype)).astype(x.dtype)


def _norm(cfg: ModelConfig, param_dtype):
    cls = {"rms": RMSNorm, "layer": LayerNorm}[cfg.norm_type]
    return cls(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)


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
        self.o_proj = _linear(H * hd, D, cfg.attention_out_bias, rngs, dtype, param_dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype)
        self.cfg = cfg

    def qkv(self, x, positions, inv_freq):
        """Projected q, k, v [B, T, heads, hd]; RoPE applied when ``inv_freq`` is not None."""
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(B, T, cfg.num_key_value_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if inv_freq is None:
            return q, k, v
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend(self, q, k, v, mask_BTS):
        cfg = self.cfg
        B, T, H, hd = q.shape
        G = H // cfg.num_key_value_heads
        q = q.reshape(B, T, cfg.num_key_value_heads, G, hd)
        s = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(_at_least_f32(q.dtype)) / math.sqrt(hd)
        s = jnp.where(mask_BTS[:, None, None], s, -1e30)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(B, T, H * hd)
        return self.o_proj(o)

    def __call__(self, x, positions, mask_BTS, inv_freq):
        q, k, v = self.qkv(x, positions, inv_freq)
        return self.attend(q, k, v, mask_BTS)


class MLP(nnx.Module):
    """Gated ``down(act(gate(x)) * up(x))`` (Llama) or plain ``down(act(up(x)))`` (GPT-2's c_fc/c_proj)."""

    def __init__(self, cfg, rngs, dtype, param_dtype):
        D, F, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.gated_mlp:
            self.gate_proj = _linear(D, F, b, rngs, dtype, param_dtype)
        self.up_proj = _linear(D, F, b, rngs, dtype, param_dtype)
        self.down_proj = _linear(F, D, b, rngs, dtype, param_dtype)
        self.act = cfg.hidden_act
        self.gated = cfg.gated_mlp

    def __call__(self, x):
        act = ACTIVATIONS[self.act]
        h = act(self.gate_proj(x)) * self.up_proj(x) if self.gated else act(self.up_proj(x))
        return self.down_proj(h)


class Block(nnx.Module):
    def __init__(self, cfg, rngs, dtype, param_dtype):
        self.input_norm = _norm(cfg, param_dtype)
        self.attn = Attention(cfg, rngs, dtype, param_dtype)
        self.post_attention_norm = _norm(cfg, param_dtype)
        self.mlp = MLP(cfg, rngs, dtype, param_dtype)

    def __call__(self, x, positions, mask, inv_freq):
        x = x + self.attn(self.input_norm(x), positions, mask, inv_freq)
        return x + self.mlp(self.post_attention_norm(x))


class Decoder(nnx.Module):
    """Pre-norm decoder: ``model(input_ids, positions, segment_ids) -> hidden [B, T, D]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = cfg
        self.dtype = dtype
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                               embedding_init=nnx.initializers.normal(0.02))
        if cfg.position_embedding == "learned":
            self.pos_embed = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                       param_dtype=param_dtype, rngs=rngs,
                                       embedding_init=nnx.initializers.normal(0.01))
        self.layers = nnx.List([Block(cfg, rngs, dtype, param_dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = _norm(cfg, param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False, rngs, dtype, param_dtype)
        self.remat = False

    def embed_inputs(self, input_ids, positions):
        """Token embeddings (+ learned position embeddings at ``positions``) and RoPE's inv_freq (or None)."""
        x = self.embed(input_ids)
        if self.config.position_embedding == "learned":
            return x + self.pos_embed(positions), None
        return x, rope_inv_freq(self.config)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        causal = jnp.tril(jnp.ones((T, T), bool))
        mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        mask = mask & _window_mask(self.config, positions, positions)
        x, inv_freq = self.embed_inputs(input_ids, positions)
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
        return jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype)).astype(_at_least_f32(hidden.dtype))


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
    x, inv_freq = model.embed_inputs(ids_BT, positions_BT)
    ks, vs = cache
    for i, layer in enumerate(model.layers):
        h = layer.input_norm(x)
        q, k, v = layer.attn.qkv(h, positions_BT, inv_freq)
        # update the stacked cache in place (a per-layer copy + stack would rewrite all of it every step)
        ks = jax.lax.dynamic_update_slice(ks, k.astype(ks.dtype)[None], (i, 0, start, 0, 0))
        vs = jax.lax.dynamic_update_slice(vs, v.astype(vs.dtype)[None], (i, 0, start, 0, 0))
        x = x + layer.attn.attend(q, ks[i].astype(q.dtype), vs[i].astype(q.dtype), mask)
        x = x + layer.mlp(layer.post_attention_norm(x))
    return model.norm(x), (ks, vs)


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
    ``eos_id``: an int or a sequence of ints (a row stops at the first of ANY of them); None = the
    model config's ``eos_token_id`` (all of its ids when it is a list, as Llama 3.x has); ``()`` = never stop.
    Returns (tokens [B, max_new_tokens] int32, mask [B, max_new_tokens] float32): after EOS
    (which is kept) rows emit ``pad_id`` with mask 0. One compile per (B, Tp, max_new_tokens).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0; got {max_new_tokens}")
    top_k = 0 if top_k is None else top_k
    top_p = 1.0 if top_p is None else top_p
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"invalid sampling settings temperature={temperature} top_k={top_k} top_p={top_p}")
    key = jax.random.PRNGKey(0) if key is None else key
    graphdef, params = nnx.split(model)
    if eos_id is None:
        eos = model.config.eos_token_ids
    elif isinstance(eos_id, (list, tuple, np.ndarray)):
        eos = tuple(int(e) for e in np.asarray(eos_id).reshape(-1))
    else:
        eos = (int(eos_id),)
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
    eos_ids = jnp.asarray(eos, jnp.int32)

    def step(carry, i):
        cache, logits, p, done, key = carry
        key, sub = jax.random.split(key)
        tok = _sample(logits, sub, temperature, top_k, top_p).astype(jnp.int32)
        out = jnp.where(done, pad, tok)
        valid = ~done
        done = done | jnp.isin(tok, eos_ids)
        h, cache = forward_cached(model, out[:, None], p[:, None], kv_valid, cache, Tp + i)
        return (cache, model.logits(h)[:, 0], p + 1, done, key), (out, valid)

    init = (cache, last_logits, next_pos, jnp.zeros((B,), bool), key)
    _, (toks, valid) = jax.lax.scan(step, init, jnp.arange(max_new))
    return toks.T, valid.T.astype(jnp.float32)


# ----------------------------------------------------------------------------- HF checkpoints


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
        raise ValueError(f"{source}: missing weight(s) {missing[:5]} for a {cfg.model_type} model")
    if extra:
        raise ValueError(f"{source}: unexpected weight(s) {extra[:5]} for a {cfg.model_type} model "
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
                raise ValueError(f"{source}: fused weight {hf} has shape {arr.shape}; its last axis does "
                                 f"not split into {n} equal parts")
            w = arr.shape[-1] // n
            arr = arr[..., i * w:(i + 1) * w]
        if arr.shape != var.shape:
            raise ValueError(f"{source}: weight {hf} has shape {arr.shape}, expected {var.shape} "
                             f"(parameter {'/'.join(map(str, path))})")
        arr = np.asarray(arr).astype(var.dtype)
        sh = shardings(path, arr.shape) if callable(shardings) else None
        new[path] = var.replace(jax.device_put(arr, sh) if sh is not None else jnp.asarray(arr))
    nnx.update(model, nnx.from_flat_state(new))


def from_pretrained(path_or_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32, shardings=None) -> Decoder:
    """A decoder from a local HF directory (config.json + safetensors, sharded or not), a Hub id, or a
    llama-architecture ``.gguf`` file (dequantized to float32, then cast to ``param_dtype``)."""
    if str(path_or_id).endswith(".gguf"):
        from spo_jax.models.gguf import load_gguf
        hf_cfg, tensors = load_gguf(str(path_or_id))
        cfg = ModelConfig.from_hf(hf_cfg)
        model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
        params_from_hf_state(model, set(tensors), tensors.pop, str(path_or_id), shardings)
        return model
    path = _resolve(path_or_id)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ValueError(f"{path_or_id}: no config.json (expected a Hugging Face checkpoint directory)")
    cfg = ModelConfig.from_hf(json.load(open(cfg_file)))
    model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    where, get = _open_tensors(path)
    params_from_hf_state(model, set(where), get, path, shardings)
    return model


def save_pretrained(model: Decoder, path: str) -> None:
    """config.json + model.safetensors that transformers' PyTorch classes load."""
    from safetensors.numpy import save_file
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
    if str(path_or_id).endswith(".gguf"):
        from spo_jax.models.gguf import load_tokenizer as gguf_tokenizer
        return gguf_tokenizer(str(path_or_id))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path_or_id)
