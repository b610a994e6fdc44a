"""Per-token log-probs of target tokens from final hidden states, chunked (Contract 3).

    log p(y_t | x, y_<t) = z_t[y_t] − logsumexp_v z_t[v],   z_t = h_t · W + b      (W: [D, V])

The naive path (:func:`naive_token_logps`) forms the full logits ``[B, T, V]``
and a log-softmax: at vocab 151936 and length 2048 that is 1.2 GB per sequence
in fp32, and the backward pass keeps several such buffers alive.
:func:`token_logps` scans over chunks of ``seq_chunk`` positions, each under
:func:`jax.checkpoint` (only the chunk's inputs are saved; its logits are
recomputed in the backward pass), so forward *and* backward peak at
O(B · seq_chunk · V). With ``vocab_chunk`` it also scans the vocabulary with an
online log-sum-exp (running max m and scaled sum s, the body again under
``jax.checkpoint``), peak O(B · seq_chunk · vocab_chunk):

    m_k = max(m_{k−1}, max_{v ∈ chunk k} z[v]),   s_k = s_{k−1} e^{m_{k−1} − m_k} + Σ_{v ∈ chunk k} e^{z[v] − m_k}
    logsumexp z = m_K + log s_K

(the running max is held under stop-gradient: the result does not depend on
it, and the gradient is then exactly the softmax). When only the hidden states are
differentiated (a frozen unembedding: LoRA's base), the forward pass also forms
d log p_t / d h_t = W[:, y_t] − softmax(z_t) Wᵀ per chunk ([B, T, D], saved for the
backward pass, which is then one multiply): two vocabulary-sized matmuls per step
instead of three (forward, recomputed forward, backward); unchunked vocabularies only.
A length ``T`` or a vocabulary ``V`` not divisible by its chunk is fine (the sequence is padded,
the last vocabulary chunk is clamped and overlapping columns masked).

Matmuls run in the input dtype (bf16 allowed) with fp32 accumulation
(``preferred_element_type``); log-sum-exp, outputs and reductions are fp32.
A target outside ``[0, V)`` (only checkable when the targets are concrete) gives
NaN in both paths when traced, never a silently wrong number.

:func:`sequence_logps` turns token log-probs into per-sequence sums and token
counts with segment sums over ``seq_ids`` (Contract 1's batch layout); token means
and NLLs are taken from these by ``spo_jax.losses`` / ``spo_jax.objectives``.

:func:`scored_sequence_logps` is what the trainer calls: it gathers the hidden
states of the scored positions only (``loss_mask`` 1: response tokens) into a
``[B, N, D]`` block through the batch's ``score_index`` ``[B, N]`` (Contract 1;
``N`` is a bucketed static count, so a handful of shapes compile), then runs
:func:`token_logps` and :func:`sequence_logps` on that block. Prompt and padding
positions never reach the unembedding: on prompt 64 + response 64 pairs that
halves the log-prob work, the largest part of a training step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spo_jax.numerics import accumulation_dtype

__all__ = ["token_logps", "naive_token_logps", "sequence_logps", "scored_sequence_logps"]


# ----------------------------------------------------------------------------- boundary checks


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check(hidden_BTD, w_DV, targets_BT, b_V) -> None:
    """Shapes and dtypes of the inputs; target range when the targets are concrete."""
    for name, x in (("hidden_BTD", hidden_BTD), ("w_DV", w_DV), ("b_V", b_V)):
        if x is not None and not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{name} must be a float array; got dtype {jnp.result_type(x)}")
    if jnp.ndim(hidden_BTD) != 3:
        raise ValueError(f"hidden_BTD must be [B, T, D]; got shape {jnp.shape(hidden_BTD)} "
                         "(pass the final hidden states after the final norm)")
    D = jnp.shape(hidden_BTD)[-1]
    if jnp.ndim(w_DV) != 2 or jnp.shape(w_DV)[0] != D:
        raise ValueError(f"w_DV must be [D, V] with D = hidden_BTD.shape[-1] = {D}; got shape "
                         f"{jnp.shape(w_DV)} (a [V, D] embedding must be transposed)")
    if jnp.shape(targets_BT) != jnp.shape(hidden_BTD)[:2]:
        raise ValueError(f"targets_BT must be [B, T] = {jnp.shape(hidden_BTD)[:2]}; got shape "
                         f"{jnp.shape(targets_BT)}")
    if not jnp.issubdtype(jnp.result_type(targets_BT), jnp.integer):
        raise ValueError(f"targets_BT must be integer token ids; got dtype {jnp.result_type(targets_BT)}")
    V = jnp.shape(w_DV)[1]
    if b_V is not None and jnp.shape(b_V) != (V,):
        raise ValueError(f"b_V must be [V] = ({V},); got shape {jnp.shape(b_V)}")
    if _concrete(targets_BT):
        t = np.asarray(targets_BT)
        bad = (t < 0) | (t >= V)
        if bad.any():
            raise ValueError(f"targets_BT must lie in [0, V = {V}); got {t[bad][:5].tolist()} "
                             "(Contract 1 puts 0 where there is no target, not -100)")


def _check_chunk(name: str, value) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                              or value < 0):
        raise ValueError(f"{name} must be a Python int >= 0 (0 or None: no chunking); got {value!r}")


# ----------------------------------------------------------------------------- kernels


def _logits(h_BCD, w_DK, b_K):
    """fp32 logits of one chunk: matmul in the hidden dtype, fp32 accumulation."""
    acc = accumulation_dtype(h_BCD.dtype)
    z = jnp.einsum("bcd,dk->bck", h_BCD, w_DK.astype(h_BCD.dtype), preferred_element_type=acc)
    return z if b_K is None else z + b_K.astype(acc)


def _pick(z_BCK, idx_BC):
    return jnp.take_along_axis(z_BCK, idx_BC[..., None], axis=-1)[..., 0]


def _chunk_full_vocab(h_BCD, t_BC, w_DV, b_V):
    """Log-probs of one sequence chunk over the whole vocabulary (one [B, C, V] buffer)."""
    z = _logits(h_BCD, w_DV, b_V)
    return _pick(z, t_BC) - jax.nn.logsumexp(z, axis=-1)


def _chunk_vocab_scan(h_BCD, t_BC, w_DV, b_V, vocab_chunk: int):
    """Log-probs of one sequence chunk with an online log-sum-exp over vocabulary chunks.

    Chunk k covers columns [start_k, start_k + K) with start_k = min(k K, V − K)
    (the last chunk is clamped to stay inside W, no padded copy of W); columns
    below k K were already counted and are masked out. A target y is picked in
    chunk y // K. Out-of-range targets are never picked and stay NaN.
    """
    V, K = w_DV.shape[1], vocab_chunk
    n = -(-V // K)
    B, C = t_BC.shape
    sg = jax.lax.stop_gradient

    @jax.checkpoint
    def body(carry, k):
        m, s, tgt = carry
        start = jnp.minimum(k * K, V - K)
        w_DK = jax.lax.dynamic_slice_in_dim(w_DV, start, K, axis=1)
        b_K = None if b_V is None else jax.lax.dynamic_slice_in_dim(b_V, start, K)
        z = _logits(h_BCD, w_DK, b_K)
        fresh_K = start + jnp.arange(K) >= k * K
        z = jnp.where(fresh_K, z, -jnp.inf)
        m_new = sg(jnp.maximum(m, jnp.max(z, axis=-1)))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
        inside = (t_BC // K == k) & (t_BC < V)
        tgt = jnp.where(inside, _pick(z, jnp.clip(t_BC - start, 0, K - 1)), tgt)
        return (m_new, s, tgt), None

    acc = accumulation_dtype(h_BCD.dtype)
    init = (jnp.full((B, C), -jnp.inf, acc), jnp.zeros((B, C), acc), jnp.full((B, C), jnp.nan, acc))
    (m, s, tgt), _ = jax.lax.scan(body, init, jnp.arange(n))
    return tgt - (m + jnp.log(s))


# ----------------------------------------------------------------------------- public API


def naive_token_logps(hidden_BTD, w_DV, targets_BT, b_V=None):
    """Reference path: full [B, T, V] logits, log-softmax, gather. Returns fp32 [B, T].

    Same dtype policy as :func:`token_logps`; use it only for small shapes and tests.
    """
    _check(hidden_BTD, w_DV, targets_BT, b_V)
    logp_BTV = jax.nn.log_softmax(_logits(hidden_BTD, w_DV, b_V), axis=-1)
    return _pick(logp_BTV, targets_BT.astype(jnp.int32))


def token_logps(hidden_BTD, w_DV, targets_BT, b_V=None, *, seq_chunk: int = 128,
                vocab_chunk: int | None = None):
    """Chunked log-probs of ``targets_BT``: fp32 [B, T], equal to :func:`naive_token_logps`.

    Args:
      hidden_BTD: [B, T, D] final hidden states (after the final norm), any float dtype.
      w_DV: [D, V] unembedding matrix (cast to the hidden dtype for the matmul).
      targets_BT: [B, T] int token ids in [0, V), the token predicted at each position.
      b_V: optional [V] output bias.
      seq_chunk: most positions per chunk (0, or >= T: one chunk). T need not be divisible:
        the ``ceil(T / seq_chunk)`` chunks are balanced (``ceil(T / n)`` positions each), so
        fewer than one position per chunk is padding.
      vocab_chunk: vocabulary columns per inner chunk (None / 0, or >= V: the whole vocabulary).

    Peak memory (forward and backward) O(B · seq_chunk · min(V, vocab_chunk)) plus
    the [D, V] gradient of ``w_DV`` when it is differentiated. ``seq_chunk`` and
    ``vocab_chunk`` must be static (Python ints) under ``jax.jit``.
    """
    _check(hidden_BTD, w_DV, targets_BT, b_V)
    _check_chunk("seq_chunk", seq_chunk)
    _check_chunk("vocab_chunk", vocab_chunk)
    return _token_logps(hidden_BTD, targets_BT.astype(jnp.int32), w_DV, b_V, seq_chunk, vocab_chunk)


def _over_seq_chunks(chunk_fn, hidden_BTD, targets_BT, w_DV, b_V, seq_chunk):
    """``chunk_fn(h, t, w, b)`` (a pytree of [B, C, ...] arrays) over chunks of ``seq_chunk``
    positions, reassembled to [B, T, ...]."""
    B, T, D = hidden_BTD.shape
    if not seq_chunk or seq_chunk >= T:
        return chunk_fn(hidden_BTD, targets_BT, w_DV, b_V)
    n = -(-T // seq_chunk)
    C = -(-T // n)
    pad = n * C - T
    h_NBCD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D).swapaxes(0, 1)
    t_NBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, n, C).swapaxes(0, 1)

    def body(_, xs):
        return None, chunk_fn(xs[0], xs[1], w_DV, b_V)

    _, out = jax.lax.scan(body, None, (h_NBCD, t_NBC))
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, n * C, *x.shape[3:])[:, :T], out)


def _checkpointed(hidden_BTD, targets_BT, w_DV, b_V, seq_chunk, vocab_chunk):
    """Each chunk under ``jax.checkpoint``: its logits are recomputed in the backward pass."""
    if vocab_chunk and vocab_chunk < w_DV.shape[1]:
        def chunk_fn(h, t, w, b):
            return _chunk_vocab_scan(h, t, w, b, vocab_chunk)
    else:
        chunk_fn = _chunk_full_vocab
    if not seq_chunk or seq_chunk >= hidden_BTD.shape[1]:
        return jax.checkpoint(chunk_fn)(hidden_BTD, targets_BT, w_DV, b_V)
    # inside scan, prevent_cse is unnecessary (the scan already stops CSE across the remat boundary)
    return _over_seq_chunks(jax.checkpoint(chunk_fn, prevent_cse=False), hidden_BTD, targets_BT, w_DV, b_V,
                            seq_chunk)


def _chunk_with_jacobian(h_BCD, t_BC, w_DV, b_V):
    """Log-probs of one chunk and their gradient w.r.t. the hidden states, d logp_t / d h_t =
    W[:, y_t] − softmax(z_t) Wᵀ ([B, C, D]), for a frozen W: one more matmul here instead of the
    backward pass's recomputed logits and its matmul."""
    z = _logits(h_BCD, w_DV, b_V)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.exp(z - lse[..., None])
    expected = jnp.einsum("bck,dk->bcd", p.astype(h_BCD.dtype), w_DV.astype(h_BCD.dtype),
                          preferred_element_type=z.dtype)
    picked = jnp.take(w_DV.T, t_BC, axis=0, mode="fill", fill_value=jnp.nan).astype(z.dtype)
    return _pick(z, t_BC) - lse, picked - expected


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _token_logps(hidden_BTD, targets_BT, w_DV, b_V, seq_chunk, vocab_chunk):
    return _checkpointed(hidden_BTD, targets_BT, w_DV, b_V, seq_chunk, vocab_chunk)


