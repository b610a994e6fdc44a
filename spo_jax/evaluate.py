"""Diagnostics for the preference-learning failure SPO targets (notebook-usable).

Everything here works on Contract-1 *padded* preference batches (one sequence per
row, sequence ``2i`` the chosen and ``2i+1`` the rejected response of pair ``i``;
``spo_jax.data.BatchIterator(..., packing=False)``) and on the functional model
boundary ``(graphdef, params)``.

* :func:`batch_logps` / :func:`pair_logps`: per-sequence summed log-probs
  ``s = log pi(y|x)`` and token counts, for a batch or a whole tokenized dataset.
* :func:`per_sequence_grads`: ``[S, N]`` flattened per-example gradients
  ``g_s = grad_theta s`` (``jax.vmap`` of ``jax.grad`` over rows; small models only,
  memory is ``S x N``).
* :func:`pair_gradient_stats`: per pair ``<g_w, g_l>``, ``|g_w|^2``, ``|g_l|^2``, the
  cosine, and the DPO first-order sign test ``|g_w|^2 - <g_w, g_l>`` (negative:
  one DPO step *lowers* the chosen log-prob; METHOD.md).
* :func:`first_order_change`: for a loss ``L(params, batch)`` and a step size ``eta``,
  the predicted change of every ``s`` after one SGD step ``theta - eta grad L``,
  ``eta <g_s, -grad L>``, next to the measured change (they agree to O(eta^2)).
* :func:`mass_split`: share of sampled answers equal to the chosen answer, to the
  rejected answer, or to something else (``gsm8k.answers_equal``), and
  :func:`sampled_mass_split` which samples them from a model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from spo_jax import objectives, sampling
from spo_jax.data import BatchIterator, TokenizedExamples, bucket_scored, gsm8k, score_index

__all__ = [
    "batch_logps",
    "first_order_change",
    "mass_split",
    "pair_gradient_stats",
    "pair_logps",
    "per_sequence_grads",
    "sampled_mass_split",
]

_ROW_KEYS = ("input_ids", "targets", "loss_mask", "positions", "segment_ids")


def _check_padded(batch: Mapping[str, np.ndarray], need_pairs: bool = True) -> None:
    missing = [k for k in _ROW_KEYS + ("seq_ids",) if k not in batch]
    if missing:
        raise ValueError(f"batch misses {missing}; pass a Contract-1 batch (spo_jax.data.BatchIterator).")
    R = np.shape(batch["input_ids"])[0]
    seq_ids = np.asarray(batch["seq_ids"])
    S = len(batch["seq_valid"]) if "seq_valid" in batch else R
    if R != S or np.any((seq_ids != np.arange(R)[:, None]) & (np.asarray(batch["segment_ids"]) > 0)):
        raise ValueError("per-example diagnostics need a padded batch (one sequence per row: R == S, row r holds "
                         "sequence r); build it with BatchIterator(..., packing=False).")
    if need_pairs and R % 2:
        raise ValueError(f"a preference batch has an even number of sequences (chosen, rejected interleaved), got {R}.")


def _row_logp_fn(graphdef) -> Callable:
    """``f(params, ids[T], targets[T], mask[T], positions[T], segments[T], score_index[N]) -> s``
    (fp32 scalar): ``objectives.make_logps_fn`` on a one-row batch (vmapped over rows by the callers)."""
    logps_fn = objectives.make_logps_fn(graphdef)

    def f(params, ids, tgt, mask, pos, seg, idx):
        row = {"input_ids": ids[None], "targets": tgt[None], "loss_mask": mask[None], "positions": pos[None],
               "segment_ids": seg[None], "seq_ids": jnp.zeros_like(ids)[None],
               "seq_valid": jnp.ones((1,), jnp.float32), "score_index": idx[None]}
        sums, _ = logps_fn(params, row)
        return sums[0].astype(jnp.float32)

    return f


def _rows(batch):
    """The row arrays and ``score_index`` (derived from ``loss_mask`` at the exact most scored
    count when the batch has none, e.g. a hand-built one)."""
    mask = np.asarray(batch["loss_mask"])
    idx = batch["score_index"] if "score_index" in batch else score_index(
        mask, bucket_scored(int((mask != 0).sum(1).max(initial=0)), None, mask.shape[1]))
    return tuple(jnp.asarray(batch[k]) for k in _ROW_KEYS) + (jnp.asarray(idx),)


def batch_logps(graphdef, params, batch) -> tuple[np.ndarray, np.ndarray]:
    """``(sums [S], counts [S])``: summed response log-probs and response token counts of a padded batch.

    ``batch``: Contract 1, a dict of arrays (``help(spo_jax.data.batching)``): ``input_ids``, ``targets``,
    ``loss_mask``, ``positions``, ``segment_ids``, ``seq_ids`` [R, T]; ``example_index``, ``seq_valid`` [S];
    ``score_index`` [R, N]; preference data interleaves sequence 2i (pair i's chosen) and 2i+1 (its
    rejected); optional ``ref_logps`` [S] (reference sums) and ``sft`` (a nested SFT batch).
    """
    _check_padded(batch, need_pairs=False)
    fn = _jitted(graphdef, "logps")
    sums = np.asarray(fn(params, *_rows(batch)))
    return sums, np.asarray(batch["loss_mask"]).sum(axis=1).astype(np.float32)


_CACHE: dict = {}


def _jitted(graphdef, what: str):
    key = (graphdef, what)  # GraphDefs are hashable and equal for equal structures: one compile per shape
    if key not in _CACHE:
        f = _row_logp_fn(graphdef)
        if what == "logps":
            fn = jax.jit(jax.vmap(f, in_axes=(None, 0, 0, 0, 0, 0, 0)))
        else:
            def g(params, *rows):
                grads = jax.vmap(jax.grad(f), in_axes=(None, 0, 0, 0, 0, 0, 0))(params, *rows)
                return jax.vmap(lambda t: ravel_pytree(t)[0])(grads)
            fn = jax.jit(g)
        _CACHE[key] = (graphdef, fn)
    return _CACHE[key][1]


def per_sequence_grads(graphdef, params, batch) -> jax.Array:
    """``[S, N]``: row ``s`` is ``grad_theta log pi(y_s | x_s)`` flattened (``ravel_pytree`` order)."""
    _check_padded(batch, need_pairs=False)
    return _jitted(graphdef, "grads")(params, *_rows(batch))


def pair_gradient_stats(graphdef, params, batch) -> dict[str, np.ndarray]:
    """Per pair (``[P]`` arrays): ``gw_gl = <g_w, g_l>``, ``gw_sq = |g_w|^2``, ``gl_sq = |g_l|^2``,
    ``cos``, ``dpo_chosen_direction = |g_w|^2 - <g_w, g_l>`` (the sign of the first-order DPO
    change of ``s_w``), ``chosen_logps``, ``rejected_logps``. Filler pairs are dropped."""
    _check_padded(batch)
    g = per_sequence_grads(graphdef, params, batch)
    gw, gl = g[0::2], g[1::2]
    gw_gl = np.asarray(jnp.sum(gw * gl, axis=1))
    gw_sq = np.asarray(jnp.sum(gw * gw, axis=1))
    gl_sq = np.asarray(jnp.sum(gl * gl, axis=1))
    sums, _ = batch_logps(graphdef, params, batch)
    valid = np.asarray(batch.get("seq_valid", np.ones(len(sums))))[0::2] > 0
    out = {"gw_gl": gw_gl, "gw_sq": gw_sq, "gl_sq": gl_sq,
           "cos": gw_gl / np.sqrt(np.maximum(gw_sq * gl_sq, 1e-30)),
           "dpo_chosen_direction": gw_sq - gw_gl,
           "chosen_logps": sums[0::2], "rejected_logps": sums[1::2]}
    return {k: v[valid] for k, v in out.items()}


def first_order_change(graphdef, params, batch, loss_fn: Callable, eta: float) -> dict[str, np.ndarray]:
    """One SGD step ``theta' = theta - eta * grad L(theta)`` on ``loss_fn(params, batch) -> scalar``.

    Returns ``{"predicted": [S], "measured": [S], "grad_norm": float}`` with
    ``predicted_s = eta * <g_s, -grad L>`` and ``measured_s = s(theta') - s(theta)``; for a
    preference batch ``[0::2]`` are the chosen and ``[1::2]`` the rejected sequences.
    """
    _check_padded(batch, need_pairs=False)
    if not np.isfinite(eta) or eta <= 0:
        raise ValueError(f"eta={eta!r} must be a positive finite step size.")
    grad_l = jax.grad(lambda p: loss_fn(p, batch))(params)
    flat_l, _ = ravel_pytree(grad_l)
    g = per_sequence_grads(graphdef, params, batch)
    predicted = -eta * np.asarray(g @ flat_l)
    new = jax.tree.map(lambda p, d: p - eta * d, params, grad_l)
    before, _ = batch_logps(graphdef, params, batch)
    after, _ = batch_logps(graphdef, new, batch)
    return {"predicted": predicted, "measured": after - before, "grad_norm": float(jnp.linalg.norm(flat_l))}


def pair_logps(graphdef, params, dataset, *, batch_size: int = 64, max_length: int, pad_id: int = 0,
               length_bucket: int = 16) -> dict[str, np.ndarray]:
    """Summed log-probs and token counts of every pair of a tokenized preference dataset
    (``spo_jax.data.prepare_dataset``), in dataset order: ``{"example_index", "chosen",
    "rejected", "chosen_len", "rejected_len"}`` (``[P]`` arrays).

    The pairs are batched in order of length (longest sequence of the pair), so that a batch
    pads to its own length bucket rather than to the longest pair of the dataset's order; the
    results are put back in dataset order."""
    order = np.argsort(TokenizedExamples(dataset).seq_lengths.max(axis=1), kind="stable")
    it = BatchIterator(dataset.select(order), batch_size=batch_size, max_length=max_length, packing=False,
                       length_bucket=length_bucket, shuffle=False, num_epochs=1, pad_id=pad_id,
                       process_index=0, process_count=1)
    out = {k: [] for k in ("example_index", "chosen", "rejected", "chosen_len", "rejected_len")}
    for batch in it:
        sums, counts = batch_logps(graphdef, params, batch)
        valid = np.asarray(batch["seq_valid"])[0::2] > 0
        out["example_index"].append(np.asarray(batch["example_index"])[0::2][valid])
        out["chosen"].append(sums[0::2][valid])
        out["rejected"].append(sums[1::2][valid])
        out["chosen_len"].append(counts[0::2][valid])
        out["rejected_len"].append(counts[1::2][valid])
    back = np.argsort(order, kind="stable")  # sorted position of each dataset row
    return {k: np.concatenate(v)[back] for k, v in out.items()}


def mass_split(sampled_answers: Sequence[Sequence[str | None]], chosen_answers: Sequence[str | None],
               rejected_answers: Sequence[str | None]) -> dict[str, float]:
    """Shares of samples whose final answer equals the pair's chosen answer, its rejected
    answer, or neither (``"other"``, including no answer). ``sampled_answers[i]`` are the
    extracted answers (``gsm8k.extract_answer``) sampled for pair ``i``'s prompt.
    Returns ``{"chosen", "rejected", "other", "num_samples"}``; the three shares sum to 1."""
    if not (len(sampled_answers) == len(chosen_answers) == len(rejected_answers)):
        raise ValueError(f"mass_split: {len(sampled_answers)} sample lists, {len(chosen_answers)} chosen and "
                         f"{len(rejected_answers)} rejected answers; pass one of each per pair.")
    counts = {"chosen": 0, "rejected": 0, "other": 0}
    for answers, c, r in zip(sampled_answers, chosen_answers, rejected_answers):
        if isinstance(answers, str) or answers is None:
            raise ValueError("mass_split: sampled_answers[i] must be a list of answers (one per sample).")
        for a in answers:
            if gsm8k.answers_equal(a, c):
                counts["chosen"] += 1
            elif gsm8k.answers_equal(a, r):
                counts["rejected"] += 1
            else:
                counts["other"] += 1
    n = sum(counts.values())
    if n == 0:
        raise ValueError("mass_split: no samples.")
    return {**{k: v / n for k, v in counts.items()}, "num_samples": n}


def sampled_mass_split(model, tokenizer, pairs: Sequence[Mapping], *, num_samples: int, max_new_tokens: int,
                       key, temperature: float = 1.0, batch_size: int = 64, prompt_width: int | None = None,
                       stop_ids: Sequence[int] = ()) -> dict[str, float]:
    """:func:`mass_split` of ``num_samples`` responses sampled from ``model`` for the prompts of
    preference rows (``{"prompt", "chosen_answer", "rejected_answer"}``, as built by
    ``spo_jax.sampling.sample_pairs``)."""
    ids = sampling.encode_prompts(tokenizer, [p["prompt"] for p in pairs])
    texts = sampling.generate_texts(model, tokenizer, ids, max_new_tokens=max_new_tokens, key=key,
                                    temperature=temperature, num_samples=num_samples, batch_size=batch_size,
                                    prompt_width=prompt_width, stop_ids=stop_ids)
    answers = [[gsm8k.extract_answer(t) for t in ts] for ts in texts]
    return mass_split(answers, [p["chosen_answer"] for p in pairs], [p["rejected_answer"] for p in pairs])
