"""Tests for spo_jax.data.gsm8k on real GSM8K rows and hand-written model-style outputs.

Oracles: the GSM8K reference answers themselves (the text after "####", commas
removed, read with ``int``), Python's ``Decimal`` for decimal equality, and
hand-checked expected values for the model-style outputs.
"""

import json
import os
from collections import Counter
from decimal import Decimal
from pathlib import Path

import pytest

from spo_jax.data import gsm8k, loading
from spo_jax.data.gsm8k import accuracy, build_preference_pairs, extract_answer, is_correct, normalize_number

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SPO_JAX_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def gsm8k_train():
    path = DATA_DIR / "gsm8k" / "train.jsonl"
    if not path.exists():
        pytest.skip(f"GSM8K data not found at {path}: set SPO_JAX_DATA to the shared data folder "
                    "(the one holding gsm8k/train.jsonl).")
    with open(path) as f:
        return [json.loads(line) for line in f]


def reference_int(answer_text: str) -> int:
    """Independent oracle: GSM8K's final answer is the text after '####', an integer with commas."""
    return int(answer_text.split("####")[-1].strip().replace(",", ""))


def body(answer_text: str) -> str:
    """The reasoning without the '#### N' line (what a model that never writes '####' produces)."""
    return answer_text.split("####")[0].rstrip()


# ---------------------------------------------------------------------------- extraction on real rows

def test_extracts_every_real_reference_answer(gsm8k_train):
    rows = gsm8k_train
    assert len(rows) == 7473
    bad = [(r["answer"][-40:], extract_answer(r["answer"])) for r in rows
           if extract_answer(r["answer"]) != str(reference_int(r["answer"]))]
    assert bad == []
    # the rows cover the awkward forms: thousands separators and negatives
    finals = [r["answer"].split("####")[-1].strip() for r in rows]
    assert sum("," in a for a in finals) > 20 and sum(a.startswith("-") for a in finals) >= 3
    assert all(extract_answer(r["answer"], strict=True) == str(reference_int(r["answer"])) for r in rows[:500])


def test_model_style_endings_on_real_solutions(gsm8k_train):
    """Real reasoning + the endings models write instead of '#### N'."""
    endings = [
        "\nThe answer is {n}.",
        "\nThe answer is {c}.",             # thousands separators
        "\nThe answer is ${c}.",            # currency
        "\nSo the final answer is: {n}",
        "\nTherefore, the answer is {n} dollars.",
        "\nFinal answer: {c}\n",
        "\nThe answer is \\boxed{{{n}}}.",
        "\n#### {c}\n\nQuestion: Tom has 3 apples. How many apples? Answer: 3 #### 3",  # runaway generation
        "\nThe answer is {n}.\nQuestion: John has 5 pens and buys 2. The answer is 7.",
    ]
    for row in gsm8k_train[:300]:
        n = reference_int(row["answer"])
        for ending in endings:
            text = body(row["answer"]) + ending.format(n=n, c=f"{n:,}")
            assert extract_answer(text) == str(n), text[-160:]
        # no marker at all: the last number of the text, when the text ends with the result
        assert extract_answer(body(row["answer"]) + f"\nIn total {n:,} remain.") == str(n)
        # strict mode accepts only '####'
        assert extract_answer(body(row["answer"]) + f"\nThe answer is {n}.", strict=True) is None


def test_last_number_fallback_on_real_bodies(gsm8k_train):
    """Without '####', the last number of the reasoning is read (calculator notes included)."""
    rows = gsm8k_train[:2000]
    agree = 0
    for row in rows:
        text = body(row["answer"])
        got = extract_answer(text)
        assert got is not None
        agree += got == str(reference_int(row["answer"]))
        # oracle for the last number: the result of the last calculator annotation '<<...=X>>' when
        # nothing but words follow its repeated value
        last_line = text.rsplit("\n", 1)[-1]
        if ">>" in last_line:
            tail = last_line.rsplit(">>", 1)[1]
            result = last_line.rsplit(">>", 1)[0].rsplit("=", 1)[1]
            if not any(ch.isdigit() for ch in tail.split(result, 1)[-1]) and tail.lstrip(" $").startswith(result):
                assert Decimal(got) == Decimal(result), (last_line, got)
    assert agree / len(rows) > 0.8  # most solutions end with their result


# ---------------------------------------------------------------------------- hand-written cases

