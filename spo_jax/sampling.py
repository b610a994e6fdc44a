"""On-policy sampling: prompts -> sampled / greedy responses -> scores -> preference pairs.

Used by the demo (synthetic task, a from-scratch Llama) and by the GSM8K pipeline
(SmolLM2 & co. with a chat template). One way through:

1. :func:`render_prompts` turns question rows into prompt *text* exactly as the
   trainer's data layer does for ``question_answer`` rows
   (``"Question: {question}\\nAnswer:"``, or the tokenizer's chat template with the
   stripped template as the user turn when ``use_chat_template=True``).
2. :func:`encode_prompts` tokenizes them like ``spo_jax.data.tokenize`` (no special
   tokens, BOS prepended only when the tokenizer adds one by default and the text
   does not already start with it -- chat templates write their own).
3. :func:`generate_texts` runs ``models.generate`` on *bucketed shapes*, so a whole
   sampling job compiles a handful of programs: every batch has ``batch_size`` rows
   (the last one filled with copies of a real prompt whose outputs are dropped; when
   greedy, it runs in the next power of two instead); each batch's prompts are
   left-padded to the width bucket of its longest prompt (``models.prompt_bucket``)
   unless a fixed ``prompt_width`` is given (``models.generate`` prefills only the real
   tokens: the prefix all prompts share, e.g. a chat template's system turn, once, then each
   distinct prompt's rest once, packed); the cache and the budget are bucketed
   inside ``models.generate``. Each prompt is repeated ``num_samples`` times; the PRNG
   key of batch ``b`` is ``fold_in(key, b)`` (``models.generate`` says how its steps
   use it; a row's draw depends on its batch, so sampled batches keep ``batch_size``
   rows). Responses are cut at the first EOS (extra stop ids, e.g. ChatML's
   ``<|im_end|>``, can be given) and decoded with ``skip_special_tokens=True``.
4. :func:`sample_pairs` scores the samples with a correctness function and builds
   ``chosen = correct`` / ``rejected = incorrect`` rows with
   :func:`spo_jax.data.gsm8k.build_preference_pairs`; :func:`greedy_accuracy` is the
   held-out metric.

The pair rows hold the *rendered* prompt text (``prompt``) and the decoded responses
(``chosen``/``rejected``), i.e. the ``preference`` format of ``spo_jax.data.loading``.
Train on them with ``data.use_chat_template=False`` (the prompt is already rendered;
the data layer adds the EOS to each response).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from spo_jax import models
from spo_jax.data import gsm8k
from spo_jax.data.loading import DEFAULT_PROMPT_TEMPLATE
from spo_jax.data.tokenize import special_token_policy

__all__ = [
    "encode_prompts",
    "generate_texts",
    "greedy_accuracy",
    "render_prompts",
    "sample_pairs",
    "sample_responses",
    "score_samples",
]


def _as_model(model):
    """A model object (``nnx.Module``) or a ``(graphdef, params)`` pair."""
    if isinstance(model, tuple) and len(model) == 2:
        return nnx.merge(*model)
    return model


def render_prompts(tokenizer, rows: Sequence[Mapping[str, str]], *, use_chat_template: bool = False,
                   prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> list[str]:
    """Prompt texts of ``{"question": ...}`` rows, rendered as the trainer renders
    ``question_answer`` rows (``spo_jax.data.loading``): ``prompt_template.format(**row)``,
    or with ``use_chat_template`` the tokenizer's chat template applied to one user turn
    holding the stripped template (``add_generation_prompt=True``)."""
    if isinstance(rows, Mapping):
        raise ValueError("render_prompts expects a list of rows ({'question': ...}), got a single mapping; "
                         "wrap it in a list.")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or "question" not in row:
            raise ValueError(f"rows[{i}] must be a mapping with a 'question' field, got {row!r:.120}.")
        text = prompt_template.format(**{k: v for k, v in row.items() if isinstance(v, str)})
        if use_chat_template:
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError("use_chat_template=True but the tokenizer has no chat_template; set one or pass "
                                 "use_chat_template=False.")
            text = tokenizer.apply_chat_template([{"role": "user", "content": text.strip()}], tokenize=False,
                                                 add_generation_prompt=True)
        out.append(text)
    return out


def encode_prompts(tokenizer, prompts: Sequence[str], *, max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of prompt texts, as ``spo_jax.data.tokenize`` makes them: no special
    tokens, BOS prepended when the tokenizer adds one by default and the ids do not
    already start with it; longer prompts keep BOS and their last tokens."""
    if isinstance(prompts, str):
        raise ValueError("encode_prompts expects a list of prompt strings, got a single string; wrap it in a list.")
    bos, _ = special_token_policy(tokenizer)
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    out = []
    for p in ids:
        p = list(p)
        if bos is not None and p[:1] != [bos]:
            p = [bos] + p
        if max_prompt_length is not None and len(p) > max_prompt_length:
            head = [bos] if (bos is not None and p[:1] == [bos]) else []
            p = head + p[len(p) - (max_prompt_length - len(head)):]
        if not p:
            raise ValueError("an empty prompt has no position to predict the first response token from; "
                             "give every prompt at least one token.")
        out.append(p)
    return out


