"""Tokenized rows -> Contract-1 batches (padded with length buckets, or packed).

The batch (Contract 1; also in the repository's ``docs/DESIGN.md``) is a ``dict[str, np.ndarray]``:

=================  ======  =======  ============================================
key                shape   dtype    meaning
=================  ======  =======  ============================================
``input_ids``      [R, T]  int32    token ids (``pad_id`` where empty)
``targets``        [R, T]  int32    next token *within the segment* (0 where none)
``loss_mask``      [R, T]  float32  1 where ``targets`` is a response token
``positions``      [R, T]  int32    0, 1, ... restarting in every segment
``segment_ids``    [R, T]  int32    1, 2, ... per sequence in a row; 0 = padding
``seq_ids``        [R, T]  int32    global sequence id ``process_index * S + s``; 0 on padding
``example_index``  [S]     int32    dataset row (``stats``' row numbering) of each sequence; -1 filler
``seq_valid``      [S]     float32  1 real sequence, 0 filler
``score_index``    [R, N]  int32    row r's scored positions (``loss_mask`` 1), ascending, then
                                    unscored ones (:func:`score_index`)
=================  ======  =======  ============================================

Here ``S`` is the *local* number of sequences (``S = K * batch_size / process_count``
with ``K = 2`` for preference data: sequence ``2i`` is pair ``i``'s chosen
response, ``2i + 1`` its rejected one; ``K = 1`` for SFT).

* Padded: ``R = S``, row ``r`` holds sequence ``r``; ``T`` is the longest sequence
  of the *global* batch rounded up to a bucket (a multiple of ``length_bucket``
  or the next power of two), capped at ``max_length``. All processes agree on
  ``T`` because every process knows every sequence length.
* Scored positions: ``N`` is the most ``loss_mask`` positions of any row of the *global*
  batch rounded up by :func:`bucket_scored` (same ``length_bucket``), capped at ``T``:
  the log-prob path computes the unembedding only at the ``N`` gathered positions
  (``spo_jax.logprobs.scored_sequence_logps``). All processes agree on ``N`` because
  every process knows every sequence's prompt and response lengths (packed: every
  process plans every process's rows).
* Packed: fixed ``[R, T] = [pack_rows, pack_length]``; pairs are taken in order
  and placed first-fit, both sequences of a pair in the same batch; the batch
  closes at ``batch_size / process_count`` pairs or at the first pair that does
  not fit (it opens the next batch); missing pairs are fillers.

Order and multi-process: epoch ``e`` visits the examples in the permutation
``np.random.default_rng([seed, e]).permutation(N)`` (identity if
``shuffle=False``). Each global step takes the next examples of that order and
deals consecutive runs of them to processes ``0, 1, ...``; process ``k`` builds
only its own run. The run boundaries depend only on sequence lengths, which every
process holds, so all processes take the same number of steps per epoch, their
slices are disjoint and together cover the data. The iterator state is
``{"epoch", "cursor", ...}`` (JSON ints): restoring it into a fresh iterator over
the same data yields exactly the remaining batches.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import datasets
import numpy as np

__all__ = ["BATCH_KEYS", "TokenizedExamples", "bucket_length", "bucket_scored", "score_index", "empty_batch",
           "write_sequence", "BatchIterator"]

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "seq_ids",
              "example_index", "seq_valid", "score_index")
_STATE_VERSION = 1


class TokenizedExamples:
    """Flat NumPy view of a tokenized dataset (no Python lists per row).

    ``prompt(i)``, ``response(i, k)``: token arrays; ``seq_lengths``: [N, K] int64
    lengths of ``prompt + response_k``; ``scored_lengths``: [N, K] its ``loss_mask``
    positions; ``example_index``: [N] int64 dataset rows.
    """

    def __init__(self, dataset: datasets.Dataset):
        names = dataset.column_names
        if {"chosen_ids", "rejected_ids"} <= set(names):
            self.response_columns = ("chosen_ids", "rejected_ids")
        elif "completion_ids" in names:
            self.response_columns = ("completion_ids",)
        else:
            raise ValueError(f"dataset needs token columns prompt_ids + chosen_ids/rejected_ids or completion_ids "
                             f"(the output of spo_jax.data.tokenize_dataset); got {names}.")
        for c in ("prompt_ids", "example_index"):
            if c not in names:
                raise ValueError(f"dataset needs column {c!r} (output of tokenize_dataset); got {names}.")
        table = dataset.with_format("arrow")[:]  # honours select()/filter() index mappings
        self.kind = "preference" if len(self.response_columns) == 2 else "sft"
        self.example_index = table.column("example_index").to_numpy().astype(np.int64)
        self._values, self._offsets = [], []
        for c in ("prompt_ids", *self.response_columns):
            col = table.column(c).combine_chunks()
            offsets = col.offsets.to_numpy().astype(np.int64)
            values = col.values.to_numpy(zero_copy_only=False).astype(np.int32)
            self._values.append(values[offsets[0]:offsets[-1]])
            self._offsets.append(offsets - offsets[0])
        lengths = [np.diff(o) for o in self._offsets]
        self.prompt_lengths = lengths[0]
        self.seq_lengths = np.stack([lengths[0] + r for r in lengths[1:]], axis=1)  # [N, K]
        # loss_mask positions of each sequence (write_sequence): t in [max(prompt - 1, 0), L - 2]
        self.scored_lengths = np.maximum(self.seq_lengths - 1 - np.maximum(self.prompt_lengths - 1, 0)[:, None], 0)

    def __len__(self) -> int:
        return len(self.example_index)

    @property
    def seqs_per_example(self) -> int:
        return len(self.response_columns)

    def prompt(self, i: int) -> np.ndarray:
        o = self._offsets[0]
        return self._values[0][o[i]:o[i + 1]]

    def response(self, i: int, k: int) -> np.ndarray:
        o = self._offsets[k + 1]
        return self._values[k + 1][o[i]:o[i + 1]]


def bucket_length(n: int, bucket: int | str | None, cap: int) -> int:
    """Round a length up: to a multiple of ``bucket`` (int), the next power of two
    (``"pow2"``) or not at all (``None``); never above ``cap`` (nor below ``n``)."""
    if bucket is None:
        t = n
    elif bucket == "pow2":
        t = 1 << max(int(n) - 1, 0).bit_length()
    elif isinstance(bucket, (int, np.integer)) and bucket > 0:
        t = -(-int(n) // int(bucket)) * int(bucket)
    else:
        raise ValueError(f"length_bucket={bucket!r} must be a positive int, 'pow2' or None.")
    return int(max(min(t, cap), n))


def bucket_scored(n: int, bucket: int | str | None, cap: int) -> int:
    """Round a row's scored-position count up, to bound the compiled shapes: to a multiple of
    ``bucket`` (int), to the next of 4 steps per octave (``"pow2"``: 1, 1.25, 1.5, 1.75 x 2^k,
    so at most 1/4 of the gathered positions are unscored) or not at all (``None``);
    at least 1, never above ``cap`` (the row length T)."""
    n = max(int(n), 1)
    if bucket == "pow2":
        step = max((1 << (n - 1).bit_length()) // 8, 1)
        return int(max(min(-(-n // step) * step, cap), n))
    return bucket_length(n, bucket, cap)


def score_index(loss_mask: np.ndarray, size: int) -> np.ndarray:
    """``[R, size]`` int32: each row's scored positions (``loss_mask != 0``) in ascending order,
    then its unscored positions in ascending order (they gather with mask 0, contributing
    nothing). ``size`` must hold the row with the most scored positions and be <= T."""
    m = np.asarray(loss_mask) != 0
    if m.ndim != 2:
        raise ValueError(f"loss_mask must be [R, T]; got shape {m.shape}")
    most = int(m.sum(1).max(initial=0))
    if not (isinstance(size, (int, np.integer)) and most <= size <= m.shape[1]):
        raise ValueError(f"score_index size={size!r} must be an int in [{most}, T = {m.shape[1]}] (the most scored "
                         "positions of a row, up to the row length)")
    return np.argsort(~m, axis=1, kind="stable")[:, :size].astype(np.int32)


def empty_batch(num_rows: int, length: int, num_seqs: int, pad_id: int = 0,
                num_scored: int = 1) -> dict[str, np.ndarray]:
    """An all-padding Contract-1 batch: fillers only (``score_index`` [R, num_scored]:
    unscored positions; builders rewrite it with :func:`score_index` once the rows are written)."""
    return {
        "input_ids": np.full((num_rows, length), pad_id, np.int32),
        "targets": np.zeros((num_rows, length), np.int32),
        "loss_mask": np.zeros((num_rows, length), np.float32),
        "positions": np.zeros((num_rows, length), np.int32),
        "segment_ids": np.zeros((num_rows, length), np.int32),
        "seq_ids": np.zeros((num_rows, length), np.int32),
        "example_index": np.full((num_seqs,), -1, np.int32),
        "seq_valid": np.zeros((num_seqs,), np.float32),
        "score_index": np.tile(np.arange(num_scored, dtype=np.int32), (num_rows, 1)),
    }


def write_sequence(batch: dict[str, np.ndarray], row: int, offset: int, tokens: np.ndarray, prompt_length: int,
                   segment_id: int, seq_id: int) -> None:
    """Place one sequence (prompt + response tokens) at ``batch[.][row, offset:offset+L]``.

    ``targets[t] = tokens[t+1]`` inside the sequence (0 at its last position);
    ``loss_mask[t] = 1`` iff ``tokens[t+1]`` is a response token, i.e.
    ``max(prompt_length - 1, 0) <= t <= L - 2``.
    """
    n = len(tokens)
    sl = slice(offset, offset + n)
    batch["input_ids"][row, sl] = tokens
    batch["targets"][row, offset:offset + n - 1] = tokens[1:]
    batch["targets"][row, offset + n - 1] = 0
    batch["loss_mask"][row, sl] = 0.0
    first = offset + max(prompt_length - 1, 0)
    batch["loss_mask"][row, first:offset + n - 1] = 1.0
    batch["positions"][row, sl] = np.arange(n, dtype=np.int32)
    batch["segment_ids"][row, sl] = segment_id
    batch["seq_ids"][row, sl] = seq_id


class BatchIterator:
    """Deterministic, resumable, process-sliced iterator of Contract-1 batches.

    Args:
      dataset: tokenized rows (:func:`spo_jax.data.tokenize_dataset`) or a
        :class:`TokenizedExamples`.
      batch_size: *global* examples per step (pairs for preference data); must be
        divisible by ``process_count``. Local sequences per batch:
        ``S = K * batch_size // process_count``.
      max_length: the tokenization ``max_length``: caps padded buckets, and is the
        default ``pack_length``. Sequences longer than this raise ``ValueError``.
      packing: padded (False) or packed (True) batches.
      length_bucket: padded ``T`` rounding: an int multiple, ``"pow2"`` or None.
      pack_rows_multiple: the automatic ``pack_rows`` is rounded up to a multiple of this (the
        number of this process's devices the batch is split over).
      pack_rows, pack_length: packed ``[R, T]`` per process; ``pack_rows`` defaults
        to ``ceil(1.1 * S * mean_seq_len / T)`` (at least ``K``).
      shuffle, seed: per-epoch permutation ``default_rng([seed, epoch])``.
      num_epochs: stop after this many epochs (None: never stop).
      drop_remainder: padded only: drop a final partial global batch per epoch
        instead of filling it with fillers.
      process_index, process_count: this process's slice (default: JAX's).
      pad_id: id written to empty ``input_ids`` slots.
    """

    def __init__(self, dataset, *, batch_size: int, max_length: int, packing: bool = False,
                 length_bucket: int | str | None = 64, pack_rows: int | None = None, pack_rows_multiple: int = 1,
                 pack_length: int | None = None, shuffle: bool = True, seed: int = 0,
                 num_epochs: int | None = None, drop_remainder: bool = False,
                 process_index: int | None = None, process_count: int | None = None, pad_id: int = 0):
        self.data = dataset if isinstance(dataset, TokenizedExamples) else TokenizedExamples(dataset)
        if process_index is None or process_count is None:
            import jax  # only for the defaults; the data layer is host-side NumPy
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} (global) must be a positive multiple of "
                             f"process_count={process_count}.")
        if packing and drop_remainder:
            raise ValueError("drop_remainder=True applies to padded batches only; packed batches carry "
                             "fillers (seq_valid=0) instead. Pass drop_remainder=False with packing=True.")
        n = len(self.data)
        if n == 0:
            raise ValueError("the dataset is empty.")
        self.K = self.data.seqs_per_example
        self.batch_size = int(batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_examples = self.batch_size // self.process_count
        self.num_seqs = self.K * self.local_examples  # S (local)
        self.max_length = int(max_length)
        longest = int(self.data.seq_lengths.max())
        if longest > self.max_length:
            raise ValueError(f"a sequence has {longest} tokens > max_length={max_length}; pass the max_length "
                             "used for tokenization.")
        self.packing, self.length_bucket = bool(packing), length_bucket
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.num_epochs, self.drop_remainder, self.pad_id = num_epochs, bool(drop_remainder), int(pad_id)
        bucket_length(1, length_bucket, self.max_length)  # validates length_bucket
        if self.packing:
            self.pack_length = int(pack_length or self.max_length)
            if longest > self.pack_length:
                raise ValueError(f"pack_length={self.pack_length} is shorter than the longest sequence "
                                 f"({longest} tokens); use pack_length >= max_length={self.max_length}.")
            if pack_rows is None:
                mean = float(self.data.seq_lengths.mean())
                pack_rows = max(self.K, math.ceil(1.1 * self.num_seqs * mean / self.pack_length))
                # rows split over the batch-sharded devices: round up to a multiple of them
                pack_rows = -(-pack_rows // pack_rows_multiple) * pack_rows_multiple
            self.pack_rows = int(pack_rows)
            if self.pack_rows < 1:
                raise ValueError(f"pack_rows={pack_rows} must be >= 1.")
            if self.pack_rows < self.K and int(self.data.seq_lengths.sum(1).max()) > self.pack_length:
                raise ValueError(f"pack_rows={self.pack_rows} row(s) of pack_length={self.pack_length} cannot hold "
                                 "the longest pair; use pack_rows >= 2.")
        self._epoch, self._cursor = 0, 0
        self._perm_epoch, self._perm = -1, None

    # ---------------------------------------------------------------- order & state

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.data)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the batches not yet returned start here."""
        return {"version": _STATE_VERSION, "epoch": int(self._epoch), "cursor": int(self._cursor),
                "seed": self.seed, "num_examples": len(self.data), "batch_size": self.batch_size,
                "packing": self.packing, "shuffle": self.shuffle}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`get_state`'s dict (validated against this iterator's data and settings)."""
        mine = self.get_state()
        for key in ("version", "seed", "num_examples", "batch_size", "packing", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"iterator state {key}={state[key]!r} does not match this iterator's "
                                 f"{key}={mine[key]!r}; restore into an iterator built with the same data and settings.")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor <= len(self.data):
            raise ValueError(f"iterator state epoch={epoch}, cursor={cursor} is out of range "
                             f"(num_examples={len(self.data)}).")
        self._epoch, self._cursor = epoch, cursor

    # ---------------------------------------------------------------- planning

    def _pack_plan(self, order: np.ndarray, cursor: int):
        """First-fit one process's packed batch from ``order[cursor:]``.

        Returns ``(placements, new_cursor)`` with placements a list of
        ``(example, [(row, offset) per sequence])``."""
        fill = [0] * self.pack_rows
        placements = []
        lengths = self.data.seq_lengths
        while cursor < len(order) and len(placements) < self.local_examples:
            e = int(order[cursor])
            trial, spots = list(fill), []
            for k in range(self.K):
                n = int(lengths[e, k])
                row = next((r for r in range(self.pack_rows) if trial[r] + n <= self.pack_length), None)
                if row is None:
                    break
                spots.append((row, trial[row]))
                trial[row] += n
            if len(spots) < self.K:
                break
            fill = trial
            placements.append((e, spots))
            cursor += 1
        return placements, cursor

    def _most_scored_per_row(self, placements) -> int:
        """The most ``loss_mask`` positions in one packed row of ``placements``."""
        per_row = [0] * self.pack_rows
        for e, spots in placements:
            for k, (row, _) in enumerate(spots):
                per_row[row] += int(self.data.scored_lengths[e, k])
        return max(per_row)

    def _next_plan(self):
        """The next step's local plan, advancing the state; None at the end of data."""
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                return None
            order = self._order(self._epoch)
            n = len(order)
            if self.packing:
                if self._cursor < n:
                    mine, cursor, most = None, self._cursor, 0
                    for p in range(self.process_count):
                        placements, new_cursor = self._pack_plan(order, cursor)
                        if new_cursor == cursor and cursor < n and p == 0:
                            raise RuntimeError("packing made no progress; pack_rows/pack_length too small.")
                        if p == self.process_index:
                            mine = placements
                        most = max(most, self._most_scored_per_row(placements))
                        cursor = new_cursor
                    self._cursor = cursor
                    return ("packed", (mine, bucket_scored(most, self.length_bucket, self.pack_length)))
            else:
                remaining = n - self._cursor
                if remaining > 0 and not (self.drop_remainder and remaining < self.batch_size):
                    chunk = order[self._cursor:self._cursor + self.batch_size]
                    self._cursor += len(chunk)
                    lo = self.process_index * self.local_examples
                    mine = chunk[lo:lo + self.local_examples]
                    global_len = int(self.data.seq_lengths[chunk].max())
                    length = bucket_length(global_len, self.length_bucket, self.max_length)
                    most = int(self.data.scored_lengths[chunk].max())
                    return ("padded", (mine, length, bucket_scored(most, self.length_bucket, length)))
            self._epoch, self._cursor = self._epoch + 1, 0

    # ---------------------------------------------------------------- materialising

    def _sequence(self, e: int, k: int) -> tuple[np.ndarray, int]:
        prompt = self.data.prompt(e)
        return np.concatenate([prompt, self.data.response(e, k)]), len(prompt)

    def _build_padded(self, examples: np.ndarray, length: int, num_scored: int) -> dict[str, np.ndarray]:
        b = empty_batch(self.num_seqs, length, self.num_seqs, self.pad_id)
        base = self.process_index * self.num_seqs
        for j, e in enumerate(examples):
            for k in range(self.K):
                s = j * self.K + k
                tokens, plen = self._sequence(int(e), k)
                write_sequence(b, s, 0, tokens, plen, segment_id=1, seq_id=base + s)
                b["example_index"][s] = self.data.example_index[e]
                b["seq_valid"][s] = 1.0
        b["score_index"] = score_index(b["loss_mask"], num_scored)
        return b

    def _build_packed(self, placements, num_scored: int) -> dict[str, np.ndarray]:
        b = empty_batch(self.pack_rows, self.pack_length, self.num_seqs, self.pad_id)
        base = self.process_index * self.num_seqs
        segments = [0] * self.pack_rows
        for j, (e, spots) in enumerate(placements):
            for k, (row, offset) in enumerate(spots):
                s = j * self.K + k
                segments[row] += 1
                tokens, plen = self._sequence(e, k)
                write_sequence(b, row, offset, tokens, plen, segment_id=segments[row], seq_id=base + s)
                b["example_index"][s] = self.data.example_index[e]
                b["seq_valid"][s] = 1.0
        b["score_index"] = score_index(b["loss_mask"], num_scored)
        return b

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._next_plan()
        if plan is None:
            raise StopIteration
        mode, payload = plan
        return self._build_packed(*payload) if mode == "packed" else self._build_padded(*payload)

    def num_batches(self, epoch: int = 0) -> int:
        """Steps in ``epoch`` (padded: closed form; packed: simulated on lengths only)."""
        n = len(self.data)
        if not self.packing:
            return n // self.batch_size if self.drop_remainder else -(-n // self.batch_size)
        order, cursor, steps = self._order(epoch), 0, 0
        while cursor < n:
            for _ in range(self.process_count):
                _, cursor = self._pack_plan(order, cursor)
            steps += 1
        return steps

    @property
    def epoch(self) -> int:
        return self._epoch
