"""KV-cache generation from left-padded prompts (greedy or top-k / top-p sampling).

Three kinds of compiled program, so that a whole sampling job compiles a handful of them:

- **prefill** (one per shared-prefix length x packed shape P x W): the leading tokens every distinct prompt
  of the batch shares (a chat template's system turn; a multiple of ``PREFIX_MULTIPLE``) computed once, then
  the rest of each distinct prompt packed end to end into P rows of W slots (``pack_prompts``: no left
  padding computed, a prompt repeated ``num_samples`` times computed once), each token attending to the
  shared prefix and causally within its own prompt; returns every layer's keys / values.
- **assemble** (one per packed shape x batch x longest prompt x cache size; small): gathers each batch
  row's prompt K/V into the decode cache, right-aligned at slot ``Tp`` = the longest prompt's length
  (left of it: masked slots), and computes the logits at each row's last prompt token only.
- **decode chunk** (one per rows x cache size x top-k / top-p; the prompt width and the temperature are
  traced, so greedy and sampled calls share it): up to
  ``DECODE_CHUNK`` steps in a ``lax.while_loop`` that also ends when every row has finished; each step
  samples a token from the previous logits, writes its K/V at the next cache slot in place (the loop
  carries the cache, donated) and attends over the cache's ``S`` slots. The budget (``max_new_tokens``)
  is a traced argument, never a compile key.

The cache is one array per layer, keys ``[B, KV, hd, S]`` and values ``[B, KV, S, hd]``: a step's
attention is then two plain batched products per KV head (the query heads grouped by KV head, no
repeated K/V, no copy of the cache; the earlier stacked ``[L, B, S, KV, hd]`` cache was transposed whole
for every layer at every step: 27% of a traced SmolLM2 decode step, whose CPU time fell by a third without
it; benchmarks/RESULTS.md, "Sampling"). It holds ``S = length_bucket(filled
length)`` slots, not prompt + budget: it starts at the bucket of the prompt plus one chunk and grows (a
copy into the next bucket) only when a chunk would not fit, so attention touches at most ~1.5x the filled
part, and a job whose rows all stop early never pays for the budget it did not use. A chunk also ends at
the step where the unfinished rows come to fit in 3/4, 1/2 or 1/4 of the batch (``row_levels``; a traced
bound, ``next_size``): the host then keeps computing only those (``compact_size``, a row gather of the
cache; it grows the cache at once when the next chunk would not fit, and sizes the last level's for the
rest of the budget when that is one growth away: ``compact_slots``, fewer programs to compile), and it
stops when every row is done. On an accelerator (``BACKGROUND_COMPILE``), a decode program this process
has not compiled yet compiles in a background thread ahead of its first call (``_precompile_decode``): the
first one while the prefill runs, the next cache bucket's during the chunk that fills the cache, and a
compacted batch's while the current rows run one more chunk; on a CPU each compiles where it is first
called (the compile would compete with the computation for the same cores).

Sampling randomness: step ``t`` draws the whole batch's tokens with ``jax.random.categorical(sub_t,
logits [B, V])`` where ``key_0 = key`` and ``key_{t+1}, sub_t = split(key_t)`` -- the chain of the earlier
single-program implementation, carried across chunks, so samples do not depend on the chunking, the cache
size or which rows are still computed (a compacted batch takes its rows of the full batch's Gumbel noise),
but a row's draw does depend on the batch size B.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spo_jax.models.decoder import Decoder, at_least_f32, layer_masks

__all__ = ["DECODE_CHUNK", "PREFIX_MULTIPLE", "length_bucket", "prompt_bucket", "batch_bucket", "PromptPack",
           "pack_prompts", "prompt_pack", "decode_args", "prefill_forward", "decode_step", "row_levels", "next_size",
           "compact_size", "compact_slots", "generate", "BACKGROUND_COMPILE"]

DECODE_CHUNK = 32  # decode steps per compiled call (the host checks "all rows done" between calls)
PREFIX_MULTIPLE = 8  # a shared prompt prefix is prefilled once, rounded down to this (fewer prefill programs)


def length_bucket(n: int, minimum: int = 16) -> int:
    """The smallest of ``minimum``, 2^k and 3 * 2^(k-1) that is >= ``n`` (at most ~33% padding)."""
    b = minimum
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 and b >= 4 else 1 << b.bit_length()
    return b


def prompt_bucket(n: int) -> int:
    """A prompt width: ``n`` rounded up to a multiple of 32 (the packed prefill's row widths, and the
    padded width of ``sampling.generate_texts``' batches; finer than the cache's buckets)."""
    return -(-n // 32) * 32


def batch_bucket(n: int, batch_size: int) -> int:
    """Rows to run ``n`` real rows in: the next power of two, at most ``batch_size``."""
    return min(batch_size, 1 << max(0, n - 1).bit_length())


def _new_cache(model: Decoder, B: int, S: int):
    """Zero K and V caches, one array per layer: keys [B, KV, hd, S], values [B, KV, S, hd]."""
    cfg = model.config
    KV, hd = cfg.num_key_value_heads, cfg.head_dim
    ks = tuple(jnp.zeros((B, KV, hd, S), model.dtype) for _ in range(cfg.num_hidden_layers))
    vs = tuple(jnp.zeros((B, KV, S, hd), model.dtype) for _ in range(cfg.num_hidden_layers))
    return ks, vs


class PromptPack(NamedTuple):
    """How ``generate`` prefills a batch of prompts (:func:`pack_prompts`): the distinct prompts packed
    end to end into ``P`` rows of ``W`` slots, and where each batch row's K/V and last hidden state are."""
    prefix: np.ndarray  # [C] the leading tokens every distinct prompt shares, prefilled once (C may be 0)
    ids: np.ndarray  # [P, W] token ids of the prompts after the prefix, 0 on unused slots
    positions: np.ndarray  # [P, W] position of each token within its prompt (C and up)
    segments: np.ndarray  # [P, W] 1 + the prompt's index in its packed row, 0 on unused slots
    src: np.ndarray  # [B, Tp] index of batch row b's prompt token at cache slot t in the prefill's K/V
    #                  (the prefix's C tokens, then the packed rows flat: C + p * W + slot)
    kv_mask: np.ndarray  # [B, Tp] True on cache slots holding a prompt token (right-aligned at Tp)
    last: np.ndarray  # [B] flat index (p * W + slot) of the row's last prompt token in the packed rows
    lengths: np.ndarray  # [B] prompt tokens per row (the first generated token's position)