def _stop_ids(model, tokenizer, eos_id, stop_ids) -> tuple[int, ...]:
    """Every id that ends a response: ``eos_id`` (an int or ints; default the tokenizer's EOS),
    the model config's EOS ids (Llama 3.x lists several) and ``stop_ids``."""
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    stops = set()
    if eos_id is not None:
        stops.update(int(e) for e in np.asarray(eos_id).reshape(-1))
    cfg = getattr(model, "config", None)
    stops.update(int(e) for e in getattr(cfg, "eos_token_ids", ()) or ())
    stops.update(int(s) for s in (stop_ids or ()))
    return tuple(sorted(stops))


def generate_texts(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                   key=None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   num_samples: int = 1, batch_size: int = 64, prompt_width: int | None = None,
                   eos_id: int | None = None, stop_ids: Sequence[int] = (), pad_id: int | None = None,
                   return_ids: bool = False):
    """Generate ``num_samples`` responses per prompt; returns ``texts[prompt][sample]``
    (and the token-id lists cut after the stop token when ``return_ids``).

    Args:
      model: an ``nnx`` decoder or a ``(graphdef, params)`` pair.
      prompt_ids: token ids per prompt (:func:`encode_prompts`).
      max_new_tokens: generation budget per response.
      key: a PRNG key (needed when ``temperature > 0``); batch ``b`` uses ``fold_in(key, b)``.
      temperature, top_k, top_p: ``models.generate``'s sampling settings (0 = greedy).
      num_samples: responses per prompt (the prompt is repeated; rows of one prompt are adjacent).
      batch_size: rows per ``generate`` call (greedy: the last call runs in the next power of two).
      prompt_width: one left-padded prompt width for every batch (default: per batch, the length
        bucket of its longest prompt, ``models.prompt_bucket``).
      eos_id: the end token(s) (default ``tokenizer.eos_token_id``); the model config's EOS
        ids and ``stop_ids`` (e.g. ``<|im_end|>`` when it is not the EOS) also end a response.
        Generation stops at the first of any of them (kept in the ids, dropped from the text).
      pad_id: default ``tokenizer.pad_token_id`` (or the EOS, or 0).
    """
    model = _as_model(model)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive int.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int.")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs key=jax.random.PRNGKey(...).")
    if len(prompt_ids) == 0:
        return ([], []) if return_ids else []
    stops = _stop_ids(model, tokenizer, eos_id, stop_ids)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        pad_id = (stops[0] if stops else 0) if pad_id is None else int(pad_id)
    longest = max(len(p) for p in prompt_ids)
    if prompt_width is not None and longest > int(prompt_width):
        raise ValueError(f"prompt_width={prompt_width} is shorter than the longest prompt ({longest} tokens); "
                         "raise prompt_width or truncate the prompts (encode_prompts(max_prompt_length=...)).")
    rows = [p for p in prompt_ids for _ in range(num_samples)]
    key = jax.random.PRNGKey(0) if key is None else key
    out_ids: list[list[int]] = []
    for b, start in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[start:start + batch_size]
        real = len(chunk)
        B = models.batch_bucket(real, batch_size) if temperature == 0 else batch_size
        chunk = chunk + [chunk[0]] * (B - real)
        width = int(prompt_width) if prompt_width is not None else models.prompt_bucket(max(map(len, chunk)))
        ids = np.full((B, width), pad_id, np.int32)
        mask = np.zeros((B, width), np.int32)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        toks, valid = models.generate(model, ids, mask, max_new_tokens=max_new_tokens, key=jax.random.fold_in(key, b),
                                      temperature=float(temperature), top_k=int(top_k or 0),
                                      top_p=float(top_p if top_p is not None else 1.0), eos_id=stops, pad_id=pad_id)
        toks, valid = np.asarray(toks), np.asarray(valid)
        for i in range(real):
            seq = [int(t) for t, v in zip(toks[i], valid[i]) if v > 0]
            for j, t in enumerate(seq):
                if t in stops:
                    seq = seq[:j + 1]
                    break
            out_ids.append(seq)
    texts = [tokenizer.decode([t for t in s if t not in stops], skip_special_tokens=True) for s in out_ids]
    grouped = [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompt_ids))]
    if return_ids:
        return grouped, [out_ids[i * num_samples:(i + 1) * num_samples] for i in range(len(prompt_ids))]
    return grouped


