"""spo_jax.logprobs: chunked log-probs equal the naive path and an independent NumPy oracle.

Oracle: float64 NumPy log-softmax for values, and the closed-form gradient of
L = Σ c_bt log p(y_bt) (∂L/∂h_bt = c_bt (W[:, y_bt] − W p_bt), ∂L/∂W = Σ c_bt h_bt (e_y − p_bt)ᵀ,
∂L/∂b = Σ c_bt (e_y − p_bt)) for gradients; NumPy loops for the segment sums.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spo_jax import logprobs
from spo_jax.data import score_index

B, T, D, V = 2, 37, 16, 50  # T and V prime-ish: no chunk below divides them


def make_inputs(seed, b=B, t=T, d=D, v=V, scale=1.0):
    rng = np.random.default_rng(seed)
    h = rng.normal(0, scale, (b, t, d))
    w = rng.normal(0, 1 / np.sqrt(d), (d, v))
    bias = rng.normal(0, 0.5, v)
    y = rng.integers(0, v, (b, t))
    c = rng.normal(0, 1, (b, t))  # cotangent weights of the scalar objective
    return h, w, bias, y, c


def np_logp(h, w, bias, y):
    z = h @ w + (0 if bias is None else bias)
    m = z.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(-1))
    return np.take_along_axis(z, y[..., None], -1)[..., 0] - lse, np.exp(z - lse[..., None])


def np_grads(h, w, bias, y, c):
    """Closed-form gradients of Σ c · log p(y) w.r.t. h, W, b."""
    _, p = np_logp(h, w, bias, y)
    onehot = np.eye(w.shape[1])[y]
    r = c[..., None] * (onehot - p)  # [B, T, V]
    return r @ w.T, np.einsum("btd,btv->dv", h, r), r.sum((0, 1))


CHUNKS = [(8, None), (8, 7), (16, 10), (0, 13), (5, 49), (100, None), (1, 64)]
# Every chunking with and without a bias on the two main paths (sequence chunks with the whole vocabulary, and
# with a vocabulary scan whose last chunk is padded); the other chunkings each once, with a bias where the
# vocabulary is sliced (the bias is sliced with it) and both ways over all: 9 cases rather than 14.
CASES = [(8, None, False), (8, None, True), (8, 7, False), (8, 7, True), (16, 10, True), (0, 13, False),
         (5, 49, True), (100, None, False), (1, 64, True)]
assert {c[:2] for c in CASES} == set(CHUNKS)


@pytest.mark.parametrize("seq_chunk,vocab_chunk,with_bias", CASES)
def test_chunked_equals_naive_and_numpy_value_and_grads(seq_chunk, vocab_chunk, with_bias):
    h, w, bias, y, c = make_inputs(0)
    bias = bias if with_bias else None
    args = [jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32),
            None if bias is None else jnp.asarray(bias, jnp.float32)]
    ct = jnp.asarray(c, jnp.float32)

    def objective(fn):
        def f(h_, w_, b_):
            return jnp.sum(ct * fn(h_, w_, jnp.asarray(y), b_))
        return f

    chunked = lambda h_, w_, y_, b_: logprobs.token_logps(h_, w_, y_, b_, seq_chunk=seq_chunk,
                                                          vocab_chunk=vocab_chunk)
    out = jax.jit(chunked)(args[0], args[1], jnp.asarray(y), args[2])
    ref = logprobs.naive_token_logps(args[0], args[1], jnp.asarray(y), args[2])
    assert out.dtype == jnp.float32 and out.shape == (B, T)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out), np_logp(h, w, bias, y)[0], atol=1e-5, rtol=1e-5)

    argnums = (0, 1, 2) if with_bias else (0, 1)
    g_chunk = jax.jit(jax.grad(objective(chunked), argnums=argnums))(*args)
    g_naive = jax.grad(objective(logprobs.naive_token_logps), argnums=argnums)(*args)
    g_np = np_grads(h, w, bias, y, c)
    for a, b_, e in zip(g_chunk, g_naive, g_np):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(a), e, atol=1e-5, rtol=1e-5)
    # W (and b) frozen, as LoRA's unembedding: d/dh alone (computed in the forward pass)
    g_h = jax.jit(jax.grad(objective(chunked)))(*args)
    np.testing.assert_allclose(np.asarray(g_h), g_np[0], atol=1e-5, rtol=1e-5)


def test_frozen_unembedding_gradient_is_differentiable_again():
    """Forward-over-reverse through d/dh with W frozen (the implicit solver's Hessian-vector products,
    ``jax.linearize`` of a gradient) equals the naive path's."""
    h, w, _, y, c = make_inputs(4)
    w_, y_, c_ = jnp.asarray(w, jnp.float32), jnp.asarray(y), jnp.asarray(c, jnp.float32)
    v = jnp.asarray(make_inputs(5)[0], jnp.float32)
    hvps = []
    for fn in (lambda h_: logprobs.token_logps(h_, w_, y_, seq_chunk=8),
               lambda h_: logprobs.naive_token_logps(h_, w_, y_)):
        grad = jax.grad(lambda h_: jnp.sum(c_ * fn(h_)))
        hvps.append(jax.linearize(grad, jnp.asarray(h, jnp.float32))[1](v))
    np.testing.assert_allclose(np.asarray(hvps[0]), np.asarray(hvps[1]), atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(hvps[1])).max() > 1e-2


