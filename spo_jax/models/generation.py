"""KV-cache generation from left-padded prompts (greedy or top-k / top-p sampling).

Two kinds of compiled program, so that a whole sampling job compiles a handful of them:

- **prefill** (one per batch size x prompt width x first cache size): the prompt through the decoder with
  attention over the prompt only; writes its keys / values into a fresh cache and samples nothing.
- **decode chunk** (one per batch size x cache size x sampling settings; the prompt width is traced): up to
  ``DECODE_CHUNK`` steps in a ``lax.while_loop`` that also ends when every row has finished; each step
  samples a token from the previous logits, writes its K/V at the next cache slot and attends over the
  cache's ``S`` slots. The budget (``max_new_tokens``) is a traced argument, never a compile key.

The cache holds ``S = length_bucket(filled length)`` slots, not prompt + budget: it starts at the bucket
of the prompt plus one chunk and grows (a copy into the next bucket) only when a chunk would not fit, so
attention touches at most ~1.5x the filled part, and a job whose rows all stop early never pays for the
budget it did not use. Between chunks the host reads one flag and stops when every row is done.

Sampling randomness: step ``t`` draws the whole batch's tokens with ``jax.random.categorical(sub_t,
logits [B, V])`` where ``key_0 = key`` and ``key_{t+1}, sub_t = split(key_t)`` -- the chain of the earlier
single-program implementation, carried across chunks, so samples do not depend on the chunking or the
cache size (but a row's draw does depend on the batch size B).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spo_jax.models.decoder import Decoder, layer_masks

DECODE_CHUNK = 32  # decode steps per compiled call (the host checks "all rows done" between calls)


def length_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of ``minimum``, 2^k and 3 * 2^(k-1) that is >= ``n`` (at most ~33% padding)."""
    b = minimum
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 and b >= 4 else 1 << b.bit_length()
    return b


def prompt_bucket(n: int) -> int:
    """A prompt width: ``n`` rounded up to a multiple of 32 (prefill cost grows with the padded width, so
    prompts get finer buckets than the cache; one prefill program per bucket)."""
    return -(-n // 32) * 32


def batch_bucket(n: int, batch_size: int) -> int:
    """Rows to run ``n`` real rows in: the next power of two, at most ``batch_size``."""
    return min(batch_size, 1 << max(0, n - 1).bit_length())


def _new_cache(model: Decoder, B: int, S: int):
    cfg = model.config
    shape = (cfg.num_hidden_layers, B, S, cfg.num_key_value_heads, cfg.head_dim)
    return jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)


def prefill_forward(model: Decoder, ids_BT, positions_BT, mask_BT, cache_slots: int):
    """The prompt through the decoder; returns (hidden [B, T, D], cache with its K/V at slots [0, T)).

    Queries attend causally to real (mask 1) prompt keys; sliding windows count cache slots."""
    B, T = ids_BT.shape
    slots = jnp.arange(T)[None]
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & mask_BT[:, None, :]
    masks = layer_masks(model.config, mask, slots, slots)
    x, inv_freq = model.embed_inputs(ids_BT, positions_BT)
    ks, vs = [], []
    for layer, m in zip(model.layers, masks):
        q, k, v = layer.attn.qkv(layer.input_norm(x), positions_BT, inv_freq)
        ks.append(k)
        vs.append(v)
        x = x + layer.attn.attend(q, k, v, m, is_causal=True)
        x = x + layer.mlp(layer.post_attention_norm(x))
    ck, cv = _new_cache(model, B, cache_slots)
    ck = jax.lax.dynamic_update_slice(ck, jnp.stack(ks).astype(ck.dtype), (0, 0, 0, 0, 0))
    cv = jax.lax.dynamic_update_slice(cv, jnp.stack(vs).astype(cv.dtype), (0, 0, 0, 0, 0))
    return model.norm(x), (ck, cv)


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


def _filter(logits_BV, temperature, top_k, top_p):
    """Temperature-scaled logits with the tokens outside top-k / top-p set to -inf."""
    logits = logits_BV / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_l = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_l, axis=-1)
        # keep the smallest prefix whose mass reaches top_p
        cutoff_idx = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_l, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _sample(logits_BV, key, temperature, top_k, top_p):
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1)
    return jax.random.categorical(key, _filter(logits_BV, temperature, top_k, top_p), axis=-1)