def pack_prompts(prompt_ids, prompt_mask, attention_ratio: float = 0.0,
                 prefix_multiple: int = PREFIX_MULTIPLE) -> PromptPack:
    """The prefill's layout: the ``C`` leading tokens all distinct prompts share (the common prefix, at most
    the shortest prompt's length - 1, rounded down to a multiple of ``prefix_multiple``; 0 with one distinct
    prompt or ``prefix_multiple=0``) once, then the rest of each distinct prompt (the real tokens of a row, in
    order) once, packed by first-fit decreasing into rows of ``W`` slots (a multiple of 32, from the longest
    rest's bucket up to twice it: the one with the fewest slots ``P * W * (1 + attention_ratio * (C + W))``,
    P rounded up to even), so the prefill computes no left padding, a shared system prompt once and one
    prompt repeated ``num_samples`` times once. The decode cache then holds each row's prompt right-aligned
    at slot ``Tp`` = the longest prompt.
    ``attention_ratio``: attention's FLOPs per token and key slot over the rest of a layer's per token."""
    ids = np.asarray(prompt_ids)
    mask = np.asarray(prompt_mask).astype(bool)
    B = ids.shape[0]
    prompts = [tuple(int(t) for t in ids[b][mask[b]]) for b in range(B)]
    empty = [b for b, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"prompt_mask rows {empty} have no real token: every prompt needs at least one token "
                         "to predict the first response token from.")
    unique = list(dict.fromkeys(prompts))
    full_u = [len(p) for p in unique]
    Tp = max(full_u)
    C = 0
    if len(unique) > 1 and prefix_multiple:
        shared = next((i for i, col in enumerate(zip(*unique)) if len(set(col)) > 1), min(full_u))
        C = min(shared, min(full_u) - 1) // prefix_multiple * prefix_multiple
    prefix = np.asarray(unique[0][:C], np.int32)
    lengths_u = [n - C for n in full_u]  # what is packed: each distinct prompt after the prefix
    order = sorted(range(len(unique)), key=lambda u: (-lengths_u[u], u))

    def first_fit(W):
        room, place = [], {}
        for u in order:
            row = next((r for r, free in enumerate(room) if free >= lengths_u[u]), len(room))
            if row == len(room):
                room.append(W)
            place[u] = (row, W - room[row])
            room[row] -= lengths_u[u]
        return len(room) + (len(room) % 2 if len(room) > 1 else 0), place

    w0 = prompt_bucket(max(lengths_u))
    plans = [(W,) + first_fit(W) for W in range(w0, 2 * w0 + 1, 32)]
    W, P, place = min(plans, key=lambda x: (x[1] * x[0] * (1 + attention_ratio * (C + x[0])), x[0]))
    pids, pos, seg = (np.zeros((P, W), np.int32) for _ in range(3))
    for u, (row, start) in place.items():
        n = lengths_u[u]
        pids[row, start:start + n] = unique[u][C:]
        pos[row, start:start + n] = C + np.arange(n)
        seg[row, start:start + n] = 1 + int(seg[row].max())
    index = {p: u for u, p in enumerate(unique)}
    src = np.zeros((B, Tp), np.int32)
    kv_mask = np.zeros((B, Tp), bool)
    last = np.zeros((B,), np.int32)
    lengths = np.zeros((B,), np.int32)
    for b, p in enumerate(prompts):
        u = index[p]
        row, start = place[u]
        n = lengths[b] = full_u[u]
        src[b, Tp - n:Tp - n + C] = np.arange(C)
        src[b, Tp - n + C:] = C + row * W + start + np.arange(n - C)
        kv_mask[b, Tp - n:] = True
        last[b] = row * W + start + n - C - 1
    return PromptPack(prefix, pids, pos, seg, src, kv_mask, last, lengths)