def test_large_logits_stay_finite_and_exact():
    h, w, bias, y, c = make_inputs(1, scale=300.0)  # logits of order 1e3..1e4
    f = lambda fn: jax.value_and_grad(lambda h_: jnp.sum(jnp.asarray(c, jnp.float32) * fn(h_)))(
        jnp.asarray(h, jnp.float32))
    v1, g1 = f(lambda h_: logprobs.token_logps(h_, jnp.asarray(w, jnp.float32), jnp.asarray(y), seq_chunk=8,
                                               vocab_chunk=7))
    v0, g0 = f(lambda h_: logprobs.naive_token_logps(h_, jnp.asarray(w, jnp.float32), jnp.asarray(y)))
    assert np.isfinite(float(v1)) and np.all(np.isfinite(np.asarray(g1)))
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-4, atol=1e-3)


def test_vmap_over_a_leading_axis_and_jit():
    hs = np.stack([make_inputs(s)[0] for s in range(3)])  # [3, B, T, D]
    _, w, bias, y, _ = make_inputs(0)
    fn = lambda h_: logprobs.token_logps(h_, jnp.asarray(w, jnp.float32), jnp.asarray(y),
                                         jnp.asarray(bias, jnp.float32), seq_chunk=8, vocab_chunk=7)
    out = jax.jit(jax.vmap(fn))(jnp.asarray(hs, jnp.float32))
    for i in range(3):
        np.testing.assert_allclose(np.asarray(out[i]), np_logp(hs[i], w, bias, y)[0], atol=1e-5, rtol=1e-5)
    # per-example gradients through vmap(grad)
    g = jax.vmap(jax.grad(lambda h_: fn(h_).sum()))(jnp.asarray(hs, jnp.float32))
    for i in range(3):
        np.testing.assert_allclose(np.asarray(g[i]), np_grads(hs[i], w, bias, y, np.ones((B, T)))[0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("vocab_chunk", [None, 7])
def test_bf16_inputs_give_fp32_outputs_close_to_fp32(vocab_chunk):
    h, w, bias, y, _ = make_inputs(2)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    out = logprobs.token_logps(hb, wb, jnp.asarray(y), seq_chunk=8, vocab_chunk=vocab_chunk)
    assert out.dtype == jnp.float32
    # the oracle on the same bf16-rounded inputs; only the matmul products round further
    ref = np_logp(np.asarray(hb, np.float64), np.asarray(wb, np.float64), None, y)[0]
    np.testing.assert_allclose(np.asarray(out), ref, atol=3e-2)
    g = jax.grad(lambda x: logprobs.token_logps(x, wb, jnp.asarray(y), seq_chunk=8,
                                                vocab_chunk=vocab_chunk).sum())(hb)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
    assert logprobs.sequence_logps(out.astype(jnp.bfloat16), jnp.ones((B, T), jnp.bfloat16),
                                   jnp.zeros((B, T), jnp.int32), 1)[0].dtype == jnp.float32


def test_sequence_logps_on_a_packed_batch_matches_numpy_loops():
    rng = np.random.default_rng(3)
    S = 5
    logps = rng.normal(-2, 1, (B, T))
    seq_ids = np.zeros((B, T), np.int32)
    seq_ids[0, :10], seq_ids[0, 10:25], seq_ids[0, 25:] = 0, 1, 2  # three sequences packed in row 0
    seq_ids[1, :20], seq_ids[1, 20:30] = 3, 4  # two in row 1, then padding (id 0, mask 0)
    mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
    mask[1, 30:] = 0.0
    logps[1, 30:] = np.nan  # garbage under the padding must not leak
    sums, counts = jax.jit(logprobs.sequence_logps, static_argnums=3)(
        jnp.asarray(logps, jnp.float32), jnp.asarray(mask), jnp.asarray(seq_ids), S)
    exp_sums, exp_counts = np.zeros(S), np.zeros(S)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                exp_sums[seq_ids[b, t]] += logps[b, t]
                exp_counts[seq_ids[b, t]] += 1
    assert sums.dtype == counts.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sums), exp_sums, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), exp_counts)
    # gradient of the sums w.r.t. token log-probs is the mask (0 under padding, no NaN)
    g = jax.grad(lambda x: logprobs.sequence_logps(x, jnp.asarray(mask), jnp.asarray(seq_ids), S)[0].sum())(
        jnp.asarray(logps, jnp.float32))
    np.testing.assert_array_equal(np.asarray(g), mask)