def tokenized_accuracy(model, tokenizer, rows, *, max_new_tokens: int, key: jax.Array, temperature: float = 0.0,
                       batch_size: int = 32, pad_id: int | None = None) -> tuple[float, list[tuple[str, str]]]:
    """GSM8K-style accuracy (``gsm8k.accuracy``) of answers generated for tokenized rows (a
    ``datasets.Dataset`` from ``prepare_dataset``: ``prompt_ids`` and the reference response
    ``chosen_ids`` or ``completion_ids``, which ends in ``#### N``). Greedy at temperature 0.
    Returns the accuracy and the (reference, generated) text pairs."""
    ref_col = "chosen_ids" if "chosen_ids" in rows.column_names else "completion_ids"
    refs = [tokenizer.decode(r, skip_special_tokens=True) for r in rows[ref_col]]
    samples = generate_texts(model, tokenizer, [list(p) for p in rows["prompt_ids"]], max_new_tokens=max_new_tokens,
                             key=key, temperature=temperature, batch_size=batch_size, pad_id=pad_id)
    texts = [s[0] for s in samples]
    return gsm8k.accuracy(texts, refs), list(zip(refs, texts))


def sample_responses(model, tokenizer, rows: Sequence[Mapping[str, str]], *, num_samples: int,
                     max_new_tokens: int, key=None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     batch_size: int = 64, use_chat_template: bool = False,
                     prompt_template: str = DEFAULT_PROMPT_TEMPLATE, max_prompt_length: int | None = None,
                     prompt_width: int | None = None, stop_ids: Sequence[int] = ()) -> tuple[list[str], list[list[str]]]:
    """``(prompt_texts, samples[q][k])`` for question rows: render, encode, generate."""
    prompts = render_prompts(tokenizer, rows, use_chat_template=use_chat_template, prompt_template=prompt_template)
    ids = encode_prompts(tokenizer, prompts, max_prompt_length=max_prompt_length)
    samples = generate_texts(model, tokenizer, ids, max_new_tokens=max_new_tokens, key=key, temperature=temperature,
                             top_k=top_k, top_p=top_p, num_samples=num_samples, batch_size=batch_size,
                             prompt_width=prompt_width, stop_ids=stop_ids)
    return prompts, samples


def _default_score(row: Mapping[str, str], text: str) -> bool:
    return gsm8k.is_correct(text, row["answer"])


def score_samples(rows: Sequence[Mapping[str, str]], samples: Sequence[Sequence[str]],
                  score_fn: Callable | None = None) -> np.ndarray:
    """``correct[q, k]`` (bool) of ``samples[q][k]`` against ``rows[q]``. ``score_fn(row, text)``
    returns a bool or a dict with a ``"correct"`` field (``synthetic.score``); the default is
    ``gsm8k.is_correct(text, row["answer"])``."""
    if len(rows) != len(samples):
        raise ValueError(f"score_samples: len(rows)={len(rows)} != len(samples)={len(samples)}.")
    score_fn = score_fn or _default_score
    out = []
    for row, texts in zip(rows, samples):
        res = [score_fn(row, t) for t in texts]
        out.append([bool(r["correct"]) if isinstance(r, Mapping) else bool(r) for r in res])
    return np.asarray(out, bool)