def _token_logps_fwd(hidden, targets, w, b, seq_chunk, vocab_chunk):
    # symbolic zeros: each argument comes with .perturbed, whether it is differentiated. A frozen
    # unembedding (LoRA's base) needs only d logp / d hidden, computed in the forward pass.
    h, t, wv = hidden.value, targets.value, w.value
    bv = None if b is None else b.value
    frozen = not w.perturbed and (b is None or not b.perturbed)
    if frozen and not (vocab_chunk and vocab_chunk < wv.shape[1]):
        logps, jac = _over_seq_chunks(_chunk_with_jacobian, h, t, wv, bv, seq_chunk)
        return logps, (jac.astype(h.dtype), None)
    logps, vjp = jax.vjp(lambda h, w, b: _checkpointed(h, t, w, b, seq_chunk, vocab_chunk), h, wv, bv)
    return logps, (None, vjp)


def _token_logps_bwd(seq_chunk, vocab_chunk, res, g_BT):
    jac, vjp = res
    if jac is not None:
        return (g_BT[..., None] * jac).astype(jac.dtype), None, None, None
    dh, dw, db = vjp(g_BT)
    return dh, None, dw, db


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd, symbolic_zeros=True)


def sequence_logps(logps_BT, loss_mask_BT, seq_ids_BT, num_seqs: int):
    """Per-sequence sums of masked token log-probs and token counts: fp32 ([S], [S]).

        sums[s]   = Σ_{(b,t): seq_ids[b,t] = s} mask[b,t] · logps[b,t]
        counts[s] = Σ_{(b,t): seq_ids[b,t] = s} mask[b,t]

    ``seq_ids_BT`` names each token's sequence in [0, num_seqs) (Contract 1 in
    docs/DESIGN.md, padded or packed rows alike); positions with mask 0
    contribute nothing, even if their log-prob is NaN or inf.
    """
    if not isinstance(num_seqs, (int, np.integer)) or isinstance(num_seqs, bool) or num_seqs <= 0:
        raise ValueError(f"num_seqs must be a Python int > 0 (sequences in the batch); got {num_seqs!r}")
    shapes = [jnp.shape(x) for x in (logps_BT, loss_mask_BT, seq_ids_BT)]
    if not shapes[0] == shapes[1] == shapes[2]:
        raise ValueError(f"logps_BT, loss_mask_BT and seq_ids_BT must share a shape; got {shapes[0]}, "
                         f"{shapes[1]}, {shapes[2]}")
    if not jnp.issubdtype(jnp.result_type(seq_ids_BT), jnp.integer):
        raise ValueError(f"seq_ids_BT must be integer sequence ids; got dtype {jnp.result_type(seq_ids_BT)}")
    if _concrete(seq_ids_BT):
        ids = np.asarray(seq_ids_BT)
        bad = (ids < 0) | (ids >= num_seqs)
        if bad.any():
            raise ValueError(f"seq_ids_BT must lie in [0, num_seqs = {num_seqs}); got "
                             f"{ids[bad][:5].tolist()}")
    acc = accumulation_dtype(jnp.result_type(logps_BT))
    mask = loss_mask_BT.astype(acc)
    masked = jnp.where(mask != 0, logps_BT.astype(acc), 0.0) * mask
    ids = seq_ids_BT.reshape(-1).astype(jnp.int32)
    sums = jax.ops.segment_sum(masked.reshape(-1), ids, num_segments=num_seqs)
    counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=num_seqs)
    return sums, counts