def test_padding_masked_end_to_end_sums_equal_numpy():
    h, w, bias, y, _ = make_inputs(4)
    mask = np.ones((B, T), np.float32)
    mask[0, 30:], mask[1, :5] = 0.0, 0.0  # right padding and a masked prompt
    seq_ids = np.tile(np.array([[0], [1]], np.int32), (1, T))
    logp = logprobs.token_logps(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y),
                                seq_chunk=6, vocab_chunk=9)
    sums, counts = logprobs.sequence_logps(logp, jnp.asarray(mask), jnp.asarray(seq_ids), 2)
    ref = (np_logp(h, w, None, y)[0] * mask).sum(1)
    np.testing.assert_allclose(np.asarray(sums), ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(counts), mask.sum(1))


def _scored_batch():
    """Row 0: three packed sequences (a masked prompt each) and padding; row 1: nothing scored;
    row 2: one padded sequence whose scored count (22) is the most of any row."""
    b = 3
    h, w, bias, y, _ = make_inputs(9, b=b)
    seq_ids = np.zeros((b, T), np.int32)
    mask = np.zeros((b, T), np.float32)
    seq_ids[0, :10], seq_ids[0, 10:24], seq_ids[0, 24:33] = 0, 1, 2
    mask[0, 3:9], mask[0, 14:23], mask[0, 27:32] = 1, 1, 1  # 20 scored in row 0
    seq_ids[1, :12] = 3  # a sequence with an empty response: no scored position
    seq_ids[2, :30] = 4
    mask[2, 7:29] = 1  # 22 scored
    return h, w, bias, y, mask, seq_ids, 5


