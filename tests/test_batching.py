"""Contract-1 batches: layout, padded == packed through a model, resume, process slices.

Oracles: the token lists the batches were built from, and a NumPy float64 toy
decoder (embedding + learned positions + one causal self-attention layer masked
by ``segment_ids``) whose per-sequence log-prob sums do not depend on how the
sequences are laid out in rows.
"""

import json

import datasets
import numpy as np
import orbax.checkpoint as ocp
import pytest

from spo_jax.data import BATCH_KEYS, BatchIterator, bucket_length, bucket_scored

VOCAB, MAX_LEN = 50, 40


def _dataset(n=23, seed=0, kind="preference", max_len=MAX_LEN):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        p = rng.integers(1, 12)
        c, r = rng.integers(1, max_len - p + 1, size=2)
        row = {"example_index": 3 * i + 1,  # original rows numbered independently of positions
               "prompt_ids": rng.integers(2, VOCAB, p).tolist()}
        if kind == "preference":
            row["chosen_ids"] = rng.integers(2, VOCAB, c).tolist()
            row["rejected_ids"] = rng.integers(2, VOCAB, r).tolist()
        else:
            row["completion_ids"] = rng.integers(2, VOCAB, c).tolist()
        rows.append(row)
    return datasets.Dataset.from_list(rows), rows


def _sequences(batch, K, process_index=0):
    """Recover (example_index, k) -> (tokens, response tokens from targets) from a batch."""
    S = len(batch["seq_valid"])
    out = {}
    for s in range(S):
        if batch["seq_valid"][s] == 0:
            assert batch["example_index"][s] == -1
            assert not np.any((batch["seq_ids"] == process_index * S + s) & (batch["segment_ids"] > 0))
            continue
        sel = (batch["seq_ids"] == process_index * S + s) & (batch["segment_ids"] > 0)
        rows = np.unique(np.nonzero(sel)[0])
        assert len(rows) == 1  # one sequence lives in one row, one segment
        r = rows[0]
        cols = np.nonzero(sel[r])[0]
        assert np.all(np.diff(cols) == 1)
        assert len(np.unique(batch["segment_ids"][r, cols])) == 1
        np.testing.assert_array_equal(batch["positions"][r, cols], np.arange(len(cols)))
        tokens = batch["input_ids"][r, cols]
        np.testing.assert_array_equal(batch["targets"][r, cols[:-1]], tokens[1:])
        assert batch["targets"][r, cols[-1]] == 0 and batch["loss_mask"][r, cols[-1]] == 0
        mask = batch["loss_mask"][r, cols] > 0
        out[(int(batch["example_index"][s]), s % K)] = (tokens, batch["targets"][r, cols][mask])
    assert np.all(batch["loss_mask"][batch["segment_ids"] == 0] == 0)
    return out


def _check_against_rows(batch, rows, kind="preference", process_index=0):
    by_index = {row["example_index"]: row for row in rows}
    names = ("chosen_ids", "rejected_ids") if kind == "preference" else ("completion_ids",)
    seqs = _sequences(batch, len(names), process_index)
    for (e, k), (tokens, loss_targets) in seqs.items():
        row = by_index[e]
        np.testing.assert_array_equal(tokens, row["prompt_ids"] + row[names[k]])
        np.testing.assert_array_equal(loss_targets, row[names[k]])  # exactly the response tokens
    if kind == "preference":  # interleaved: 2i chosen, 2i+1 rejected of the same pair
        ex = batch["example_index"]
        np.testing.assert_array_equal(ex[0::2], ex[1::2])
        np.testing.assert_array_equal(batch["seq_valid"][0::2], batch["seq_valid"][1::2])
    return seqs


def _check_dtypes(batch, S):
    assert set(batch) == set(BATCH_KEYS)
    R, T = batch["input_ids"].shape
    for k in ("input_ids", "targets", "positions", "segment_ids", "seq_ids"):
        assert batch[k].shape == (R, T) and batch[k].dtype == np.int32
    assert batch["loss_mask"].shape == (R, T) and batch["loss_mask"].dtype == np.float32
    assert batch["example_index"].shape == (S,) and batch["example_index"].dtype == np.int32
    assert batch["seq_valid"].shape == (S,) and batch["seq_valid"].dtype == np.float32
    # score_index: every scored position of its row once (first, ascending), then unscored ones
    idx, scored = batch["score_index"], batch["loss_mask"] > 0
    N = idx.shape[1]
    assert idx.shape == (R, N) and idx.dtype == np.int32 and 1 <= N <= T
    most = int(scored.sum(1).max())
    assert most <= N
    for r in range(R):
        n = int(scored[r].sum())
        np.testing.assert_array_equal(idx[r, :n], np.flatnonzero(scored[r]))
        assert len(set(idx[r].tolist())) == N and not scored[r, idx[r, n:]].any()
    return most, N