def _check_score_index(score_index_BN, loss_mask_BT) -> None:
    """Shape and dtype of ``score_index_BN``; when it and the mask are concrete, that it lists
    every scored position of its row once, inside [0, T)."""
    B, T = jnp.shape(loss_mask_BT)
    if jnp.ndim(score_index_BN) != 2 or jnp.shape(score_index_BN)[0] != B or jnp.shape(score_index_BN)[1] > T:
        raise ValueError(f"score_index_BN must be [B, N] with B = {B} and N <= T = {T}; got shape "
                         f"{jnp.shape(score_index_BN)} (build it with spo_jax.data.score_index(loss_mask, N))")
    if not jnp.issubdtype(jnp.result_type(score_index_BN), jnp.integer):
        raise ValueError(f"score_index_BN must be integer positions; got dtype {jnp.result_type(score_index_BN)}")
    if _concrete(score_index_BN) and _concrete(loss_mask_BT):
        idx, scored = np.asarray(score_index_BN), np.asarray(loss_mask_BT) != 0
        if ((idx < 0) | (idx >= T)).any():
            raise ValueError(f"score_index_BN must lie in [0, T = {T}); got {idx[(idx < 0) | (idx >= T)][:5].tolist()}")
        if (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
            raise ValueError("score_index_BN repeats a position within a row; build it with "
                             "spo_jax.data.score_index(loss_mask, N)")
        hit = np.zeros_like(scored)
        np.put_along_axis(hit, idx, True, axis=1)
        missing = scored & ~hit
        if missing.any():
            r, t = np.argwhere(missing)[0]
            raise ValueError(f"score_index_BN misses scored positions (loss_mask 1), e.g. row {r} position {t}; "
                             "N must cover the row with the most scored positions: build it with "
                             "spo_jax.data.score_index(loss_mask, N)")


def scored_sequence_logps(hidden_BTD, w_DV, targets_BT, loss_mask_BT, seq_ids_BT, num_seqs: int, *,
                          score_index_BN=None, b_V=None, seq_chunk: int = 128, vocab_chunk: int | None = None):
    """Per-sequence sums of masked token log-probs and token counts, fp32 ([S], [S]), computing
    the unembedding only at the ``N`` positions ``score_index_BN`` gathers from each row.

    Equal to ``sequence_logps(token_logps(hidden, w, targets, ...), loss_mask, seq_ids, S)``
    whenever ``score_index_BN`` lists every position with ``loss_mask != 0`` of its row once
    (``spo_jax.data.score_index``: scored positions first, then unscored ones that gather with
    mask 0). ``score_index_BN=None`` derives it inside the computation with ``N = T``
    (correct, but no saving: batches from ``spo_jax.data.BatchIterator`` carry a bucketed one).
    A concrete index that misses a scored position raises; a traced one gives NaN sums for
    the sequences whose count it misses, never a silently wrong number.

    Gradients flow to ``hidden_BTD`` through the gather (zero at unscored positions).
    Chunking and memory as :func:`token_logps`, on the gathered ``[B, N]`` block.
    """
    _check(hidden_BTD, w_DV, targets_BT, b_V)
    if jnp.shape(loss_mask_BT) != jnp.shape(targets_BT):
        raise ValueError(f"loss_mask_BT must be [B, T] = {jnp.shape(targets_BT)}; got {jnp.shape(loss_mask_BT)}")
    if score_index_BN is None:
        score_index_BN = jnp.argsort(jnp.asarray(loss_mask_BT) == 0, axis=1, stable=True)
    _check_score_index(score_index_BN, loss_mask_BT)
    idx = jnp.asarray(score_index_BN).astype(jnp.int32)

    def take(x_BT):
        return jnp.take_along_axis(jnp.asarray(x_BT), idx, axis=1)

    hidden_BND = jnp.take_along_axis(hidden_BTD, idx[..., None], axis=1)
    logps_BN = token_logps(hidden_BND, w_DV, take(targets_BT), b_V, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)
    sums, counts = sequence_logps(logps_BN, take(loss_mask_BT), take(seq_ids_BT), num_seqs)
    _, all_counts = sequence_logps(jnp.zeros(jnp.shape(loss_mask_BT), sums.dtype), loss_mask_BT, seq_ids_BT,
                                   num_seqs)
    return jnp.where(counts == all_counts, sums, jnp.nan), all_counts