@pytest.mark.parametrize("n,seq_chunk,vocab_chunk", [(22, 8, 13), (24, 128, None)])
def test_scored_positions_equal_the_full_path_values_counts_and_grads(n, seq_chunk, vocab_chunk):
    """Gathering only the scored positions (N = the most scored of a row: the bucket boundary,
    or more) gives the full-logits path's sums, counts and gradients w.r.t. h, W and b."""
    h, w, bias, y, mask, seq_ids, S = _scored_batch()
    h, w, bias = (jnp.asarray(x, jnp.float32) for x in (h, w, bias))
    c = jnp.asarray(np.random.default_rng(1).normal(size=S), jnp.float32)
    mask_j, ids_j, y_j = jnp.asarray(mask), jnp.asarray(seq_ids), jnp.asarray(y)

    def full(h_, w_, b_):
        lp = logprobs.token_logps(h_, w_, y_j, b_, seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)
        return logprobs.sequence_logps(lp, mask_j, ids_j, S)

    def scored(h_, w_, b_, idx):
        return logprobs.scored_sequence_logps(h_, w_, y_j, mask_j, ids_j, S, score_index_BN=idx, b_V=b_,
                                              seq_chunk=seq_chunk, vocab_chunk=vocab_chunk)

    idx = jnp.asarray(score_index(mask, n))
    (s_full, c_full), (s_sc, c_sc) = full(h, w, bias), jax.jit(scored)(h, w, bias, idx)
    np.testing.assert_allclose(np.asarray(s_sc), np.asarray(s_full), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(c_sc), np.asarray(c_full))
    np.testing.assert_array_equal(np.asarray(c_full), [6, 9, 5, 0, 22])
    assert np.asarray(s_sc)[3] == 0.0  # the sequence with nothing scored sums to 0, not NaN
    # the NumPy oracle for the values, too
    np.testing.assert_allclose(np.asarray(s_sc)[4], (np_logp(*map(np.asarray, (h, w, bias)), y)[0] * mask)[2].sum(),
                               rtol=1e-5)
    g_full = jax.grad(lambda *a: jnp.dot(full(*a)[0], c), argnums=(0, 1, 2))(h, w, bias)
    g_sc = jax.jit(jax.grad(lambda *a: jnp.dot(scored(*a, idx)[0], c), argnums=(0, 1, 2)))(h, w, bias)
    for a_, b_ in zip(g_sc, g_full):
        np.testing.assert_allclose(np.asarray(a_), np.asarray(b_), rtol=1e-4, atol=1e-6)
    assert not np.asarray(g_sc[0])[mask == 0].any()  # no gradient reaches unscored positions
    # no index: derived inside the computation (N = T), same numbers
    s_none, c_none = jax.jit(lambda *a: scored(*a, None))(h, w, bias)
    np.testing.assert_allclose(np.asarray(s_none), np.asarray(s_full), rtol=1e-5, atol=1e-5)


def test_a_score_index_that_misses_scored_positions_raises_or_gives_nan():
    h, w, bias, y, mask, seq_ids, S = _scored_batch()
    args = (jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y), jnp.asarray(mask),
            jnp.asarray(seq_ids), S)
    short = np.argsort(mask == 0, axis=1, kind="stable")[:, :21].astype(np.int32)  # row 2 has 22 scored
    with pytest.raises(ValueError, match="score_index_BN misses scored positions .* row 2 position 28"):
        logprobs.scored_sequence_logps(*args, score_index_BN=short)
    with pytest.raises(ValueError, match="repeats a position"):
        logprobs.scored_sequence_logps(*args, score_index_BN=np.zeros((3, 22), np.int32))
    with pytest.raises(ValueError, match=r"score_index_BN must be \[B, N\] with B = 3 and N <= T = 37"):
        logprobs.scored_sequence_logps(*args, score_index_BN=np.zeros((3, 38), np.int32))
    with pytest.raises(ValueError, match=r"size=21 must be an int in \[22, T = 37\]"):
        score_index(mask, 21)
    sums, counts = jax.jit(lambda i: logprobs.scored_sequence_logps(*args, score_index_BN=i))(jnp.asarray(short))
    sums = np.asarray(sums)
    assert np.isnan(sums[4]) and np.isfinite(sums[:4]).all()  # only the sequence that lost a position
    np.testing.assert_array_equal(np.asarray(counts), [6, 9, 5, 0, 22])


