"""The config-driven Flax NNX decoder (``Decoder``) and its layers, and the pure ``apply`` / ``unembedding``
functions the trainer uses (docs/DESIGN.md, Contract 2).

Parameter paths (for sharding rules): ``embed/embedding [V, D]``, ``pos_embed/embedding [P, D]``
(GPT-2 only), ``layers/<i>/attn/{q,k,v,o}_proj/{kernel,bias}``, ``layers/<i>/mlp/{gate,up,down}_proj/
{kernel,bias}`` (no ``gate_proj`` in GPT-2), ``layers/<i>/{input,post_attention}_norm/{scale,bias}``,
``norm/{scale,bias}``, ``lm_head/kernel [D, V]`` (absent when tied). Biases exist only where the
family has them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from spo_jax import sharding
from spo_jax.models.config import ACTIVATIONS, ModelConfig

__all__ = ["layer_masks", "at_least_f32", "rope_inv_freq", "apply_rope", "RMSNorm", "LayerNorm", "Attention",
           "MLP", "Block", "Decoder", "create_model", "set_remat", "ATTENTION_IMPLEMENTATIONS", "set_attention",
           "apply", "unembedding"]


def layer_masks(cfg: ModelConfig, mask, q_pos, k_pos) -> list:
    """Each layer's attention mask: ``mask`` (causal, padding, segments) and, on a windowed layer, also
    ``q_pos - k_pos < window``; one array per distinct window (``cfg.layer_windows``)."""
    by_window = {}
    for w in set(cfg.layer_windows):
        by_window[w] = mask if w is None else mask & ((q_pos[..., :, None] - k_pos[..., None, :]) < w)
    return [by_window[w] for w in cfg.layer_windows]


def at_least_f32(dtype):
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
    x1, x2 = jnp.split(x_BTHK.astype(at_least_f32(x_BTHK.dtype)), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim, eps, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(at_least_f32(x.dtype))
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(xf.dtype)).astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim, eps, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(at_least_f32(x.dtype))
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(xf.dtype) + self.bias[...].astype(xf.dtype)).astype(x.dtype)


def _norm(cfg: ModelConfig, param_dtype):
    cls = {"rms": RMSNorm, "layer": LayerNorm}[cfg.norm_type]
    return cls(cfg.hidden_size, cfg.rms_norm_eps, param_dtype)


class Linear(nnx.Linear):
    """``nnx.Linear`` whose kernel is used gathered over fsdp (``sharding.gathered``; ``gather_spec``: its
    partition rule without fsdp), so its gradient is a local partial sum, never a batch-gathered activation."""

    def __call__(self, inputs, out_sharding=None):
        kernel = sharding.gathered(self.kernel[...], sharding.P(*self.gather_spec))
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _linear(i, o, bias, rngs, dtype, param_dtype, gather_spec=(None, "tensor")):
    """A projection; ``gather_spec``: (None, "tensor") column-parallel (D -> F), ("tensor", None) row-parallel
    (F -> D), as ``sharding.LLAMA_RULES`` split them."""
    layer = Linear(i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                   kernel_init=nnx.initializers.normal(0.02))
    layer.gather_spec = gather_spec
    return layer


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs, dtype, param_dtype):
        D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = _linear(D, H * hd, b, rngs, dtype, param_dtype)
        self.k_proj = _linear(D, KV * hd, b, rngs, dtype, param_dtype)
        self.v_proj = _linear(D, KV * hd, b, rngs, dtype, param_dtype)
        self.o_proj = _linear(H * hd, D, cfg.attention_out_bias, rngs, dtype, param_dtype, ("tensor", None))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, param_dtype)
        self.cfg = cfg
        self.implementation = "einsum"  # see set_attention

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

    def attend(self, q, k, v, mask_BTS, is_causal=False):
        """Attention of q [B, T, H, hd] over k, v [B, S, KV, hd] where ``mask_BTS`` is True; -> o_proj output.

        ``is_causal``: the mask is causal over T == S (lets cuDNN skip the masked half)."""
        cfg = self.cfg
        B, T, H, hd = q.shape
        if self.implementation != "einsum":
            # cuDNN's fused kernel for whole sequences; XLA's for the one-token decode steps over a cache
            impl = "xla" if self.implementation == "cudnn" and not is_causal else self.implementation
            o = jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None], is_causal=is_causal and impl == "cudnn",
                                             implementation=impl)
            return self.o_proj(o.reshape(B, T, H * hd))
        G = H // cfg.num_key_value_heads
        q = q.reshape(B, T, cfg.num_key_value_heads, G, hd)
        s = jnp.einsum("btkgh,bskh->bkgts", q, k).astype(at_least_f32(q.dtype)) / math.sqrt(hd)
        s = jnp.where(mask_BTS[:, None, None], s, -1e30)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bkgts,bskh->btkgh", p, v).reshape(B, T, H * hd)
        return self.o_proj(o)

    def __call__(self, x, positions, mask_BTS, inv_freq):
        q, k, v = self.qkv(x, positions, inv_freq)
        return self.attend(q, k, v, mask_BTS, is_causal=True)


class MLP(nnx.Module):
    """Gated ``down(act(gate(x)) * up(x))`` (Llama) or plain ``down(act(up(x)))`` (GPT-2's c_fc/c_proj)."""

    def __init__(self, cfg, rngs, dtype, param_dtype):
        D, F, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        if cfg.gated_mlp:
            self.gate_proj = _linear(D, F, b, rngs, dtype, param_dtype)
        self.up_proj = _linear(D, F, b, rngs, dtype, param_dtype)
        self.down_proj = _linear(F, D, b, rngs, dtype, param_dtype, ("tensor", None))
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
    """Pre-norm decoder: ``model(input_ids, positions, segment_ids) -> hidden [B, T, D]`` (the final
    norm's output, not logits: ``model.logits(hidden)`` gives them; ``spo_jax.logprobs`` computes
    token log-probs from ``hidden`` and :meth:`unembedding` in chunks, without [B, T, V] logits)."""

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
        self.remat_policy = "full"

    def _embedding(self):
        """The [V, D] token embedding, gathered over fsdp (``sharding.gathered``)."""
        return sharding.gathered(self.embed.embedding[...], sharding.P("tensor", None))

    def embed_inputs(self, input_ids, positions):
        """Token embeddings (+ learned position embeddings at ``positions``) and RoPE's inv_freq (or None)."""
        x = jnp.take(self._embedding(), input_ids, axis=0).astype(self.dtype)
        if self.config.position_embedding == "learned":
            return x + self.pos_embed(positions), None
        return x, rope_inv_freq(self.config)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        """Hidden states ``[B, T, D]`` (compute dtype) of ``input_ids`` ``[B, T]`` int.

        ``positions`` ``[B, T]`` int (default ``0..T-1`` per row): each token's position in its own
        sequence (RoPE / learned positions). ``segment_ids`` ``[B, T]`` int (default all 1): tokens
        attend causally within their segment only, so packed rows hold several sequences (Contract 1:
        segment 0 is padding). Returns hidden states, not logits (see :meth:`logits`)."""
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        causal = jnp.tril(jnp.ones((T, T), bool))
        mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        masks = layer_masks(self.config, mask, positions, positions)
        x, inv_freq = self.embed_inputs(input_ids, positions)
        for layer, mask in zip(self.layers, masks):
            x = sharding.batch_split(x)
            if self.remat:
                # graph_updates=False: a layer mutates no state, so nothing is written back out of the
                # checkpoint; with write-back nnx.remat tried to set the LoRA dropout key (a frozen,
                # non-parameter Variable from the jit's trace level) inside the grad trace and crashed
                policy = REMAT_POLICIES[self.remat_policy]
                x = nnx.remat(lambda m, *a: m(*a), graph_updates=False, policy=policy)(layer, x, positions, mask,
                                                                                      inv_freq)
            else:
                x = layer(x, positions, mask, inv_freq)
        return sharding.batch_split(self.norm(x))

    def unembedding(self):
        """``(W [D, V], None)``: the output projection (the tied embedding's transpose, or ``lm_head``)."""
        if self.config.tie_word_embeddings:
            return self._embedding().T, None
        return sharding.gathered(self.lm_head.kernel[...], sharding.P(None, "tensor")), None

    def logits(self, hidden):
        """Next-token logits ``[B, T, V]`` (at least fp32) of hidden states ``[B, T, D]`` from ``__call__``:
        ``model.logits(model(input_ids))``. Materialises ``[B, T, V]``: for log-probs of long sequences or
        large vocabularies use ``spo_jax.logprobs`` (chunked)."""
        w, _ = self.unembedding()
        return jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype)).astype(at_least_f32(hidden.dtype))