@pytest.mark.parametrize("text, expected", [
    ("#### 72", "72"),
    ("#### 1,200", "1200"),
    ("#### 109,200,000", "109200000"),
    ("#### -7", "-7"),
    ("####-12", "-12"),
    ("#### $18", "18"),
    ("#### $ 18.00", "18"),
    ("#### 12 dollars", "12"),
    ("#### 40%", "40"),
    ("#### 3.50", "3.5"),
    ("#### 5.0", "5"),
    ("#### 0.25", "0.25"),
    ("#### .5", "0.5"),
    ("#### -0", "0"),
    ("#### +3", "3"),
    ("####: 9", "9"),
    ("#### The answer is 9", "9"),             # '####' without a number: the statement wins
    ("########\n#### 4", "4"),
    ("Janet has 16 - 3 - 4 = 9 eggs left. She sells them for 9 * 2 = $18.\n#### 18", "18"),
    ("She makes 9 * $2 = $18 every day. The answer is 18.", "18"),
    ("The answer is $1,234.56.", "1234.56"),
    ("the final answer is -3", "-3"),
    ("Final Answer: 150 miles", "150"),
    ("So the answer is that she has 18 apples. Next, 7 more.", "18"),
    ("The final answer is $\\boxed{42}$.", "42"),
    ("He pays 3 x 4 = 12 dollars.", "12"),
    ("Total: 2 + 3 = 5.", "5"),
    ("She ends with 5-3 apples", "3"),       # a hyphen between numbers is not a sign
    ("The temperature drops to x = -4.", "-4"),
    ("It costs \u2212$5 net", "-5"),
    ("He earns 0.2 x 50 = $10.\n", "10"),
    ("72.", "72"),
    ("He has 12 apples and 1,000,000 grains.", "1000000"),
    ("Ages 1,2,3", "3"),
    ("There are 2 cats. \n", "2"),
    ("No numbers here.", None),
    ("", None),
    ("The answer is unknown.", None),
])
def test_extract_answer_cases(text, expected):
    assert extract_answer(text) == expected


def test_normalize_number_forms():
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("about 12% of") == "12"
    assert normalize_number("-$5") == "-5"
    assert normalize_number("words") is None
    # equal values give equal strings (oracle: Decimal)
    for a, b in [("5", "5.0"), ("3.5", "3.50"), ("1,200", "1200.000"), ("-2.10", "-2.1")]:
        assert Decimal(a.replace(",", "")) == Decimal(b.replace(",", ""))
        assert normalize_number(a) == normalize_number(b)
    with pytest.raises(ValueError, match="string"):
        normalize_number(5)


# ---------------------------------------------------------------------------- correctness and accuracy

def test_is_correct_and_accuracy_on_real_rows(gsm8k_train):
    rows = gsm8k_train[:400]
    refs = [r["answer"] for r in rows]
    assert all(is_correct(r, r) for r in refs)
    assert accuracy(refs, refs) == 1.0
    # model-style predictions: right for even rows, off by one for odd rows
    preds = [body(r) + f"\nThe answer is {reference_int(r) + (i % 2)}." for i, r in enumerate(refs)]
    expected = sum(1 for i in range(len(refs)) if i % 2 == 0) / len(refs)
    assert accuracy(preds, refs) == pytest.approx(expected)
    # shifted references: correct exactly where neighbouring answers coincide (oracle: int compare)
    shifted = refs[1:] + refs[:1]
    want = sum(reference_int(a) == reference_int(b) for a, b in zip(refs, shifted)) / len(refs)
    assert accuracy(refs, shifted) == pytest.approx(want)


def test_is_correct_forms():
    assert is_correct("The answer is 5.0", "#### 5")
    assert is_correct("so she has $1,200.", "She has 1200 dollars.\n#### 1,200")
    assert is_correct("The answer is 3.50 dollars", "3.5")
    assert not is_correct("The answer is 6", "#### 5")
    assert not is_correct("I do not know.", "#### 5")
    with pytest.raises(ValueError, match="reference"):
        is_correct("5", "no number in this reference")
    with pytest.raises(ValueError, match="len"):
        accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="single string"):
        accuracy("1", "1")


# ---------------------------------------------------------------------------- preference pairs

def _samples_for(row, i):
    """Realistic sampled responses: correct ones in several styles, wrong ones, an unanswered one."""
    n = reference_int(row["answer"])
    b = body(row["answer"])
    correct = [row["answer"], b + f"\nThe answer is {n:,}.", b + f"\nSo the total is {n}."]
    wrong = [b + f"\n#### {n + 1}", b + f"\nThe answer is {n * 2 + 3}.", b + f"\nThe answer is {n + 1}.",
             "Let me think step by step. This is hard", b + f"\nThe answer is {n - 10}."]
    samples = correct + wrong + [row["answer"]]          # a duplicate of the first correct one
    order = sorted(range(len(samples)), key=lambda k: (k * 7 + i) % len(samples))
    return [samples[k] for k in order]


@pytest.fixture(scope="module")
def pair_inputs(gsm8k_train):
    rows = gsm8k_train[:40]
    prompts = [f"Question: {r['question']}\nAnswer:" for r in rows]
    samples = [_samples_for(r, i) for i, r in enumerate(rows)]
    # one question with only correct samples, one with only wrong ones: no pairs
    samples[3] = [rows[3]["answer"], body(rows[3]["answer"]) + f"\nThe answer is {reference_int(rows[3]['answer'])}"]
    samples[4] = ["no idea", body(rows[4]["answer"]) + f"\n#### {reference_int(rows[4]['answer']) + 5}"]
    return prompts, samples, [r["answer"] for r in rows]