def generate(model: Decoder, prompt_ids, prompt_mask, *, max_new_tokens: int, key=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id=None, pad_id: int = 0):
    """Batched generation from left-padded prompts with a KV cache.

    prompt_ids, prompt_mask: [B, Tp] (mask 1 on real tokens, left padding 0).
    Greedy when temperature == 0, else sampling (top-k / top-p) from ``key`` (see the module docstring
    for how the steps use it).
    ``eos_id``: an int or a sequence of ints (a row stops at the first of ANY of them); None = the
    model config's ``eos_token_id`` (all of its ids when it is a list, as Llama 3.x has); ``()`` = never stop.
    Returns (tokens [B, max_new_tokens] int32, mask [B, max_new_tokens] float32): after EOS
    (which is kept) rows emit ``pad_id`` with mask 0. Stops computing once every row has finished.
    Compiles one prefill per (B, Tp) and one decode chunk per (B, cache bucket, sampling settings).
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0; got {max_new_tokens}")
    top_k = 0 if top_k is None else int(top_k)
    top_p = 1.0 if top_p is None else float(top_p)
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"invalid sampling settings temperature={temperature} top_k={top_k} top_p={top_p}")
    if eos_id is None:
        eos = model.config.eos_token_ids
    elif isinstance(eos_id, (list, tuple, np.ndarray)):
        eos = tuple(int(e) for e in np.asarray(eos_id).reshape(-1))
    else:
        eos = (int(eos_id),)
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, bool)
    B, Tp = prompt_ids.shape
    key = jax.random.PRNGKey(0) if key is None else key
    graphdef, params = nnx.split(model)
    settings = (float(temperature), top_k, top_p, eos, int(pad_id))

    chunk = DECODE_CHUNK
    S = length_bucket(Tp + min(chunk, max_new_tokens))
    cache, logits, pos = _prefill_jit(graphdef, params, prompt_ids, prompt_mask, S)
    kv_valid = _kv_valid(prompt_mask, S)
    done = jnp.zeros((B,), bool)
    toks = np.full((B, max_new_tokens), int(pad_id), np.int32)
    valid = np.zeros((B, max_new_tokens), np.float32)
    step = 0
    while step < max_new_tokens:
        if Tp + step == S:  # the cache is full: copy it into the next length bucket
            S = length_bucket(Tp + step + min(chunk, max_new_tokens - step))
            cache = _grow_jit(cache, S)
            kv_valid = _kv_valid(prompt_mask, S)
        limit = min(chunk, max_new_tokens - step, S - Tp - step)
        cache, logits, pos, done, key, t, v, ran, all_done = _decode_jit(
            graphdef, params, cache, kv_valid, logits, pos, done, key, Tp + step, limit, chunk, *settings)
        t, v, ran, all_done = jax.device_get((t, v, ran, all_done))
        toks[:, step:step + ran] = t[:, :ran]
        valid[:, step:step + ran] = v[:, :ran]
        step += int(ran)
        if all_done:
            break
    return jnp.asarray(toks), jnp.asarray(valid)


def _kv_valid(prompt_mask, slots: int):
    """[B, slots]: the prompt's mask, then every generated slot valid (causality masks the unfilled ones)."""
    B, Tp = prompt_mask.shape
    return jnp.concatenate([prompt_mask, jnp.ones((B, slots - Tp), bool)], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill_jit(graphdef, params, prompt_ids, prompt_mask, cache_slots):
    model = nnx.merge(graphdef, params)
    pos = jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=1) - 1, 0)
    hidden, cache = prefill_forward(model, prompt_ids, pos, prompt_mask, cache_slots)
    return cache, model.logits(hidden[:, -1:])[:, 0], pos[:, -1] + 1


@functools.partial(jax.jit, static_argnums=(1,))
def _grow_jit(cache, slots):
    pad = ((0, 0), (0, 0), (0, slots - cache[0].shape[2]), (0, 0), (0, 0))
    return tuple(jnp.pad(c, pad) for c in cache)


@functools.partial(jax.jit, static_argnums=(0, 10, 11, 12, 13, 14, 15), donate_argnums=(2,))
def _decode_jit(graphdef, params, cache, kv_valid, logits, pos, done, key, slot0, limit, chunk,
                temperature, top_k, top_p, eos, pad):
    """Up to ``limit`` (<= ``chunk``) steps, the first at cache slot ``slot0``; ends early once every row
    is done. Compiled per (B, cache slots, chunk, sampling settings): the prompt width, the step and the
    budget are traced."""
    model = nnx.merge(graphdef, params)
    B = kv_valid.shape[0]
    eos_ids = jnp.asarray(eos, jnp.int32)

    def cond(carry):
        i, done = carry[0], carry[4]
        return (i < limit) & ~jnp.all(done)

    def body(carry):
        i, cache, logits, p, done, key, toks, valid = carry
        key, sub = jax.random.split(key)
        tok = _sample(logits, sub, temperature, top_k, top_p).astype(jnp.int32)
        out = jnp.where(done, pad, tok)
        toks = jax.lax.dynamic_update_slice(toks, out[:, None], (0, i))
        valid = jax.lax.dynamic_update_slice(valid, (~done).astype(jnp.float32)[:, None], (0, i))
        done = done | jnp.isin(tok, eos_ids)
        h, cache = forward_cached(model, out[:, None], p[:, None], kv_valid, cache, slot0 + i)
        return i + 1, cache, model.logits(h)[:, 0], p + 1, done, key, toks, valid

    init = (jnp.int32(0), cache, logits, pos, done, key, jnp.full((B, chunk), pad, jnp.int32),
            jnp.zeros((B, chunk), jnp.float32))
    i, cache, logits, pos, done, key, toks, valid = jax.lax.while_loop(cond, body, init)
    return cache, logits, pos, done, key, toks, valid, i, jnp.all(done)
