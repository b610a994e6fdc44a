"""Tokenize canonical text rows into prompt / response token ids, with truncation.

Input: the canonical text columns of :func:`spo_jax.data.loading.standardize`.
Output (``datasets.Dataset``, one row per kept example):

* preference: ``example_index`` (int), ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
* sft:        ``example_index`` (int), ``prompt_ids``, ``completion_ids``

Conventions (TRL's DPO ``tokenize_row``, with the differences stated):

* Prompt and responses are tokenized *separately* with
  ``add_special_tokens=False``, as TRL does, so the prompt/response boundary is
  exact. For tokenizers whose pre-tokenizer splits at whitespace (byte-level BPE,
  SentencePiece/Metaspace, WordPiece) and responses that begin with the separating
  whitespace (which :func:`~spo_jax.data.loading.extract_prompt` and chat templates
  arrange), ``prompt_ids + response_ids`` equals tokenizing the concatenation; a
  BPE merge across the boundary (e.g. a prompt ending in a space) can differ.
* BOS: prepended to the prompt when the tokenizer adds one by default
  (``tokenizer("a")`` starts with ``bos_token_id``) and the prompt ids do not
  already start with it (chat templates often write it) — never duplicated.
* EOS: appended to every response unless it already ends with ``eos_token_id``
  (a chat template's end-of-turn token that is also EOS).
* Truncation to ``max_length`` tokens per sequence (prompt + response): first the
  prompt from the left, keeping its BOS, down to ``min_prompt_length`` tokens (at
  least one token, so the first response token has a position that predicts it);
  then each response from the right (a truncated response loses its EOS, as in TRL).
  Both responses of a pair share the same truncated prompt.
* Dropped rows, for these reasons only (each counted in the returned stats and
  logged with the first five dataset row numbers; ``strict=True`` raises instead,
  naming the row): an empty (or whitespace-only) response (``empty_response``),
  chosen == rejected (``identical_responses``), a prompt of ``>= max_length``
  tokens that leaves no room for a response token (``prompt_too_long``). A row
  whose required key is missing or null is an error, not a drop
  (:func:`~spo_jax.data.loading.standardize` names the file, line and key).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import datasets
import numpy as np

from spo_jax.data import loading

__all__ = ["DROP_REASONS", "special_token_policy", "truncate", "tokenize_dataset", "prepare_dataset"]

logger = logging.getLogger(__name__)

DROP_REASONS = ("empty_response", "identical_responses", "prompt_too_long")


def special_token_policy(tokenizer) -> tuple[int | None, int | None]:
    """``(bos_id, eos_id)``: ``bos_id`` only if the tokenizer adds BOS by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if bos is not None:
        probe = tokenizer("a")["input_ids"]
        if not probe or probe[0] != bos:
            bos = None
    if eos is None:
        raise loading.DataError("the tokenizer has no eos_token; set tokenizer.eos_token (responses end with EOS).")
    return bos, eos


def _content_is_empty(text: str, eos_token: str | None) -> bool:
    text = text.strip()
    if eos_token and text.endswith(eos_token):
        text = text[: -len(eos_token)].strip()
    return not text


def truncate(prompt: list[int], responses: list[list[int]], *, max_length: int, min_prompt_length: int,
             bos_id: int | None) -> tuple[list[int], list[list[int]], bool, bool]:
    """Fit ``prompt + r`` into ``max_length`` for every response ``r``.

    Returns ``(prompt, responses, prompt_truncated, response_truncated)``. The
    prompt loses tokens from the left (after its BOS) down to
    ``min(len(prompt), max(min_prompt_length, 1))`` tokens; then responses lose
    tokens from the right. Assumes ``len(prompt) < max_length``.
    """
    longest = max(len(r) for r in responses)
    prompt_truncated = response_truncated = False
    if len(prompt) + longest > max_length:
        floor = min(len(prompt), max(min_prompt_length, 1))
        keep = max(max_length - longest, floor)
        if keep < len(prompt):
            head = [bos_id] if (bos_id is not None and prompt[:1] == [bos_id]) else []
            keep_tail = max(keep - len(head), 0)
            prompt = head + (prompt[len(prompt) - keep_tail:] if keep_tail else [])
            prompt_truncated = True
        room = max_length - len(prompt)
        if longest > room:
            responses = [r[:room] for r in responses]
            response_truncated = True
    return prompt, responses, prompt_truncated, response_truncated