def _attention_ratio(cfg) -> float:
    """FLOPs of one query over one key slot (scores and weighted values) over a layer's other FLOPs per
    token (its projections and MLP), for :func:`pack_prompts`."""
    D, H, KV, hd, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                       cfg.intermediate_size)
    layer = 2 * D * H * hd + 2 * D * KV * hd + (3 if cfg.gated_mlp else 2) * D * F
    return 2 * H * hd / layer


def prefill_forward(model: Decoder, prefix_C, ids_PW, positions_PW, segments_PW):
    """The shared prefix (``prefix_C``, C >= 0 tokens at positions 0..C-1, causal) and the packed prompts
    after it through the decoder: a packed token attends to the whole prefix and causally to its own
    prompt's tokens (same segment, > 0); sliding windows count positions. Returns (hidden [P, W, D], keys,
    values), one [C + P * W, KV, hd] array per layer: the prefix's, then the packed rows' flat."""
    P, W = ids_PW.shape
    C = prefix_C.shape[0]
    cfg = model.config
    seg = segments_PW
    own = jnp.tril(jnp.ones((W, W), bool))[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    mask = jnp.concatenate([jnp.broadcast_to((seg > 0)[:, :, None], (P, W, C)), own], axis=2)  # [P, W, C + W]
    k_pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(C, dtype=positions_PW.dtype), (P, C)), positions_PW], 1)
    masks = layer_masks(cfg, mask, positions_PW, k_pos)
    x, inv_freq = model.embed_inputs(ids_PW, positions_PW)
    if C:
        pos_c = jnp.arange(C)[None]
        xc, _ = model.embed_inputs(prefix_C[None], pos_c)
        masks_c = layer_masks(cfg, jnp.tril(jnp.ones((C, C), bool))[None], pos_c, pos_c)
    ks, vs = [], []
    for i, (layer, m) in enumerate(zip(model.layers, masks)):
        q, k, v = layer.attn.qkv(layer.input_norm(x), positions_PW, inv_freq)
        flat_k, flat_v = k.reshape(P * W, *k.shape[2:]), v.reshape(P * W, *v.shape[2:])
        if C:
            qc, kc, vc = layer.attn.qkv(layer.input_norm(xc), pos_c, inv_freq)
            if i + 1 < len(model.layers):  # the prefix's hidden state is needed only for the next layer's K/V
                xc = xc + layer.attn.attend(qc, kc, vc, masks_c[i], is_causal=True)
                xc = xc + layer.mlp(layer.post_attention_norm(xc))
            flat_k, flat_v = jnp.concatenate([kc[0], flat_k]), jnp.concatenate([vc[0], flat_v])
            k = jnp.concatenate([jnp.broadcast_to(kc, (P, *kc.shape[1:])), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(vc, (P, *vc.shape[1:])), v], axis=1)
        ks.append(flat_k)
        vs.append(flat_v)
        x = x + layer.attn.attend(q, k, v, m, is_causal=not C)
        x = x + layer.mlp(layer.post_attention_norm(x))
    return model.norm(x), tuple(ks), tuple(vs)