def test_pairs_chosen_correct_rejected_incorrect(pair_inputs):
    prompts, samples, refs = pair_inputs
    rows = build_preference_pairs(prompts, samples, refs, max_pairs_per_question=3, seed=0)
    per_q = Counter(r["question_index"] for r in rows)
    assert 3 not in per_q and 4 not in per_q
    assert all(per_q[q] == 3 for q in range(len(prompts)) if q not in (3, 4))
    for r in rows:
        q = r["question_index"]
        assert r["prompt"] == prompts[q]
        assert is_correct(r["chosen"], refs[q]) and not is_correct(r["rejected"], refs[q])
        assert r["chosen_answer"] == r["reference_answer"] == str(reference_int(refs[q]))
        assert r["rejected_answer"] != r["reference_answer"]
        assert r["chosen"] in samples[q] and r["rejected"] in samples[q]
        assert r["chosen"] != r["rejected"]
    assert loading.detect_format(list(rows[0])) == "preference"


def test_pairs_all_combinations_distinct_and_deduped(pair_inputs):
    prompts, samples, refs = pair_inputs
    rows = build_preference_pairs(prompts, samples, refs, max_pairs_per_question=None, seed=1)
    for q in range(len(prompts)):
        mine = [(r["chosen"], r["rejected"]) for r in rows if r["question_index"] == q]
        if q in (3, 4):
            assert mine == []
            continue
        unique = list(dict.fromkeys(s.strip() for s in samples[q]))
        n_chosen = sum(is_correct(s, refs[q]) for s in unique)
        n_rejected = len(unique) - n_chosen
        assert (n_chosen, n_rejected) == (3, 5)          # the duplicate of the reference is dropped
        assert len(mine) == len(set(mine)) == n_chosen * n_rejected
    # without dedupe the duplicate correct sample is a chosen response of its own
    rows_dup = build_preference_pairs(prompts[:1], samples[:1], refs[:1], max_pairs_per_question=None,
                                      dedupe=False)
    assert len(rows_dup) == 4 * 5
    # unanswered responses can be left out
    rows_ans = build_preference_pairs(prompts[:1], samples[:1], refs[:1], max_pairs_per_question=None,
                                      include_unanswered=False)
    assert len(rows_ans) == 3 * 4 and all(r["rejected_answer"] is not None for r in rows_ans)


def test_pairs_use_every_response_and_distinct_wrong_answers_first(pair_inputs):
    prompts, samples, refs = pair_inputs
    for seed in range(5):
        rows = build_preference_pairs(prompts[:1], samples[:1], refs[:1], max_pairs_per_question=5, seed=seed)
        # 3 correct, 5 incorrect -> 5 pairs use every incorrect response once and every correct one
        assert len({r["rejected"] for r in rows}) == 5 and len({r["chosen"] for r in rows}) == 3
        # the wrong answers are n+1 (twice, as different texts), 2n+3, n-10 and none: the first four
        # pairs hold the four distinct wrong answers
        first = [r["rejected_answer"] for r in rows[:4]]
        assert len(set(first)) == 4
        distinct = build_preference_pairs(prompts[:1], samples[:1], refs[:1], max_pairs_per_question=3,
                                          seed=seed)
        assert None not in [r["rejected_answer"] for r in distinct]  # answered wrong answers come first


def test_pairs_seed_deterministic(pair_inputs):
    prompts, samples, refs = pair_inputs
    a = build_preference_pairs(prompts, samples, refs, max_pairs_per_question=2, seed=7)
    b = build_preference_pairs(prompts, samples, refs, max_pairs_per_question=2, seed=7)
    c = build_preference_pairs(prompts, samples, refs, max_pairs_per_question=2, seed=8)
    assert a == b
    assert a != c
    assert [r["question_index"] for r in a] == [r["question_index"] for r in c]


def test_pairs_validation(pair_inputs):
    prompts, samples, refs = pair_inputs
    with pytest.raises(ValueError, match="len"):
        build_preference_pairs(prompts, samples[:-1], refs)
    with pytest.raises(ValueError, match="max_pairs_per_question"):
        build_preference_pairs(prompts, samples, refs, max_pairs_per_question=0)
    with pytest.raises(ValueError, match=r"samples\[0\]"):
        build_preference_pairs(prompts[:1], ["a single string"], refs[:1])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        build_preference_pairs(prompts[:1], samples[:1], ["no number"])


def test_pair_index_order_covers_all_pairs():
    for n_chosen in range(1, 7):
        for n_rejected in range(1, 7):
            order = list(gsm8k._pair_indices(n_chosen, n_rejected))
            assert sorted(order) == [(i, j) for i in range(n_chosen) for j in range(n_rejected)]
            head = order[:max(n_chosen, n_rejected)]
            assert {i for i, _ in head} == set(range(n_chosen)) and {j for _, j in head} == set(range(n_rejected))