def _tokenize_batch(batch: dict[str, list], *, tokenizer, response_columns: tuple[str, ...], max_length: int,
                    min_prompt_length: int, bos_id: int | None, eos_id: int) -> dict[str, list]:
    prompts = ["" if p is None else p for p in batch["prompt"]]
    responses = {c: ["" if x is None else x for x in batch[c]] for c in response_columns}
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = {c: tokenizer(responses[c], add_special_tokens=False)["input_ids"] for c in response_columns}
    eos_token = getattr(tokenizer, "eos_token", None)
    out: dict[str, list] = {"prompt_ids": [], "_drop": [], "_prompt_truncated": [], "_response_truncated": []}
    for c in response_columns:
        out[f"{c}_ids"] = []
    for i in range(len(prompts)):
        prompt = list(p_ids[i])
        if bos_id is not None and prompt[:1] != [bos_id]:
            prompt = [bos_id] + prompt
        resp = []
        for c in response_columns:
            r = list(r_ids[c][i])
            if not r or r[-1] != eos_id:
                r.append(eos_id)
            resp.append(r)
        drop = ""
        if any(_content_is_empty(responses[c][i], eos_token) for c in response_columns):
            drop = "empty_response"
        elif len(response_columns) == 2 and responses[response_columns[0]][i] == responses[response_columns[1]][i]:
            drop = "identical_responses"
        elif len(prompt) >= max_length:
            drop = "prompt_too_long"
        pt = rt = False
        if not drop:
            prompt, resp, pt, rt = truncate(prompt, resp, max_length=max_length,
                                            min_prompt_length=min_prompt_length, bos_id=bos_id)
        out["prompt_ids"].append(prompt)
        for c, r in zip(response_columns, resp):
            out[f"{c}_ids"].append(r)
        out["_drop"].append(drop)
        out["_prompt_truncated"].append(pt)
        out["_response_truncated"].append(rt)
    return out


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer,
    *,
    max_length: int,
    min_prompt_length: int = 64,
    strict: bool = False,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
    batch_size: int = 256,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenize canonical text rows (see the module docstring for the rules).

    Args:
      ds: output of :func:`~spo_jax.data.loading.standardize` (columns
        ``example_index, prompt, chosen, rejected`` or ``example_index, prompt, completion``).
      tokenizer: a ``transformers`` tokenizer (fast tokenizers recommended).
      max_length: the longest sequence (prompt + one response) in tokens.
      min_prompt_length: prompt truncation stops at this many tokens.
      strict: raise ``ValueError`` on the first bad row instead of dropping it.
      num_proc: ``datasets.map`` worker processes (its cache is reused across runs).

    Returns:
      ``(dataset, stats)``; ``stats`` is a dict of ints: ``rows_in``, ``rows_out``,
      ``dropped_empty_response``, ``dropped_identical_responses``,
      ``dropped_prompt_too_long``, ``truncated_prompt``, ``truncated_response``
      (truncation counts are over kept rows), ``max_length``.
    """
    if not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise loading.DataError(f"max_length={max_length!r} must be an int >= 2 (prompt token + response token).")
    if min_prompt_length < 0:
        raise loading.DataError(f"min_prompt_length={min_prompt_length!r} must be >= 0.")
    if "prompt" not in ds.column_names or "example_index" not in ds.column_names:
        raise loading.DataError(f"tokenize_dataset needs the canonical columns of loading.standardize "
                         f"(example_index, prompt, ...); got {ds.column_names}.")
    if {"chosen", "rejected"} <= set(ds.column_names):
        response_columns = ("chosen", "rejected")
    elif "completion" in ds.column_names:
        response_columns = ("completion",)
    else:
        raise loading.DataError(f"tokenize_dataset needs response columns chosen/rejected or completion; "
                         f"got {ds.column_names}.")
    bos_id, eos_id = special_token_policy(tokenizer)
    if os.environ.get("TOKENIZERS_PARALLELISM") is None and (num_proc or 0) > 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked workers + Rust threads deadlock otherwise
    tok = ds.map(
        _tokenize_batch,
        batched=True,
        batch_size=batch_size,
        fn_kwargs=dict(tokenizer=tokenizer, response_columns=response_columns, max_length=int(max_length),
                       min_prompt_length=int(min_prompt_length), bos_id=bos_id, eos_id=eos_id),
        num_proc=num_proc if (num_proc or 0) > 1 and ds.num_rows > 1 else None,
        load_from_cache_file=load_from_cache_file,
        desc="tokenizing",
    )
    columns_np = tok.select_columns(["_drop", "_prompt_truncated", "_response_truncated"]).with_format("numpy")[:]
    drop = np.asarray(columns_np["_drop"]).astype(str)
    kept = np.flatnonzero(drop == "")
    if strict and len(kept) < len(drop):
        first = int(np.flatnonzero(drop != "")[0])
        row = ds[first]
        preview = {k: (v[:120] + "...") if isinstance(v, str) and len(v) > 120 else v for k, v in row.items()}
        raise loading.DataError(
            f"strict=True: row {row['example_index']} (dataset row number) is bad: {drop[first]} "
            f"(max_length={max_length}); row: {preview}. Fix the data, raise max_length, or pass strict=False "
            f"to drop such rows ({int((drop != '').sum())} of {len(drop)} rows are bad).")
    pt = np.asarray(columns_np["_prompt_truncated"], dtype=bool)
    rt = np.asarray(columns_np["_response_truncated"], dtype=bool)
    stats = {
        "rows_in": int(len(drop)),
        "rows_out": int(len(kept)),
        **{f"dropped_{r}": int((drop == r).sum()) for r in DROP_REASONS},
        "truncated_prompt": int(pt[kept].sum()),
        "truncated_response": int(rt[kept].sum()),
        "max_length": int(max_length),
    }
    for reason in DROP_REASONS:
        rows = np.flatnonzero(drop == reason)
        if len(rows):
            first = tok.select(rows[:5])["example_index"]
            logger.warning("dropped %d row(s): %s (dataset rows %s%s)", len(rows), reason,
                           ", ".join(map(str, first)), ", ..." if len(rows) > 5 else "")
    if len(kept) < len(drop):
        tok = tok.select(kept)
    tok = tok.remove_columns(["prompt", *response_columns, "_drop", "_prompt_truncated", "_response_truncated"])
    logger.info("tokenized %d rows -> kept %d; dropped: empty_response=%d identical_responses=%d "
                "prompt_too_long=%d; truncated: prompt=%d response=%d (max_length=%d)",
                stats["rows_in"], stats["rows_out"], stats["dropped_empty_response"],
                stats["dropped_identical_responses"], stats["dropped_prompt_too_long"],
                stats["truncated_prompt"], stats["truncated_response"], max_length)
    if stats["rows_out"] == 0:
        raise loading.DataError(f"no row survived tokenization ({stats}); check max_length={max_length} and the data.")
    return tok, stats


def prepare_dataset(
    source,
    tokenizer,
    *,
    max_length: int,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    name: str | None = None,
    data_dir: str | None = None,
    data_files: Any = None,
    cache_dir: str | None = None,
    min_prompt_length: int = 64,
    prompt_template: str = loading.DEFAULT_PROMPT_TEMPLATE,
    completion_template: str = loading.DEFAULT_COMPLETION_TEMPLATE,
    use_chat_template: bool = False,
    marker: str | None = loading.HH_ASSISTANT_MARKER,
    strict: bool = False,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Load + standardize + tokenize: the one call the trainer needs.

    ``source`` is a path, a ``save_to_disk`` directory, a Hub id or an already
    loaded ``datasets.Dataset``. Returns ``(tokenized dataset, stats)`` where
    ``stats`` is :func:`tokenize_dataset`'s dict plus ``format`` (the resolved
    format name) and ``kind`` (``"preference"`` or ``"sft"``).
    """
    if isinstance(source, datasets.Dataset):
        raw = source
    else:
        raw = loading.load_rows(source, split=split, name=name, data_dir=data_dir, data_files=data_files,
                                cache_dir=cache_dir)
    text, fmt = loading.standardize(raw, format=format, columns=columns, tokenizer=tokenizer,
                                    prompt_template=prompt_template, completion_template=completion_template,
                                    use_chat_template=use_chat_template, marker=marker, num_proc=num_proc,
                                    load_from_cache_file=load_from_cache_file,
                                    source=None if isinstance(source, datasets.Dataset) else os.fspath(source))
    tok, stats = tokenize_dataset(text, tokenizer, max_length=max_length, min_prompt_length=min_prompt_length,
                                  strict=strict, num_proc=num_proc, load_from_cache_file=load_from_cache_file)
    stats = {"format": fmt, "kind": loading.kind_of(fmt), **stats}
    return tok, stats
