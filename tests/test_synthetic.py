"""Tests for spo_jax.data.synthetic: the arithmetic task, its splits and its tokenizer.

Oracles: an independent reading of the question text (verb -> operation, in this
file), Python arithmetic on the equations of the answer, and transformers'
AutoTokenizer / the data layer's own chat rendering for the tokenizer checks.
"""

import re

import pytest
from transformers import AutoTokenizer

from spo_jax.data import gsm8k, loading, synthetic
from spo_jax.data.synthetic import build_tokenizer, make_splits, score

# The task's meaning, written independently of the generator: verb phrase -> operation.
VERBS = {"gets": "+", "buys": "+", "finds": "+", "sells": "-", "gives": "-", "loses": "-",
         "doubles": "*2", "triples": "*3"}


def solve(question: str) -> tuple[int, list[tuple[str, int]], list[int]]:
    """(start, [(op, operand)], values after each step) read from the question text alone."""
    sentences = [s.strip() for s in question.split(" . ")]
    start_match = re.fullmatch(r"([A-Z][a-z]+) has (\d+) ([a-z]+)", sentences[0])
    assert start_match, sentences[0]
    value = start = int(start_match.group(2))
    obj = start_match.group(3)
    assert re.fullmatch(rf"How many {obj} does (he|she) have \?", sentences[-1]), sentences[-1]
    chain, values = [], []
    for sentence in sentences[1:-1]:
        words = sentence.split()
        assert words[0] in ("He", "She")
        op = VERBS[words[1]]
        if op in ("*2", "*3"):
            assert words[2:] == ["them"]
            operand = int(op[1])
            value *= operand
            op = "*"
        else:
            numbers = [int(w) for w in words if w.isdigit()]
            assert len(numbers) == 1
            operand = numbers[0]
            value = value + operand if op == "+" else value - operand
        chain.append((op, operand))
        values.append(value)
    return start, chain, values


@pytest.fixture(scope="module")
def splits():
    return make_splits(2000, 500, seed=0)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ---------------------------------------------------------------------------- the task

def test_answers_are_arithmetically_right(splits):
    for row in splits[0] + splits[1]:
        start, chain, values = solve(row["question"])
        steps = row["answer"].split(" . ")
        assert steps[-1] == f"#### {values[-1]}"
        assert gsm8k.extract_answer(row["answer"]) == str(values[-1])
        assert len(steps) - 1 == len(chain)
        previous = start
        for (op, operand), value, step in zip(chain, values, steps[:-1]):
            a, sym, b, eq, c = step.split()
            assert (int(a), sym, int(b), eq, int(c)) == (previous, op, operand, "=", value)
            assert eval(f"{a} {sym} {b}") == int(c)  # Python's own arithmetic on the written equation
            previous = value
        assert score(row, row["answer"]) == {"correct": True, "answer": str(values[-1])}


def test_format_is_space_separated_gsm8k(splits):
    for row in splits[0][:200]:
        for text in (row["question"], row["answer"]):
            assert "  " not in text and text == text.strip()
            assert all(w.isdigit() or w.isalpha() or w in {".", "?", "=", "+", "-", "*", "####"}
                       for w in text.split())
        assert row["answer"].rsplit("####", 1)[1].strip().isdigit()


def test_default_difficulty_knobs(splits):
    train, test = splits
    steps = set()
    for row in train + test:
        start, chain, values = solve(row["question"])
        steps.add(len(chain))
        assert 2 <= start <= 30
        assert all(1 <= b <= 20 for op, b in chain if op in "+-")
        assert all(0 <= v <= 200 for v in values)
    assert steps == {2, 3, 4}
    ops = {op + (str(b) if op == "*" else "") for row in train for op, b in solve(row["question"])[1]}
    assert ops == {"+", "-", "*2", "*3"}