def create_model(config: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> Decoder:
    return Decoder(config, rngs=rngs or nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)


#: What a rematerialised layer keeps from its forward pass for the backward pass (MaxText's names):
#: ``full``: nothing (every activation recomputed: the least memory, one more forward of FLOPs);
#: ``dots_saveable``: the matmul outputs (recomputes only the cheap element-wise work);
#: ``dots_with_no_batch_dims_saveable``: the matmul outputs that have no batch dimension.
REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "dots_saveable": jax.checkpoint_policies.dots_saveable,
                  "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def set_remat(model: Decoder, on: bool = True, policy: str = "full") -> None:
    """Rematerialise each layer in the backward pass (``on``), keeping what ``policy`` (a key of
    ``REMAT_POLICIES``) names."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy!r}: must be one of {tuple(REMAT_POLICIES)}")
    model.remat = bool(on)
    model.remat_policy = policy


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def set_attention(model: Decoder, implementation: str = "einsum") -> None:
    """How every layer computes attention (the same function, another kernel):

    * ``einsum``: explicit scores, fp32 softmax, einsums (the default; checked against transformers);
    * ``xla``: ``jax.nn.dot_product_attention(implementation="xla")``;
    * ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused (flash) kernel on
      NVIDIA GPUs, for whole sequences (training, prefill; the packing segment ids go in as its mask).
      Fails at compile time on other devices and for shapes or dtypes cuDNN does not support (e.g. float32).

    Whole sequences (training, evaluation, generation's prefill) use the setting; generation's one-token
    decode steps over the KV cache always use ``generation.decode_step``'s einsums (memory-bound work on
    cache layouts made for them).
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: must be one of {ATTENTION_IMPLEMENTATIONS}")
    for layer in model.layers:
        layer.attn.implementation = implementation


def apply(graphdef, params, input_ids, positions=None, segment_ids=None):
    """Functional :meth:`Decoder.__call__`: hidden states ``[B, T, D]`` (not logits) of the model
    ``nnx.merge(graphdef, params)``, for ``jax.jit`` / ``jax.grad`` over ``params`` (``graphdef, params =
    nnx.split(model)``); arguments as ``Decoder.__call__``."""
    return nnx.merge(graphdef, params)(input_ids, positions, segment_ids)


def unembedding(graphdef, params):
    """Functional :meth:`Decoder.unembedding`: ``(W [D, V], None)``."""
    return nnx.merge(graphdef, params).unembedding()
