"""GSM8K answers: final-answer extraction, correctness, accuracy, preference pairs.

GSM8K solutions end with ``#### N`` (``N`` an integer, sometimes written with
thousands separators, e.g. ``#### 1,200``, or negative, ``#### -7``). Model
outputs often do not: they end with "The answer is $1,234." or just the last
number of the reasoning. :func:`extract_answer` tries, in order:

1. ``#### N`` -- the first ``####`` followed by a number (a model that keeps
   generating after its answer writes further, unrelated ``####`` lines);
2. an explicit statement -- "the (final) answer is N", "final answer: N",
   ``\\boxed{N}`` -- the first one, looking for ``N`` in the rest of its line;
3. the last number in the text (``strict=False`` only; ``strict=True`` stops
   after step 1, like lm-evaluation-harness' "strict-match").

Numbers are normalised to a canonical string so that equal values compare
equal as strings: thousands separators, a leading ``+``, a currency sign
(``$``, ``€``, ``£``), a trailing ``%``, units ("12 dollars") and a sentence's
final period are dropped; decimals lose trailing zeros (``"3.50" -> "3.5"``,
``"5.0" -> "5"``); ``"-0" -> "0"``. A minus sign counts only when attached to the
number and not preceded by a word character (``"5-3"`` and ``"5 - 3"`` end in
``3``, ``"x = -3"`` in ``-3``).

Preference pairs (:func:`build_preference_pairs`) turn sampled solutions into
rows of the ``preference`` format of :mod:`spo_jax.data.loading`
(``prompt``/``chosen``/``rejected``) plus metadata: a correct sample is a
*chosen* response, an incorrect one (wrong or no final answer) a *rejected*
response of the same question.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

__all__ = [
    "accuracy",
    "answers_equal",
    "build_preference_pairs",
    "extract_answer",
    "is_correct",
    "normalize_number",
]

# A number as written in text: optional sign (attached, not after a word character),
# optional currency sign, digits with optional thousands groups, optional decimals;
# or a bare decimal ".5". A trailing "." without digits (end of sentence) is not part of it.
_NUMBER = re.compile(
    r"(?:(?<![\w.])(?P<sign>[-+\u2212]))?"
    r"(?:[$\u20ac\u00a3]\s?)?"
    r"(?<!\d)(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?!\d)")
_HASHES = re.compile(r"####")
# Explicit statements of the final answer; the number is searched in the rest of the line.
_STATEMENT = re.compile(
    r"(?:the\s+)?(?:final\s+)?answer\s+is\b\s*:?|final\s+answer\s*:|\\boxed\{",
    re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """Canonical string of the *first* number in ``text``; None if it has none.

    ``"$1,234.50" -> "1234.5"``, ``"5.0" -> "5"``, ``"-0.0" -> "0"``, ``"12%" -> "12"``,
    ``"+3" -> "3"``, ``"-$5" -> "-5"``, ``"72." -> "72"``.
    """
    if not isinstance(text, str):
        raise ValueError(f"normalize_number expects a string, got {type(text).__name__}: {text!r}.")
    match = _NUMBER.search(text)
    return None if match is None else _canonical(match)


def _canonical(match: re.Match) -> str | None:
    digits = match.group("digits")
    sign = match.group("sign") or ""
    try:
        value = Decimal(digits.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only admits valid literals
        return None
    if sign in ("-", "\u2212"):
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # int() also maps -0 to 0
    return format(value.normalize(), "f")


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return None if match is None else _canonical(match)


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return None if last is None else _canonical(last)


def extract_answer(text: str, *, strict: bool = False) -> str | None:
    """The final numeric answer of a solution text, normalised; None if none is found.

    Args:
      text: a GSM8K reference solution or a model's generated solution.
      strict: only accept ``#### N`` (no "the answer is" statements, no last-number fallback).

    Returns:
      The canonical number string (see :func:`normalize_number`), e.g. ``"1200"``,
      ``"-7"``, ``"3.5"``; None when the text states no number the rules accept.
    """
    if not isinstance(text, str):
        raise ValueError(f"extract_answer expects a string, got {type(text).__name__}: {text!r}.")
    for marker in _HASHES.finditer(text):
        # the number must follow the marker on its line (allowing "$", ":" or spaces before it)
        rest = text[marker.end():].split("\n", 1)[0].lstrip(" :*")
        if rest.startswith("#"):
            continue
        match = _NUMBER.match(rest)
        if match is not None:
            return _canonical(match)
    if strict:
        return None
    for statement in _STATEMENT.finditer(text):
        rest = text[statement.end():].split("\n", 1)[0]
        # "the answer is 18", "The final answer is: $1,234.", "\boxed{42}", "the answer is that she has 18 apples"
        value = _first_number(rest)
        if value is not None:
            return value
    return _last_number(text)


def answers_equal(a: str | None, b: str | None) -> bool:
    """True when both are numbers and equal as decimals (``"5" == "5.0"``); None never equals."""
    if a is None or b is None:
        return False
    return Decimal(a) == Decimal(b)


def _reference_answer(reference: str, where: str) -> str:
    if not isinstance(reference, str):
        raise ValueError(f"{where}: the reference must be a string (a GSM8K solution ending in "
                         f"'#### N', or the number itself), got {type(reference).__name__}: {reference!r}.")
    answer = extract_answer(reference)
    if answer is None:
        raise ValueError(f"{where}: no number in the reference answer {reference[-80:]!r}; pass the GSM8K "
                         "'answer' field (ending in '#### N') or the final number as a string.")
    return answer


def is_correct(prediction_text: str, reference_answer_text: str) -> bool:
    """Whether the prediction's final answer equals the reference's.

    Args:
      prediction_text: a generated solution (any of the forms :func:`extract_answer` reads).
      reference_answer_text: the GSM8K ``answer`` field (``... #### N``) or the number itself.

    A prediction without an extractable number is incorrect. A reference without
    one raises ``ValueError`` (it is a data error, not a wrong prediction).
    """
    reference = _reference_answer(reference_answer_text, "is_correct(reference_answer_text=...)")
    return answers_equal(extract_answer(prediction_text), reference)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions whose final answer equals the reference's: ``mean_i [a(p_i) == a(r_i)]``."""
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("accuracy expects sequences of strings for predictions and references, got a "
                         "single string; wrap it in a list.")
    if len(predictions) != len(references):
        raise ValueError(f"accuracy: len(predictions)={len(predictions)} != len(references)={len(references)}; "
                         "pass one prediction per reference.")
    if len(predictions) == 0:
        raise ValueError("accuracy: predictions and references are empty; accuracy of nothing is undefined.")
    hits = [is_correct(p, r) for p, r in zip(predictions, references)]
    return float(sum(hits)) / len(hits)


def _order_rejected(rejected: list[tuple[str, str | None]], rng: np.random.Generator,
                    prefer_distinct_answers: bool) -> list[tuple[str, str | None]]:
    """Shuffle; with ``prefer_distinct_answers``, round-robin over distinct wrong answers.

    Groups by final answer (responses without an answer form the last group); the
    result takes one response from each group in turn, so the first pairs contrast
    the correct answer with as many *different* wrong answers as possible.
    """
    order = [rejected[i] for i in rng.permutation(len(rejected))]
    if not prefer_distinct_answers:
        return order
    groups: dict[str | None, list[tuple[str, str | None]]] = {}
    for item in order:
        groups.setdefault(item[1], []).append(item)
    keys = [k for k in groups if k is not None] + ([None] if None in groups else [])
    result = []
    for depth in range(max(len(g) for g in groups.values())):
        result.extend(groups[k][depth] for k in keys if depth < len(groups[k]))
    return result


def _pair_indices(n_chosen: int, n_rejected: int):
    """All ``n_chosen * n_rejected`` index pairs, every element used before any is reused.

    ``k -> ((k + k // lcm) % C, k % R)``: the first ``lcm(C, R)`` steps visit distinct
    pairs (CRT), and each further block of ``lcm`` steps is shifted by one chosen index,
    so the ``gcd(C, R)`` blocks together cover every pair exactly once.
    """
    lcm = n_chosen * n_rejected // math.gcd(n_chosen, n_rejected)
    for k in range(n_chosen * n_rejected):
        yield (k + k // lcm) % n_chosen, k % n_rejected


def build_preference_pairs(
    prompts: Sequence[str],
    samples: Sequence[Sequence[str]],
    references: Sequence[str],
    *,
    max_pairs_per_question: int | None = 1,
    prefer_distinct_answers: bool = True,
    dedupe: bool = True,
    include_unanswered: bool = True,
    seed: int = 0,
) -> list[dict]:
    """Preference pairs from sampled solutions: correct -> chosen, incorrect -> rejected.

    Args:
      prompts: ``[Q]`` prompt text of each question (what the responses continue).
      samples: ``[Q][n_q]`` sampled response texts per question.
      references: ``[Q]`` GSM8K reference answers (``... #### N``) or the numbers themselves.
      max_pairs_per_question: at most this many pairs per question (None: every
        correct x incorrect combination). Pairs are chosen so that every correct and
        every incorrect response is used once before any is reused.
      prefer_distinct_answers: order the incorrect responses round-robin over their
        distinct wrong final answers, so the pairs of a question contrast the correct
        answer with as many different wrong answers as possible (otherwise random order).
      dedupe: drop responses whose text (stripped of surrounding whitespace) repeats an
        earlier response of the same question.
      include_unanswered: responses with no extractable answer count as incorrect
        (rejected; ``rejected_answer`` None); False drops them.
      seed: the shuffles of question ``q`` use ``numpy.random.default_rng([seed, q])``,
        so a question's pairs do not depend on the other questions.

    Returns:
      A list of rows ``{"prompt", "chosen", "rejected", "chosen_answer",
      "rejected_answer", "reference_answer", "question_index"}`` in question order;
      questions with no correct or no incorrect response give no row.
    """
    if isinstance(prompts, str) or isinstance(references, str):
        raise ValueError("build_preference_pairs expects sequences for prompts and references, got a string.")
    if not (len(prompts) == len(samples) == len(references)):
        raise ValueError(f"build_preference_pairs: len(prompts)={len(prompts)}, len(samples)={len(samples)}, "
                         f"len(references)={len(references)} must be equal (one entry per question).")
    if max_pairs_per_question is not None and (not isinstance(max_pairs_per_question, int)
                                               or max_pairs_per_question < 1):
        raise ValueError(f"max_pairs_per_question={max_pairs_per_question!r} must be a positive int or None "
                         "(None = all correct x incorrect combinations).")
    rows: list[dict] = []
    for q, (prompt, responses, reference) in enumerate(zip(prompts, samples, references)):
        if isinstance(responses, str) or not isinstance(responses, Sequence):
            raise ValueError(f"build_preference_pairs: samples[{q}] must be a list of response strings, "
                             f"got {type(responses).__name__}.")
        ref = _reference_answer(reference, f"build_preference_pairs(references[{q}])")
        seen: set[str] = set()
        chosen: list[tuple[str, str]] = []
        rejected: list[tuple[str, str | None]] = []
        for j, text in enumerate(responses):
            if not isinstance(text, str):
                raise ValueError(f"build_preference_pairs: samples[{q}][{j}] must be a string, "
                                 f"got {type(text).__name__}: {text!r}.")
            key = text.strip()
            if dedupe:
                if key in seen:
                    continue
                seen.add(key)
            answer = extract_answer(text)
            if answers_equal(answer, ref):
                chosen.append((text, answer))
            elif answer is not None or include_unanswered:
                rejected.append((text, answer))
        if not chosen or not rejected:
            continue
        rng = np.random.default_rng([seed, q])
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        rejected = _order_rejected(rejected, rng, prefer_distinct_answers)
        for n, (i, j) in enumerate(_pair_indices(len(chosen), len(rejected))):
            if max_pairs_per_question is not None and n >= max_pairs_per_question:
                break
            rows.append({
                "prompt": prompt,
                "chosen": chosen[i][0],
                "rejected": rejected[j][0],
                "chosen_answer": chosen[i][1],
                "rejected_answer": rejected[j][1],
                "reference_answer": ref,
                "question_index": q,
            })
    return rows
