"""The synthetic world's style setting (b): the SFT answers' two ways of writing an equation
(:func:`restyle_answer`), the exact reward that prefers the result-first one (:func:`style_reward`), the
pairs built from on-policy samples (:func:`style_pairs`) and the win rate against the SFT model
(:func:`win_rate`).

The SFT data write each equation either forward (``52 - 7 = 45``) or result-first (``45 = 52 - 7``), at
random; the preference is for the result-first style, a reward that says nothing about correctness -- and
writing the result before the operation is *harder* for a left-to-right model, so preference and ability
pull apart, as helpfulness and reasoning can.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_FORWARD = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")
_RESULT_FIRST = re.compile(r"^(\d+) = (\d+) ([-+*]) (\d+)$")


def restyle_answer(answer: str, rng: np.random.Generator, p_result_first: float) -> str:
    """Rewrite each forward equation ``a op b = c .`` of a synthetic answer as ``c = a op b .``
    with probability ``p_result_first`` (the final ``#### N`` is kept)."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError(f"restyle_answer: {answer!r:.80} has no '#### N' final answer")
    out = []
    for step in (s.strip() for s in body.split(" .")):
        if not step:
            continue
        m = _FORWARD.match(step)
        if m and rng.random() < p_result_first:
            a, op, b, c = m.groups()
            step = f"{c} = {a} {op} {b}"
        out.append(step + " .")
    return " ".join(out + ["####" + final])


def style_reward(text: str) -> float:
    """The exact ground-truth reward of setting (b): the share of the response's equations
    written result-first (``c = a op b``); 0 for a response with no equation."""
    body = text.split("####")[0]
    n = first = 0
    for step in (s.strip() for s in body.split(".")):
        if _RESULT_FIRST.match(step):
            n += 1
            first += 1
        elif _FORWARD.match(step):
            n += 1
    return first / n if n else 0.0


def win_rate(reward: np.ndarray, reference_reward: np.ndarray) -> np.ndarray:
    """Per item: 1 if ``reward`` beats the reference's, 0.5 on a tie, 0 otherwise."""
    reward, reference_reward = np.asarray(reward, float), np.asarray(reference_reward, float)
    return np.where(reward > reference_reward, 1.0, np.where(reward == reference_reward, 0.5, 0.0))


def style_pairs(prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> tuple[list[dict], dict]:
    """Setting (b)'s pairs: per prompt, the sample of highest :func:`style_reward` chosen and the
    lowest rejected (the first of each on ties); prompts whose samples all score the same give
    no pair. Responses get the completion template's leading space (as ``sample_pairs``)."""
    pairs = []
    rewards_all = []
    for q, (prompt, texts) in enumerate(zip(prompts, samples)):
        texts = [t for t in texts if t.strip()]
        rewards = [style_reward(t) for t in texts]
        rewards_all.extend(rewards)
        if len(texts) < 2 or max(rewards) == min(rewards):
            continue
        hi, lo = int(np.argmax(rewards)), int(np.argmin(rewards))
        pairs.append({"prompt": prompt, "chosen": _as_response(texts[hi]), "rejected": _as_response(texts[lo]),
                      "chosen_reward": rewards[hi], "rejected_reward": rewards[lo], "question_index": q})
    stats = {"num_questions": len(prompts), "num_pairs": len(pairs),
             "mean_sample_reward": float(np.mean(rewards_all)) if rewards_all else float("nan")}
    return pairs, stats


def _as_response(text: str) -> str:
    return text if text.startswith((" ", "\n")) else " " + text