def greedy_accuracy(model, tokenizer, rows: Sequence[Mapping[str, str]], *, max_new_tokens: int,
                    batch_size: int = 64, score_fn: Callable | None = None, use_chat_template: bool = False,
                    prompt_template: str = DEFAULT_PROMPT_TEMPLATE, max_prompt_length: int | None = None,
                    prompt_width: int | None = None, stop_ids: Sequence[int] = ()) -> dict:
    """Greedy held-out accuracy: ``{"accuracy", "num_prompts", "texts", "correct"}``."""
    if len(rows) == 0:
        raise ValueError("greedy_accuracy: no rows; pass at least one held-out question.")
    _, samples = sample_responses(model, tokenizer, rows, num_samples=1, max_new_tokens=max_new_tokens,
                                  temperature=0.0, batch_size=batch_size, use_chat_template=use_chat_template,
                                  prompt_template=prompt_template, max_prompt_length=max_prompt_length,
                                  prompt_width=prompt_width, stop_ids=stop_ids)
    correct = score_samples(rows, samples, score_fn)[:, 0]
    return {"accuracy": float(correct.mean()), "num_prompts": len(rows), "texts": [s[0] for s in samples],
            "correct": correct}


def sample_pairs(model, tokenizer, rows: Sequence[Mapping[str, str]], *, num_samples: int = 8,
                 max_new_tokens: int, key, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 batch_size: int = 64, score_fn: Callable | None = None, use_chat_template: bool = False,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, max_prompt_length: int | None = None,
                 prompt_width: int | None = None, stop_ids: Sequence[int] = (),
                 max_pairs_per_question: int | None = 1, seed: int = 0) -> tuple[list[dict], dict]:
    """Sample ``num_samples`` responses per question, score them, pair correct with incorrect.

    A response is *chosen* when ``score_fn`` says it is correct, *rejected* otherwise
    (responses without an answer included). Rows: ``{"prompt", "chosen", "rejected",
    "chosen_answer", "rejected_answer", "reference_answer", "question_index"}``
    (``gsm8k.build_preference_pairs``'s columns and pairing rules; a pair is kept only when
    ``score_fn`` agrees with the extracted-number label). Without a chat template the
    responses get the leading space of the completion template ``" {answer}"``.
    Stats: ``sample_accuracy`` (mean correctness), ``questions_with_pair``, ``num_pairs``,
    ``pass_at_k``.
    """
    prompts, samples = sample_responses(
        model, tokenizer, rows, num_samples=num_samples, max_new_tokens=max_new_tokens, key=key,
        temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size,
        use_chat_template=use_chat_template, prompt_template=prompt_template, max_prompt_length=max_prompt_length,
        prompt_width=prompt_width, stop_ids=stop_ids)
    correct = score_samples(rows, samples, score_fn)
    pairs: list[dict] = []
    for q, (prompt, texts, row) in enumerate(zip(prompts, samples, rows)):
        good = [t for t, c in zip(texts, correct[q]) if c]
        bad = [t for t, c in zip(texts, correct[q]) if not c]
        if not good or not bad:
            continue
        # gsm8k.build_preference_pairs labels by the extracted final number; keep only the pairs on which
        # it agrees with score_fn (always, for gsm8k.is_correct / synthetic.score).
        good_set, bad_set = {t.strip() for t in good}, {t.strip() for t in bad}
        got = gsm8k.build_preference_pairs([prompt], [good + bad], [row["answer"]],
                                           max_pairs_per_question=max_pairs_per_question, seed=seed * 1_000_003 + q)
        got = [g for g in got if g["chosen"].strip() in good_set and g["rejected"].strip() in bad_set]
        for g in got:
            g["question_index"] = q
            if not use_chat_template:
                g["chosen"] = _as_response(g["chosen"])
                g["rejected"] = _as_response(g["rejected"])
        pairs.extend(got)
    stats = {"num_questions": len(rows), "num_samples": int(correct.size),
             "sample_accuracy": float(correct.mean()) if correct.size else 0.0,
             "pass_at_k": float(correct.any(axis=1).mean()) if correct.size else 0.0,
             "questions_with_pair": int(sum(1 for c in correct if c.any() and not c.all())),
             "num_pairs": len(pairs)}
    return pairs, stats


def _as_response(text: str) -> str:
    """A response text for the data layer: leading space as in the GSM8K completion
    template (``" {answer}"``), so the tokens match what SFT trained on; whitespace-
    splitting tokenizers give the same ids either way."""
    return text if text.startswith((" ", "\n")) else " " + text

