"""KV-cache generation from left-padded prompts (greedy or top-k / top-p sampling)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spo_jax.models.decoder import Decoder, layer_masks


def forward_cached(model: Decoder, ids_BT, positions_BT, kv_valid_BS, cache, start):
    """Run ``ids_BT`` at cache slots [start, start+T): write their K/V, attend over valid earlier slots.

    cache = (k [L, B, S, KV, hd], v [L, B, S, KV, hd]). Returns (hidden [B, T, D], cache).
    """
    B, T = ids_BT.shape
    S = cache[0].shape[2]
    slot_q = start + jnp.arange(T)
    mask = (jnp.arange(S)[None, :] <= slot_q[:, None])[None] & kv_valid_BS[:, None, :]  # [B, T, S]
    masks = layer_masks(model.config, mask, slot_q[None], jnp.arange(S)[None])
    x, inv_freq = model.embed_inputs(ids_BT, positions_BT)
    ks, vs = cache
    for i, layer in enumerate(model.layers):
        h = layer.input_norm(x)
        q, k, v = layer.attn.qkv(h, positions_BT, inv_freq)
        # update the stacked cache in place (a per-layer copy + stack would rewrite all of it every step)
        ks = jax.lax.dynamic_update_slice(ks, k.astype(ks.dtype)[None], (i, 0, start, 0, 0))
        vs = jax.lax.dynamic_update_slice(vs, v.astype(vs.dtype)[None], (i, 0, start, 0, 0))
        x = x + layer.attn.attend(q, ks[i].astype(q.dtype), vs[i].astype(q.dtype), masks[i])
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