def _attend_cache(attn, q_BHK, k_BKhS, v_BKSh, mask_BS):
    """One query per row over a layer's cache: q [B, H, hd], keys [B, KV, hd, S], values [B, KV, S, hd],
    ``mask_BS`` True where a slot is attended; -> o_proj output [B, D]. GQA groups the H query heads by
    their KV head (no repeated K/V); scores and softmax in fp32 as ``Attention.attend``'s einsum path."""
    cfg = attn.cfg
    B, H, hd = q_BHK.shape
    KV = cfg.num_key_value_heads
    q = q_BHK.reshape(B, KV, H // KV, hd)
    s = jnp.einsum("bkgh,bkhs->bkgs", q, k_BKhS.astype(q.dtype)).astype(at_least_f32(q.dtype)) / math.sqrt(hd)
    s = jnp.where(mask_BS[:, None, None], s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    o = jnp.einsum("bkgs,bksh->bkgh", p, v_BKSh.astype(q.dtype)).reshape(B, H * hd)
    return attn.o_proj(o)


def decode_step(model: Decoder, tok_B, pos_B, kv_valid_BS, cache, slot):
    """One token per row at cache slot ``slot``: write its K/V there, attend over the valid slots <= slot.

    cache = (keys, values), one array per layer: keys [B, KV, hd, S] (S last, so the scores are a plain
    [G, hd] x [hd, S] product per KV head), values [B, KV, S, hd]; updated in place (the decode loop
    carries them, donated). Every attention implementation (``set_attention``) runs this einsum path:
    one query per row over a cache is memory-bound, and these layouts need no copy of the cache.
    Returns (hidden [B, D], cache)."""
    ks, vs = cache
    S = vs[0].shape[2]
    mask = (jnp.arange(S) <= slot)[None] & kv_valid_BS  # [B, S]
    masks = layer_masks(model.config, mask[:, None], jnp.reshape(slot, (1, 1)), jnp.arange(S)[None])
    x, inv_freq = model.embed_inputs(tok_B[:, None], pos_B[:, None])
    new_ks, new_vs = [], []
    for layer, k_cache, v_cache, m in zip(model.layers, ks, vs, masks):
        q, k, v = layer.attn.qkv(layer.input_norm(x), pos_B[:, None], inv_freq)  # [B, 1, heads, hd]
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 3, 1).astype(k_cache.dtype),
                                               (0, 0, 0, slot))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype),
                                               (0, 0, slot, 0))
        new_ks.append(k_cache)
        new_vs.append(v_cache)
        x = x + _attend_cache(layer.attn, q[:, 0], k_cache, v_cache, m[:, 0])[:, None]
        x = x + layer.mlp(layer.post_attention_norm(x))
    return model.norm(x)[:, 0], (tuple(new_ks), tuple(new_vs))


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


def _argmax(x_BV):
    """``jnp.argmax(x, axis=-1)`` (the first index of the maximum) for x without NaN, as two vectorised
    reductions: XLA's CPU argmax is a scalar (value, index) loop, 4.5x slower at [32, 49152], and 2x
    slower still with the Gumbel noise fused into it (benchmarks/RESULTS.md, "Sampling")."""
    V = x_BV.shape[-1]
    top = jnp.max(x_BV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_BV == top, jnp.arange(V, dtype=jnp.int32), V - 1), axis=-1)


