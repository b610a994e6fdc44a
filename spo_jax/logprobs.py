"""Per-token log-probs of target tokens from final hidden states, chunked.

The naive path forms the full logits ``hidden_BTD @ w_DV`` ([B, T, V]) and a
log-softmax; at vocab 151936 and length 2048 that is 1.2 GB per sequence in fp32,
and the backward pass keeps it alive. :func:`token_logps` instead scans over
chunks of ``seq_chunk`` positions, each under :func:`jax.checkpoint`, so forward
and backward peak at O(B x seq_chunk x V); with ``vocab_chunk`` it also scans the
vocabulary with an online log-sum-exp, O(B x seq_chunk x vocab_chunk).

    log p(y_t | x, y_<t) = h_t . w[:, y_t] + b[y_t] - logsumexp_v(h_t . w[:, v] + b[v])

Matmuls run in the input dtype (bf16 allowed); log-sum-exp and every reduction
in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(hidden_BTD, w_DV, targets_BT, b_V):
    if hidden_BTD.ndim != 3:
        raise ValueError(f"hidden_BTD must be [B, T, D]; got shape {hidden_BTD.shape}")
    if w_DV.ndim != 2 or w_DV.shape[0] != hidden_BTD.shape[-1]:
        raise ValueError(f"w_DV must be [D, V] with D = hidden_BTD.shape[-1] = {hidden_BTD.shape[-1]}; "
                         f"got shape {w_DV.shape}")
    if targets_BT.shape != hidden_BTD.shape[:2]:
        raise ValueError(f"targets_BT must be [B, T] = {hidden_BTD.shape[:2]}; got shape {targets_BT.shape}")
    if b_V is not None and b_V.shape != (w_DV.shape[1],):
        raise ValueError(f"b_V must be [V] = ({w_DV.shape[1]},); got shape {b_V.shape}")


def naive_token_logps(hidden_BTD, w_DV, targets_BT, b_V=None):
    """Reference path: full [B, T, V] logits, log-softmax, gather. Returns fp32 [B, T]."""
    _check(hidden_BTD, w_DV, targets_BT, b_V)
    logits_BTV = jnp.einsum("btd,dv->btv", hidden_BTD, w_DV.astype(hidden_BTD.dtype)).astype(jnp.float32)
    if b_V is not None:
        logits_BTV = logits_BTV + b_V.astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _chunk_logps(h_BCD, t_BC, w_DV, b_V, vocab_chunk):
    """Log-probs for one sequence chunk [B, C]; optionally an online logsumexp over vocab chunks."""
    w = w_DV.astype(h_BCD.dtype)
    if not vocab_chunk or vocab_chunk >= w_DV.shape[1]:
        logits = jnp.einsum("bcd,dv->bcv", h_BCD, w).astype(jnp.float32)
        if b_V is not None:
            logits = logits + b_V.astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, t_BC[..., None], axis=-1)[..., 0]
        return tgt - lse
    V = w_DV.shape[1]
    n = -(-V // vocab_chunk)
    pad = n * vocab_chunk - V
    w_p = jnp.pad(w, ((0, 0), (0, pad)))
    b_p = jnp.zeros((V,), jnp.float32) if b_V is None else b_V.astype(jnp.float32)
    b_p = jnp.pad(b_p, (0, pad), constant_values=-jnp.inf)
    w_NDK = w_p.reshape(w.shape[0], n, vocab_chunk).transpose(1, 0, 2)
    b_NK = b_p.reshape(n, vocab_chunk)
    B, C = t_BC.shape

    def body(carry, xs):
        m, s, tgt = carry
        w_DK, b_K, k = xs
        logits = jnp.einsum("bcd,dk->bck", h_BCD, w_DK).astype(jnp.float32) + b_K
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        local = t_BC - k * vocab_chunk
        inside = (local >= 0) & (local < vocab_chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, vocab_chunk - 1)[..., None], axis=-1)[..., 0]
        tgt = jnp.where(inside, picked, tgt)
        return (m_new, s, tgt), None

    init = (jnp.full((B, C), -jnp.inf, jnp.float32), jnp.zeros((B, C), jnp.float32),
            jnp.zeros((B, C), jnp.float32))
    (m, s, tgt), _ = jax.lax.scan(body, init, (w_NDK, b_NK, jnp.arange(n)))
    return tgt - (m + jnp.log(s))


def token_logps(hidden_BTD, w_DV, targets_BT, b_V=None, *, seq_chunk: int = 128,
                vocab_chunk: int | None = None):
    """Chunked log-probs of ``targets_BT`` (fp32 [B, T]); equals :func:`naive_token_logps`.

    Args:
      hidden_BTD: final hidden states (after the final norm), any float dtype.
      w_DV: unembedding matrix [D, V]; b_V: optional output bias [V].
      targets_BT: int target ids (the token predicted at each position).
      seq_chunk: positions per chunk (<= 0 or >= T: one chunk). T need not divide.
      vocab_chunk: vocabulary entries per inner chunk (None/0: whole vocabulary).
    """
    _check(hidden_BTD, w_DV, targets_BT, b_V)
    if seq_chunk < 0 or (vocab_chunk is not None and vocab_chunk < 0):
        raise ValueError(f"seq_chunk and vocab_chunk must be >= 0; got {seq_chunk}, {vocab_chunk}")
    B, T, D = hidden_BTD.shape
    targets_BT = targets_BT.astype(jnp.int32)
    chunk = T if seq_chunk <= 0 or seq_chunk >= T else seq_chunk
    fn = jax.checkpoint(lambda h, t, w, b: _chunk_logps(h, t, w, b, vocab_chunk))
    if chunk == T:
        return fn(hidden_BTD, targets_BT, w_DV, b_V)
    n = -(-T // chunk)
    pad = n * chunk - T
    h = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    h_NBCD = h.reshape(B, n, chunk, D).transpose(1, 0, 2, 3)
    t_NBC = t.reshape(B, n, chunk).transpose(1, 0, 2)

    def body(_, xs):
        return None, fn(xs[0], xs[1], w_DV, b_V)

    _, out_NBC = jax.lax.scan(body, None, (h_NBCD, t_NBC))
    return out_NBC.transpose(1, 0, 2).reshape(B, n * chunk)[:, :T]


def sequence_logps(logps_BT, loss_mask_BT, seq_ids_BT, num_seqs: int):
    """Per-sequence sums of masked token log-probs and token counts (fp32 [S], [S]).

    ``seq_ids_BT`` names each token's sequence (Contract 1 in docs/DESIGN.md);
    tokens with ``loss_mask_BT == 0`` contribute nothing.
    """
    if not (logps_BT.shape == loss_mask_BT.shape == seq_ids_BT.shape):
        raise ValueError(f"logps_BT, loss_mask_BT and seq_ids_BT must share a shape; got "
                         f"{logps_BT.shape}, {loss_mask_BT.shape}, {seq_ids_BT.shape}")
    mask = loss_mask_BT.astype(jnp.float32)
    ids = seq_ids_BT.reshape(-1).astype(jnp.int32)
    sums = jax.ops.segment_sum((logps_BT.astype(jnp.float32) * mask).reshape(-1), ids, num_segments=num_seqs)
    counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=num_seqs)
    return sums, counts


def sequence_mean_logps(sums_S, counts_S):
    """Token-mean log-prob per sequence; 0 where a sequence has no tokens."""
    return jnp.where(counts_S > 0, sums_S / jnp.maximum(counts_S, 1.0), 0.0)