@pytest.mark.parametrize("kind", ["preference", "sft"])
@pytest.mark.parametrize("packing", [False, True])
def test_layout_matches_rows_and_covers_the_epoch(kind, packing):
    ds, rows = _dataset(kind=kind)
    K = 2 if kind == "preference" else 1
    it = BatchIterator(ds, batch_size=4, max_length=MAX_LEN, packing=packing, length_bucket=16,
                       num_epochs=1, seed=3, process_index=0, process_count=1)
    seen = []
    for batch in it:
        most, N = _check_dtypes(batch, 4 * K)
        # N: the most scored positions of a row, bucketed (a multiple of 16 unless capped at T)
        assert N == bucket_scored(most, 16, batch["input_ids"].shape[1])
        if packing:
            assert batch["input_ids"].shape == (it.pack_rows, MAX_LEN)
        else:
            T = batch["input_ids"].shape[1]
            assert T % 16 == 0 or T == MAX_LEN
            assert batch["input_ids"].shape[0] == 4 * K
        seqs = _check_against_rows(batch, rows, kind)
        seen += [e for (e, k) in seqs if k == 0]
    assert sorted(seen) == sorted(r["example_index"] for r in rows)


def test_bucket_scored():
    assert [bucket_scored(n, "pow2", 1000) for n in (0, 1, 7, 9, 64, 65, 129, 192, 193)] == \
        [1, 1, 7, 10, 64, 80, 160, 192, 224]  # 4 steps per octave
    assert bucket_scored(65, 64, 512) == 128 and bucket_scored(250, 64, 200) == 250
    assert bucket_scored(300, "pow2", 310) == 310 and bucket_scored(7, None, 512) == 7


def test_bucket_length():
    assert bucket_length(1, 64, 512) == 64 and bucket_length(65, 64, 512) == 128
    assert bucket_length(500, 64, 512) == 512 and bucket_length(33, "pow2", 512) == 64
    assert bucket_length(300, "pow2", 400) == 400 and bucket_length(7, None, 512) == 7
    with pytest.raises(ValueError, match="length_bucket"):
        bucket_length(3, "bogus", 10)


def test_padded_remainder_fillers_and_drop_remainder():
    ds, rows = _dataset(n=10)
    batches = list(BatchIterator(ds, batch_size=4, max_length=MAX_LEN, num_epochs=1, process_index=0,
                                 process_count=1))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[-1]["seq_valid"], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batches[-1]["example_index"][4:], -1)
    dropped = list(BatchIterator(ds, batch_size=4, max_length=MAX_LEN, num_epochs=1, drop_remainder=True,
                                 process_index=0, process_count=1))
    assert len(dropped) == 2


# ------------------------------------------------------------------ padded == packed through a model

def _toy_logps(batch, params):
    """Per-sequence sums of log p(target) from a float64 one-layer causal attention model.

    x = E[ids] + P[positions]; attention restricted to the same row, same nonzero
    segment and earlier-or-equal positions; h = x + softmax(q k^T / sqrt(D)) v;
    logits = tanh(h) W.
    """
    E, P, Wq, Wk, Wv, Wo = params
    ids, pos, seg = batch["input_ids"], batch["positions"], batch["segment_ids"]
    R, T = ids.shape
    x = E[ids] + P[pos]  # [R, T, D]
    q, k, v = x @ Wq, x @ Wk, x @ Wv
    scores = np.einsum("rtd,rud->rtu", q, k) / np.sqrt(E.shape[1])
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & np.tril(np.ones((T, T), bool))[None]
    scores = np.where(allowed, scores, -1e30)
    att = np.exp(scores - scores.max(-1, keepdims=True)) * allowed
    att /= np.maximum(att.sum(-1, keepdims=True), 1e-300)
    h = x + np.einsum("rtu,rud->rtd", att, v)
    logits = np.tanh(h) @ Wo
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok_logp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    S = len(batch["seq_valid"])
    sums = np.zeros(S)
    np.add.at(sums, batch["seq_ids"].ravel() % S, (tok_logp * batch["loss_mask"]).ravel())
    counts = np.zeros(S)
    np.add.at(counts, batch["seq_ids"].ravel() % S, batch["loss_mask"].ravel())
    return sums, counts


@pytest.mark.parametrize("kind", ["preference", "sft"])
def test_padded_and_packed_give_the_same_sequence_logprob_sums(kind):
    ds, rows = _dataset(n=17, kind=kind)
    rng = np.random.default_rng(1)
    D = 8
    params = [rng.normal(size=(VOCAB, D)), rng.normal(size=(MAX_LEN, D)), rng.normal(size=(D, D)),
              rng.normal(size=(D, D)), rng.normal(size=(D, D)), rng.normal(size=(D, VOCAB))]
    results = {}
    for packing in (False, True):
        per_seq, max_segments = {}, 0
        it = BatchIterator(ds, batch_size=4, max_length=MAX_LEN, packing=packing, num_epochs=1, seed=5,
                           pack_rows=3 if packing else None, pack_length=64 if packing else None,
                           process_index=0, process_count=1)
        for batch in it:
            sums, counts = _toy_logps(batch, params)
            K = 2 if kind == "preference" else 1
            for s in np.flatnonzero(batch["seq_valid"]):
                per_seq[(int(batch["example_index"][s]), s % K)] = (sums[s], counts[s])
            max_segments = max(max_segments, int(batch["segment_ids"].max()))
        assert (max_segments >= 2) == packing  # packed rows really hold several segments
        results[packing] = per_seq
    assert results[False].keys() == results[True].keys()
    assert len(results[False]) == len(rows) * (2 if kind == "preference" else 1)
    for key, (s_pad, c_pad) in results[False].items():
        s_pack, c_pack = results[True][key]
        assert c_pad == c_pack > 0
        assert abs(s_pad - s_pack) <= 1e-5, (key, s_pad, s_pack)