def _sample(logits_BV, key, rows, batch, temperature, top_k, top_p):
    """Greedy (argmax) at temperature 0; else ``jax.random.categorical(key, filtered logits of the whole
    batch)``, computed as its Gumbel-max for the rows in ``rows``: row ``r`` adds row ``rows[r]`` of
    ``gumbel(key, (batch, V))``, so a row draws the same token whichever rows run with it.
    ``temperature`` is traced (greedy and sampled calls share their compiled programs; only the branch
    taken runs)."""
    def sampled():
        logits = _filter(logits_BV, temperature, top_k, top_p)
        noise = jax.random.gumbel(key, (batch, logits.shape[-1]), logits.dtype)
        if logits.shape[0] != batch:  # a compacted batch (a full one runs rows 0..batch-1 in order)
            noise = noise[rows]
        return _argmax(noise + logits)

    return jax.lax.cond(temperature > 0, sampled, lambda: _argmax(logits_BV))


def row_levels(batch: int) -> tuple[int, ...]:
    """The row counts a ``batch``-row job computes as its rows finish: ``batch``, 3/4 of it (from 16 rows),
    1/2 and 1/4 (rounded up). A decode step's cost falls with the rows (SmolLM2 shape, 384 cache slots:
    141 / 116 / 86 / 58 / 54 ms at 32 / 24 / 16 / 8 / 6 rows); below a quarter, and between 6 and 8
    rows, reading the weights dominates, so no more programs are compiled for them."""
    fractions = (4, 3, 2, 1) if batch >= 16 else (4, 2, 1)
    return tuple(sorted({-(-batch * k // 4) for k in fractions}, reverse=True))


def next_size(rows: int, batch: int) -> int:
    """The rows a decode chunk computing ``rows`` of a ``batch``-row job would compact to next (0: none
    smaller): the chunk ends as soon as the unfinished rows fit in it, so finished rows stop being computed
    at once rather than at the chunk's end."""
    return max((b for b in row_levels(batch) if b < rows), default=0)


def compact_size(live: int, batch: int) -> int:
    """Rows to keep computing when ``live`` of a ``batch``-row job have not finished: the smallest of
    ``row_levels(batch)`` that holds them."""
    return min(b for b in row_levels(batch) if b >= live)


def compact_slots(slots: int, filled: int, budget_left: int, chunk: int, rows: int, batch: int) -> int:
    """The cache size for a batch compacted to ``rows`` computed rows when ``filled`` slots hold tokens and
    ``budget_left`` steps may follow: the current ``slots`` if they hold the next chunk, else the bucket
    that does (growing at the compaction, not one chunk later, saves compiling these rows' program at the
    old size); at the last row level (``row_levels``: no compaction follows) the bucket of the whole budget
    when that is at most one growth further (saves the program of that growth). Never shrinks.
    Each saved decode program is ~1.2 s of compile on a 2-core CPU for SmolLM2; the larger caches cost
    ~1% of a warm call (benchmarks/RESULTS.md, "Sampling")."""
    need = filled + min(chunk, budget_left)
    s = slots if need <= slots else length_bucket(need)
    if rows == min(row_levels(batch)):
        final = length_bucket(filled + budget_left)
        if s < final <= length_bucket(s + 1):
            s = final
    return s


def generate(model: Decoder, prompt_ids, prompt_mask, *, max_new_tokens: int, key=None,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id=None, pad_id: int = 0):
    """Batched generation from left-padded prompts with a KV cache.

    prompt_ids, prompt_mask: [B, Tp] (mask 1 on real tokens, left padding 0).
    Greedy when temperature == 0, else sampling (top-k / top-p) from ``key`` (see the module docstring
    for how the steps use it).
    ``eos_id``: an int or a sequence of ints (a row stops at the first of ANY of them); None = the
    model config's ``eos_token_id`` (all of its ids when it is a list, as Llama 3.x has); ``()`` = never stop.
    Returns (tokens [B, max_new_tokens] int32, mask [B, max_new_tokens] float32): after EOS
    (which is kept) rows emit ``pad_id`` with mask 0. Stops computing once every row has finished, and
    computes only the unfinished rows from the step they fit in 3B/4 (B >= 16), B/2 or B/4 rows.
    The prompts' padding does not matter: each row's real tokens are prefilled packed (``pack_prompts``),
    duplicate prompts once. Compiles one prefill per packed shape, one (small) cache assembly per (batch,
    longest prompt, cache bucket) and one decode chunk per (rows, cache bucket, top-k, top-p); greedy and
    sampling at any temperature share it.
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
    pack = prompt_pack(model.config, prompt_ids, prompt_mask)
    B, Tp = pack.src.shape
    key = jax.random.PRNGKey(0) if key is None else key
    graphdef, params = nnx.split(model)
    settings = (jnp.float32(temperature), top_k, top_p, eos, int(pad_id))

    chunk = DECODE_CHUNK
    S = length_bucket(Tp + min(chunk, max_new_tokens))
    # the first decode chunk compiles (if this process has not compiled it yet) while the prefill runs
    compiling = {(B, S): _precompile_decode(model, graphdef, params, key, B, S, chunk, B, settings)}
    hidden, ks, vs = _prefill_jit(graphdef, params, pack.prefix, pack.ids, pack.positions, pack.segments)
    cache, logits = _assemble_jit(graphdef, params, hidden, ks, vs, pack.src, pack.last, S)
    pos = jnp.asarray(pack.lengths)
    prompt_mask = jnp.asarray(pack.kv_mask)
    kv_valid = _kv_valid(prompt_mask, S)
    done = jnp.zeros((B,), bool)
    rows = np.arange(B)  # the batch row each computed row is (rows shrink as rows finish)
    toks = np.full((B, max_new_tokens), int(pad_id), np.int32)
    valid = np.zeros((B, max_new_tokens), np.float32)
    step = 0
    hold = False  # True: run the next chunk to its end on these rows (their fewer rows' program is compiling)
    pending = None  # (rows, slots) of the compaction waiting for its program (kept while it compiles)
    while step < max_new_tokens:
        if Tp + step == S:  # the cache is full: copy it into the next length bucket
            S = length_bucket(Tp + step + min(chunk, max_new_tokens - step))
            cache, kv_valid = _grow_jit(cache, prompt_mask, S)
        limit = min(chunk, max_new_tokens - step, S - Tp - step)
        thread = compiling.pop((len(rows), S), None)
        if thread is not None:
            thread.join()
        if limit == S - Tp - step < max_new_tokens - step:  # this chunk fills the cache: compile the next
            grown = length_bucket(S + min(chunk, max_new_tokens - step - limit))
            compiling[len(rows), grown] = _precompile_decode(model, graphdef, params, key, len(rows), grown, chunk,
                                                             B, settings)
        _DECODE_PROGRAMS.add(_signature(graphdef, len(rows), S, chunk, B, settings))
        cache, logits, pos, done, key, t, v, ran, all_done = _decode_jit(
            graphdef, params, cache, kv_valid, logits, pos, done, key, jnp.asarray(rows, jnp.int32), Tp + step,
            limit, chunk, B, *settings, 0 if hold else next_size(len(rows), B))
        t, v, ran, all_done, done_h = jax.device_get((t, v, ran, all_done, done))
        # a finished row only emits (pad, 0), which is what its later places already hold, so rows that
        # stand in for finished ones (below) may write theirs
        toks[rows, step:step + ran] = t[:, :ran]
        valid[rows, step:step + ran] = v[:, :ran]
        step += int(ran)
        if all_done:
            break
        live = np.flatnonzero(~done_h)
        keep = compact_size(len(live), B)
        hold = False
        if keep < len(rows) and step < max_new_tokens:
            if pending is None or pending[0] != keep or pending[1] < S:
                pending = (keep, compact_slots(S, Tp + step, max_new_tokens - step, chunk, keep, B))
            fewer = pending
            if fewer not in compiling:
                compiling[fewer] = _precompile_decode(model, graphdef, params, key, *fewer, chunk, B, settings)
            if compiling[fewer] is not None and compiling[fewer].is_alive():
                hold = True  # the fewer rows' program is compiling: one more chunk of these rows meanwhile
                continue
            pending = None
            # drop finished rows: the live ones, then finished ones to fill the bucket
            take = np.concatenate([live, np.flatnonzero(done_h)[:keep - len(live)]])
            rows = rows[take]
            cache, logits, pos, done, kv_valid, prompt_mask = _take_rows_jit(
                (cache, logits, pos, done, kv_valid, prompt_mask), jnp.asarray(take, jnp.int32))
            if fewer[1] > S:
                S = fewer[1]
                cache, kv_valid = _grow_jit(cache, prompt_mask, S)
    return jnp.asarray(toks), jnp.asarray(valid)


_DECODE_PROGRAMS: set = set()  # the decode chunks this process has compiled (or is compiling)

#: True: decode programs compile in a background thread ahead of their first call (``_precompile_decode``);
#: False: where first called; None (default): in the background unless JAX computes on the CPU, where the
#: compile takes cores from the computation. SmolLM2-135M, 32 prompts, 256 new tokens, 2 cores, first call
#: minus the warm one: 10.9 and 12.1 s compiling where called, 12.0-12.8 s in the background (and 15.0 s in
#: the benchmark's run) with ~7 more CPU seconds (benchmarks/RESULTS.md, "Sampling"). A host whose cores
#: are idle while an accelerator computes compiles for free meanwhile.
BACKGROUND_COMPILE: bool | None = None


def _signature(graphdef, rows: int, slots: int, chunk: int, batch: int, settings) -> tuple:
    """What a decode chunk's compiled program depends on besides the parameters' shapes (settings[0], the
    temperature, is traced)."""
    return (graphdef, rows, slots, chunk, batch, *settings[1:])


def _precompile_decode(model, graphdef, params, key, rows: int, slots: int, chunk: int, batch: int, settings):
    """Starts compiling ``_decode_jit`` for ``rows`` computed rows and a ``slots``-slot cache in a thread
    (XLA releases the GIL: it compiles on the other core while this one prefills; the jit call then finds
    the executable in JAX's cache); returns the thread to join before that call, or None when this process
    compiled that program before or compiles where called (``BACKGROUND_COMPILE``)."""
    background = jax.default_backend() != "cpu" if BACKGROUND_COMPILE is None else BACKGROUND_COMPILE
    signature = _signature(graphdef, rows, slots, chunk, batch, settings)
    if not background or signature in _DECODE_PROGRAMS or not hasattr(_decode_jit, "lower"):  # (tests wrap it)
        return None
    _DECODE_PROGRAMS.add(signature)
    args = decode_args(model.config, model.dtype, graphdef, params, key, rows, slots, chunk, batch, settings)
    # not a daemon: the interpreter waits for it at exit (exiting during an XLA compile aborts the process)
    thread = threading.Thread(target=lambda: _decode_jit.lower(*args).compile(), daemon=False)
    thread.start()
    return thread


def decode_args(cfg, dtype, graphdef, params, key, rows: int, slots: int, chunk: int, batch: int,
                settings) -> tuple:
    """Abstract arguments of ``_decode_jit`` (for ``.lower``): ``rows`` computed rows of ``batch``, a
    ``slots``-slot cache of ``dtype`` (the model's), ``key`` an array or its shape / dtype, ``settings``
    ``(temperature, top_k, top_p, eos ids, pad id)`` as :func:`generate` builds them."""
    KV, hd, V = cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    spec = jax.ShapeDtypeStruct
    cache = (tuple(spec((rows, KV, hd, slots), dtype) for _ in range(cfg.num_hidden_layers)),
             tuple(spec((rows, KV, slots, hd), dtype) for _ in range(cfg.num_hidden_layers)))
    return (graphdef, params, cache, spec((rows, slots), jnp.bool_), spec((rows, V), at_least_f32(dtype)),
            spec((rows,), jnp.int32), spec((rows,), jnp.bool_), spec(key.shape, key.dtype),
            spec((rows,), jnp.int32), 0, 0, chunk, batch, *settings, 0)


def prompt_pack(cfg, prompt_ids, prompt_mask) -> PromptPack:
    """:func:`pack_prompts` as :func:`generate` calls it for a model of config ``cfg``."""
    return pack_prompts(prompt_ids, prompt_mask, _attention_ratio(cfg), PREFIX_MULTIPLE)


def _kv_valid(prompt_mask, slots: int):
    """[B, slots]: the prompt's mask, then every generated slot valid (causality masks the unfilled ones)."""
    B, Tp = prompt_mask.shape
    return jnp.concatenate([prompt_mask, jnp.ones((B, slots - Tp), bool)], axis=1)


@functools.partial(jax.jit, static_argnums=(0,))
def _prefill_jit(graphdef, params, prefix, ids, positions, segments):
    """Compiled per prefix length and packed shape (C, P, W)."""
    return prefill_forward(nnx.merge(graphdef, params), prefix, ids, positions, segments)


@functools.partial(jax.jit, static_argnums=(0, 7))
def _assemble_jit(graphdef, params, hidden, ks, vs, src, last, cache_slots):
    """The decode cache of the prefill's K/V (the prefix's, then the packed rows'): row b's prompt
    right-aligned at slot Tp (slots before its prompt hold some other token's K/V, masked by ``kv_valid``),
    keys [B, KV, hd, S], values [B, KV, S, hd], and the logits at each row's last prompt token [B, V].
    Compiled per (C, P, W, B, Tp, S)."""
    model = nnx.merge(graphdef, params)
    pad = cache_slots - src.shape[1]

    def rows(x):  # [C + P * W, KV, hd] -> [B, Tp, KV, hd]
        return x[src]

    keys = tuple(jnp.pad(rows(k).transpose(0, 2, 3, 1).astype(model.dtype), ((0, 0), (0, 0), (0, 0), (0, pad)))
                 for k in ks)
    values = tuple(jnp.pad(rows(v).transpose(0, 2, 1, 3).astype(model.dtype), ((0, 0), (0, 0), (0, pad), (0, 0)))
                   for v in vs)
    h = hidden.reshape(-1, hidden.shape[-1])[last]
    return (keys, values), model.logits(h[:, None])[:, 0]


@functools.partial(jax.jit, static_argnums=(2,))
def _grow_jit(cache, prompt_mask, slots):
    """The cache copied into ``slots`` slots, and its ``_kv_valid`` mask."""
    ks, vs = cache
    grow = slots - vs[0].shape[2]
    return ((tuple(jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, grow))) for k in ks),
             tuple(jnp.pad(v, ((0, 0), (0, 0), (0, grow), (0, 0))) for v in vs)), _kv_valid(prompt_mask, slots))


@jax.jit
def _take_rows_jit(state, take):
    """Rows ``take`` of every array in ``state`` (the cache's are on axis 0 too)."""
    return jax.tree.map(lambda x: x[take], state)


@functools.partial(jax.jit, static_argnums=(0, 11, 12, 14, 15, 16, 17), donate_argnums=(2,))
def _decode_jit(graphdef, params, cache, kv_valid, logits, pos, done, key, rows, slot0, limit, chunk, batch,
                temperature, top_k, top_p, eos, pad, min_live):
    """Up to ``limit`` (<= ``chunk``) steps, the first at cache slot ``slot0``; ends early once at most
    ``min_live`` rows are unfinished (0: every row is done; else the host then drops the finished rows).
    ``rows``: the batch row (of ``batch``) each of the B computed rows is. Compiled per
    (B, cache slots, chunk, batch, top_k, top_p, eos, pad): the prompt width, the step, the budget and
    the temperature are traced."""
    model = nnx.merge(graphdef, params)
    B = kv_valid.shape[0]
    eos_ids = jnp.asarray(eos, jnp.int32)

    def cond(carry):
        i, done = carry[0], carry[4]
        return (i < limit) & (jnp.sum(~done) > min_live)

    def body(carry):
        i, cache, logits, p, done, key, toks, valid = carry
        key, sub = jax.random.split(key)
        tok = _sample(logits, sub, rows, batch, temperature, top_k, top_p).astype(jnp.int32)
        out = jnp.where(done, pad, tok)
        toks = jax.lax.dynamic_update_slice(toks, out[:, None], (0, i))
        valid = jax.lax.dynamic_update_slice(valid, (~done).astype(jnp.float32)[:, None], (0, i))
        done = done | jnp.isin(tok, eos_ids)
        h, cache = decode_step(model, out, p, kv_valid, cache, slot0 + i)
        return i + 1, cache, model.logits(h[:, None])[:, 0], p + 1, done, key, toks, valid

    init = (jnp.int32(0), cache, logits, pos, done, key, jnp.full((B, chunk), pad, jnp.int32),
            jnp.zeros((B, chunk), jnp.float32))
    i, cache, logits, pos, done, key, toks, valid = jax.lax.while_loop(cond, body, init)
    return cache, logits, pos, done, key, toks, valid, i, jnp.all(done)