@pytest.mark.parametrize("knobs", [
    dict(steps=(3, 3), start_range=(5, 9), operand_range=(2, 9), ops=("add", "mul2"), max_value=60),
    dict(steps=(1, 2), start_range=(0, 100), operand_range=(10, 50), ops=("sub",), max_value=100),
    dict(steps=(4, 4), start_range=(2, 30), operand_range=(1, 9), ops=("add", "sub", "mul3"), max_value=999),
])
def test_difficulty_knobs_respected(knobs):
    train, test = make_splits(300, 100, seed=3, **knobs)
    allowed = {"add": "+", "sub": "-", "mul2": "*2", "mul3": "*3"}
    allowed_ops = {allowed[o] for o in knobs["ops"]}
    seen_steps = set()
    for row in train + test:
        start, chain, values = solve(row["question"])
        seen_steps.add(len(chain))
        assert knobs["steps"][0] <= len(chain) <= knobs["steps"][1]
        assert knobs["start_range"][0] <= start <= knobs["start_range"][1]
        for op, b in chain:
            assert (op + str(b) if op == "*" else op) in allowed_ops
            if op != "*":
                assert knobs["operand_range"][0] <= b <= knobs["operand_range"][1]
        assert all(0 <= v <= knobs["max_value"] for v in values)
        assert score(row, row["answer"])["correct"]
    assert seen_steps == set(range(knobs["steps"][0], knobs["steps"][1] + 1))


def test_splits_deterministic_disjoint_and_prefix_stable(splits):
    train, test = splits
    assert (train, test) == make_splits(2000, 500, seed=0)
    assert make_splits(50, 20, seed=1) != make_splits(50, 20, seed=0)
    assert len({r["question"] for r in train}) == len(train)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    # stronger: no arithmetic chain (hence no answer text) is shared, whatever the names and objects
    assert not {r["answer"] for r in train} & {r["answer"] for r in test}
    assert len({r["answer"] for r in train}) == len(train)
    # the test split does not depend on n_train; the training split's prefix does not depend on n_train
    small_train, same_test = make_splits(100, 500, seed=0)
    assert same_test == test and small_train == train[:100]
    assert synthetic.generate(30, seed=5) == synthetic.generate(60, seed=5)[:30]


def test_variety_of_wording(splits):
    questions = [r["question"] for r in splits[0]]
    assert {q.split()[0] for q in questions} == set(synthetic.NAMES)
    assert {q.split()[3] for q in questions} == set(synthetic.OBJECTS)
    assert all(any(f" {verb} " in q for q in questions) for verb in VERBS)


def test_bad_knobs_raise():
    with pytest.raises(ValueError, match="unknown difficulty knob"):
        make_splits(1, 1, stepz=(2, 3))
    with pytest.raises(ValueError, match="steps"):
        make_splits(1, 1, steps=(3, 2))
    with pytest.raises(ValueError, match="ops"):
        make_splits(1, 1, ops=("div",))
    with pytest.raises(ValueError, match="max_value"):
        make_splits(1, 1, start_range=(2, 30), max_value=10)
    with pytest.raises(ValueError, match="n_train"):
        make_splits(-1, 1)
    # a problem space of one problem cannot fill two disjoint splits
    with pytest.raises(ValueError, match="distinct problems"):
        make_splits(1, 1, steps=(1, 1), start_range=(2, 2), operand_range=(1, 1), ops=("add",))
    # sub only, from 0, with operands >= 1: no operation is possible
    with pytest.raises(ValueError, match="no allowed operation"):
        make_splits(1, 0, steps=(1, 1), start_range=(0, 0), ops=("sub",))


def test_score(splits):
    row = splits[1][0]
    final = gsm8k.extract_answer(row["answer"])
    assert score(row, row["answer"]) == {"correct": True, "answer": final}
    body = row["answer"].split("####")[0]
    assert score(row, body + f"The answer is {final} .") == {"correct": True, "answer": final}
    assert score(row, body + f"#### {int(final) + 1}") == {"correct": False, "answer": str(int(final) + 1)}
    assert score(row, "How many does he have ?") == {"correct": False, "answer": None}
    with pytest.raises(ValueError, match="answer"):
        score({"question": row["question"]}, "#### 3")