def test_out_of_range_targets_raise_when_concrete_and_give_nan_when_traced():
    h, w, _, y, _ = make_inputs(5)
    bad = y.copy()
    bad[0, 3] = V
    args = (jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
    with pytest.raises(ValueError, match=r"targets_BT must lie in \[0, V = 50\); got \[50\]"):
        logprobs.token_logps(*args, jnp.asarray(bad))
    for kw in (dict(seq_chunk=8), dict(seq_chunk=8, vocab_chunk=7)):
        out = np.asarray(jax.jit(lambda t: logprobs.token_logps(*args, t, **kw))(jnp.asarray(bad)))
        assert np.isnan(out[0, 3]) and np.isfinite(np.delete(out.ravel(), 3)).all()


@pytest.mark.parametrize("call,match", [
    (lambda h, w, y: logprobs.token_logps(h[0], w, y), r"hidden_BTD must be \[B, T, D\]"),
    (lambda h, w, y: logprobs.token_logps(h, w.T, y), r"w_DV must be \[D, V\] with D = .* = 16"),
    (lambda h, w, y: logprobs.token_logps(h, w, y[:, :5]), r"targets_BT must be \[B, T\]"),
    (lambda h, w, y: logprobs.token_logps(h, w, y.astype(jnp.float32)), "targets_BT must be integer"),
    (lambda h, w, y: logprobs.token_logps(h, w, y, jnp.zeros(3)), r"b_V must be \[V\] = \(50,\)"),
    (lambda h, w, y: logprobs.token_logps(h.astype(jnp.int32), w, y), "hidden_BTD must be a float array"),
    (lambda h, w, y: logprobs.token_logps(h, w, y, seq_chunk=-1), "seq_chunk must be a Python int >= 0"),
    (lambda h, w, y: logprobs.token_logps(h, w, y, vocab_chunk=2.5), "vocab_chunk must be a Python int"),
    (lambda h, w, y: logprobs.naive_token_logps(h, w.T, y), r"w_DV must be \[D, V\]"),
    (lambda h, w, y: logprobs.sequence_logps(h[..., 0], jnp.ones((B, T)), y, 0), "num_seqs must be"),
    (lambda h, w, y: logprobs.sequence_logps(h[..., 0], jnp.ones((B, 3)), y, 2), "must share a shape"),
    (lambda h, w, y: logprobs.sequence_logps(h[..., 0], jnp.ones((B, T)), y, 2),
     r"seq_ids_BT must lie in \[0, num_seqs = 2\)"),
    (lambda h, w, y: logprobs.sequence_logps(h[..., 0], jnp.ones((B, T)), y * 0.0, 2),
     "seq_ids_BT must be integer"),
])
def test_bad_inputs_raise_value_errors_naming_the_argument(call, match):
    h, w, _, y, _ = make_inputs(6)
    with pytest.raises(ValueError, match=match):
        call(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y))


def test_chunking_bounds_compiled_memory_of_forward_and_backward():
    """XLA's compiled temp bytes: chunked value_and_grad far below the naive [B, T, V] path."""
    b, t, d, v = 1, 512, 32, 8192
    h = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(fn):
        f = jax.jit(jax.value_and_grad(lambda h_, w_, y_: fn(h_, w_, y_).sum()))
        return f.lower(h, w, y).compile().memory_analysis().temp_size_in_bytes

    naive = temp_bytes(logprobs.naive_token_logps)
    seq = temp_bytes(lambda *a: logprobs.token_logps(*a, seq_chunk=32))
    both = temp_bytes(lambda *a: logprobs.token_logps(*a, seq_chunk=32, vocab_chunk=1024))
    logits_bytes = b * t * v * 4
    assert naive >= logits_bytes  # the naive path holds at least one [B, T, V] fp32 buffer
    assert seq < naive / 4 and both < seq