# ------------------------------------------------------------------ resume

def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("packing", [False, True])
def test_resume_yields_exactly_the_remaining_batches(packing, tmp_path):
    ds, _ = _dataset(n=11)
    kw = dict(batch_size=4, max_length=MAX_LEN, packing=packing, num_epochs=3, seed=7, process_index=0,
              process_count=1, pack_rows=3 if packing else None)
    full = list(BatchIterator(ds, **kw))
    per_epoch = BatchIterator(ds, **kw).num_batches(0)
    assert len(full) > per_epoch + 2
    for k in (1, per_epoch, per_epoch + 1):  # inside an epoch, exactly at and across its boundary
        it = BatchIterator(ds, **kw)
        head = [next(it) for _ in range(k)]
        state = json.loads(json.dumps(it.get_state()))
        fresh = BatchIterator(ds, **kw)
        fresh.set_state(state)
        _same_batches(head + list(fresh), full)
    # through Orbax's JSON handler, as the trainer saves it
    it = BatchIterator(ds, **kw)
    head = [next(it) for _ in range(per_epoch + 1)]
    ckpt = ocp.Checkpointer(ocp.JsonCheckpointHandler())
    ckpt.save(tmp_path / "data_state", args=ocp.args.JsonSave(it.get_state()))
    restored = ckpt.restore(tmp_path / "data_state", args=ocp.args.JsonRestore())
    fresh = BatchIterator(ds, **kw)
    fresh.set_state(restored)
    _same_batches(head + list(fresh), full)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(ds, **{**kw, "seed": 8}).set_state(restored)


def test_epochs_reshuffle_deterministically():
    ds, _ = _dataset(n=12)
    kw = dict(batch_size=12, max_length=MAX_LEN, num_epochs=2, seed=1, process_index=0, process_count=1)
    a = [b["example_index"][0::2].tolist() for b in BatchIterator(ds, **kw)]
    b = [b["example_index"][0::2].tolist() for b in BatchIterator(ds, **kw)]
    assert a == b and a[0] != a[1] and sorted(a[0]) == sorted(a[1])


# ------------------------------------------------------------------ processes

@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("process_count", [2, 3])
def test_process_slices_disjoint_and_covering(packing, process_count):
    ds, rows = _dataset(n=25)
    batch_size = 2 * process_count
    per_process = []
    for p in range(process_count):
        it = BatchIterator(ds, batch_size=batch_size, max_length=MAX_LEN, packing=packing, num_epochs=1, seed=2,
                           pack_rows=2 if packing else None, process_index=p, process_count=process_count)
        seen, shapes = [], []
        for batch in it:
            S = len(batch["seq_valid"])
            assert S == 2 * batch_size // process_count
            seqs = _check_against_rows(batch, rows, process_index=p)
            ids = batch["seq_ids"][batch["segment_ids"] > 0]
            assert np.all((ids >= p * S) & (ids < (p + 1) * S))  # global numbering
            seen += [e for (e, k) in seqs if k == 0]
            shapes.append((batch["input_ids"].shape, batch["score_index"].shape))
        per_process.append((seen, shapes))
    steps = {len(s) for _, s in per_process}
    assert len(steps) == 1  # lockstep: every process takes the same number of steps
    for step in range(steps.pop()):  # and the same shapes at every step (one global array)
        assert len({shapes[step] for _, shapes in per_process}) == 1
    all_seen = [e for seen, _ in per_process for e in seen]
    assert len(all_seen) == len(set(all_seen))  # disjoint
    assert sorted(all_seen) == sorted(r["example_index"] for r in rows)  # covering


def test_bad_arguments():
    ds, _ = _dataset(n=5)
    with pytest.raises(ValueError, match="process_count"):
        BatchIterator(ds, batch_size=3, max_length=MAX_LEN, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="max_length"):
        BatchIterator(ds, batch_size=2, max_length=5, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="drop_remainder"):
        BatchIterator(ds, batch_size=2, max_length=MAX_LEN, packing=True, drop_remainder=True,
                      process_index=0, process_count=1)
    with pytest.raises(ValueError, match="prompt_ids"):
        BatchIterator(datasets.Dataset.from_list([{"foo": [1]}]), batch_size=1, max_length=4,
                      process_index=0, process_count=1)