# ---------------------------------------------------------------------------- the tokenizer

def test_vocabulary_small_and_covering(splits, tok):
    vocab = synthetic.vocabulary()
    assert len(vocab) == len(set(vocab)) == len(tok) <= 70
    assert tok.pad_token_id == 0 and {tok.bos_token, tok.eos_token, tok.unk_token} == {"<s>", "</s>", "<unk>"}
    for row in splits[0][:500]:
        for text in (row["question"], row["answer"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            # one token per word or symbol, one per digit of every number (oracle: the text itself)
            assert len(ids) == sum(len(w) if w.isdigit() else 1 for w in text.split())
    # digits are single tokens whose value is the digit
    ids = tok("#### 1207", add_special_tokens=False)["input_ids"]
    assert [t.removeprefix("@@") for t in tok.convert_ids_to_tokens(ids[1:])] == list("1207")


def test_round_trip_and_answer_extraction(splits, tok):
    for row in splits[1]:
        for text in (row["question"], row["answer"]):
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id
            assert tok.decode(ids, skip_special_tokens=True) == text
        answer_ids = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        decoded = tok.decode(answer_ids, skip_special_tokens=True)
        assert gsm8k.extract_answer(decoded) == gsm8k.extract_answer(row["answer"])
        assert score(row, decoded)["correct"]
    # a WordLevel-style space join of the digits would read the wrong number; this decode does not
    assert tok.decode(tok("#### 52", add_special_tokens=False)["input_ids"]) == "#### 52"


def test_lengths_bounded(tok):
    rows, _ = make_splits(1500, 0, seed=11, steps=(4, 4))
    lengths = [len(tok.apply_chat_template(
        [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
        tokenize=True, return_dict=True)["input_ids"]) for r in rows]
    # oracle: BOS + "Question :" + question + "Answer :" + answer + EOS, one token per word and per digit
    words = [sum(len(w) if w.isdigit() else 1 for w in (r["question"] + " " + r["answer"]).split()) for r in rows]
    assert lengths == [n + 6 for n in words]
    assert max(lengths) < 90


def test_chat_template(splits, tok):
    row = splits[1][3]
    user = [{"role": "user", "content": row["question"]}]
    full = user + [{"role": "assistant", "content": row["answer"]}]
    prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    # the same text as the data layer's default GSM8K prompt template, after BOS
    assert prompt_text == "<s>" + loading.DEFAULT_PROMPT_TEMPLATE.format(question=row["question"])
    prompt, response = loading.render_chat(tok, user, full[1:])
    assert prompt == prompt_text and response == " " + row["answer"] + "</s>"
    full_ids = tok.apply_chat_template(full, tokenize=True, return_dict=True)["input_ids"]
    assert full_ids == tok(prompt + response, add_special_tokens=False)["input_ids"]
    assert full_ids[0] == tok.bos_token_id and full_ids[-1] == tok.eos_token_id
    assert full_ids.count(tok.bos_token_id) == 1 and tok.unk_token_id not in full_ids
    assert len(full_ids) < 90
    decoded = tok.decode(full_ids, skip_special_tokens=True)
    assert decoded == f"Question : {row['question']} Answer : {row['answer']}"
    assert score(row, decoded)["correct"]
    with pytest.raises(Exception, match="user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "x"}] + user, tokenize=False)


def test_save_load_round_trip(tmp_path, splits, tok):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    assert loaded.chat_template == tok.chat_template
    for row in splits[1][:50]:
        ids = tok(row["question"])["input_ids"]
        assert loaded(row["question"])["input_ids"] == ids
        assert loaded.decode(ids, skip_special_tokens=True) == row["question"]
    batch = loaded([splits[1][0]["answer"], "Ben has 3 apples ."], padding=True)
    assert batch["input_ids"][1][-1] == loaded.pad_token_id and set(batch) == {"input_ids", "attention_mask"}
    # building is deterministic: a second build gives the same vocabulary and ids
    assert build_tokenizer().get_vocab() == tok.get_vocab()
