"""Loading + tokenization: every file type and row format gives the same token ids.

Oracle: the tokenizer itself on the *concatenated* text (``tok(prompt + response)``
with its own special-token logic) and hand-written ChatML strings, independent of
spo_jax's format handling.
"""

import gzip
import json
import logging

import datasets
import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from spo_jax.data import detect_format, extract_prompt, load_rows, prepare_dataset, standardize, tokenize_dataset

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# (prompt, chosen, rejected): responses start with the separating space, as extract_prompt arranges.
TRIPLES = [
    ("The sky is", " blue.", " green."),
    ("\n\nHuman: what is two plus two?\n\nAssistant:", " four", " five"),
    # shared start of the two answers stays in the responses (cut at the last "Assistant:")
    ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a color\n\nAssistant:", " I like red", " I like blue"),
    # the shared prefix "Birds can fl" ends mid-word: the prompt backs off to "Birds can"
    ("Birds can", " fly high", " flap wings"),
]
CHATS = [  # (user, chosen, rejected)
    ("What color is the sky?", "blue", "green"),
    ("Two plus two?", "four", "five"),
]
QA = [("How many eggs?", "9 eggs.\n#### 9"), ("Two plus two?", "It is 4.\n#### 4")]


def _make_tokenizer(chat_template=CHATML):
    corpus = [t for row in TRIPLES for t in row] + [t for row in CHATS for t in row] + [t for row in QA for t in row]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<pad>", "<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(  # the tokenizer adds BOS by default
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", chat_template=chat_template)


@pytest.fixture(scope="module")
def tok():
    return _make_tokenizer()


def _write(rows, tmp_path, kind, stem):
    """Write rows as json / jsonl / jsonl.gz / parquet / csv / arrow save_to_disk; return the path."""
    if kind == "json":
        path = tmp_path / f"{stem}.json"
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path = tmp_path / f"{stem}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "jsonl.gz":
        path = tmp_path / f"{stem}.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif kind == "parquet":
        path = tmp_path / f"{stem}.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / f"{stem}.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == "arrow":
        path = tmp_path / f"{stem}_arrow"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


def _ids(ds, cols):
    return [tuple(tuple(r[c]) for c in cols) for r in ds]


def _oracle_pair_ids(tok, prompt, responses):
    """Oracle: the tokenizer on prompt alone and on the concatenations, plus EOS."""
    p = tok(prompt)["input_ids"]  # tokenizer adds its BOS
    out = [tuple(p)]
    for r in responses:
        full = tok(prompt + r)["input_ids"]
        assert full[:len(p)] == p
        out.append(tuple(full[len(p):]) + (tok.eos_token_id,))
    return tuple(out)


ALL_FILE_TYPES = ["json", "jsonl", "jsonl.gz", "parquet", "csv", "arrow"]
PREF_COLS = ("prompt_ids", "chosen_ids", "rejected_ids")


@pytest.mark.parametrize("file_type", ALL_FILE_TYPES)
def test_preference_standard_and_implicit_identical_in_every_file_type(tok, tmp_path, file_type):
    expected = [_oracle_pair_ids(tok, p, [c, r]) for p, c, r in TRIPLES]
    standard = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TRIPLES]
    implicit = [{"chosen": p + c, "rejected": p + r} for p, c, r in TRIPLES]
    for rows, fmt in ((standard, "preference"), (implicit, "implicit_preference")):
        path = _write(rows, tmp_path, file_type, fmt)
        ds, stats = prepare_dataset(path, tok, max_length=64)
        assert stats["format"] == fmt and stats["kind"] == "preference"
        assert stats["rows_in"] == stats["rows_out"] == len(TRIPLES)
        assert _ids(ds, PREF_COLS) == expected
        assert list(ds["example_index"]) == list(range(len(TRIPLES)))


def test_extract_prompt_recovers_prompt_and_responses():
    for p, c, r in TRIPLES:
        assert extract_prompt(p + c, p + r) == (p, c, r)
    # TRL's rule: a shared trailing space moves to the responses
    assert extract_prompt("The sun is hot.", "The sun is in the sky.") == ("The sun is", " hot.", " in the sky.")
    msgs = [{"role": "user", "content": "hi"}]
    a, b = [{"role": "assistant", "content": "x"}], [{"role": "assistant", "content": "y"}]
    assert extract_prompt(msgs + a, msgs + b) == (msgs, a, b)


@pytest.mark.parametrize("file_type", ["json", "jsonl.gz", "parquet", "arrow"])  # csv cannot hold message lists
def test_conversational_formats_match_hand_written_chatml(tok, tmp_path, file_type):
    def user(x):
        return [{"role": "user", "content": x}]

    def asst(x):
        return [{"role": "assistant", "content": x}]

    # Oracle: ChatML written by hand, fed as plain strings.
    plain = [{"prompt": f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n",
              "chosen": f"{c}<|im_end|>", "rejected": f"{r}<|im_end|>"} for u, c, r in CHATS]
    ref, _ = prepare_dataset(datasets.Dataset.from_list(plain), tok, max_length=64)
    expected = _ids(ref, PREF_COLS)
    # EOS is the template's own end-of-turn token: present once, at the end
    assert all(ids[1][-1] == tok.eos_token_id and ids[1].count(tok.eos_token_id) == 1 for ids in expected)

    conv = [{"prompt": user(u), "chosen": asst(c), "rejected": asst(r)} for u, c, r in CHATS]
    conv_implicit = [{"chosen": user(u) + asst(c), "rejected": user(u) + asst(r)} for u, c, r in CHATS]
    for rows, stem in ((conv, "conv"), (conv_implicit, "conv_implicit")):
        ds, stats = prepare_dataset(_write(rows, tmp_path, file_type, stem), tok, max_length=64)
        assert _ids(ds, PREF_COLS) == expected, stem

    # SFT: messages == conversational prompt/completion == hand-written strings
    sft_plain = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in plain]
    sft_expected = _ids(prepare_dataset(datasets.Dataset.from_list(sft_plain), tok, max_length=64)[0],
                        ("prompt_ids", "completion_ids"))
    messages = [{"messages": user(u) + asst(c)} for u, c, _ in CHATS]
    pc = [{"prompt": user(u), "completion": asst(c)} for u, c, _ in CHATS]
    for rows, stem, fmt in ((messages, "messages", "messages"), (pc, "pc", "prompt_completion")):
        ds, stats = prepare_dataset(_write(rows, tmp_path, file_type, stem), tok, max_length=64)
        assert stats["format"] == fmt and stats["kind"] == "sft"
        assert _ids(ds, ("prompt_ids", "completion_ids")) == sft_expected, stem


@pytest.mark.parametrize("file_type", ALL_FILE_TYPES)
def test_sft_prompt_completion_and_question_answer(tok, tmp_path, file_type):
    expected = [_oracle_pair_ids(tok, f"Question: {q}\nAnswer:", [f" {a}"]) for q, a in QA]
    pc = [{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"} for q, a in QA]
    qa = [{"question": q, "answer": a} for q, a in QA]
    for rows, fmt in ((pc, "prompt_completion"), (qa, "question_answer")):
        ds, stats = prepare_dataset(_write(rows, tmp_path, file_type, fmt), tok, max_length=64)
        assert stats["format"] == fmt
        assert _ids(ds, ("prompt_ids", "completion_ids")) == expected
    # a custom template
    ds, _ = prepare_dataset(datasets.Dataset.from_list(qa), tok, max_length=64,
                            prompt_template="Q: {question} A:", completion_template=" {answer}")
    assert _ids(ds, ("prompt_ids", "completion_ids")) == [
        _oracle_pair_ids(tok, f"Q: {q} A:", [f" {a}"]) for q, a in QA]


def test_bos_never_duplicated_when_the_chat_template_writes_it():
    tok = _make_tokenizer("{{ bos_token }}" + CHATML)
    rows = [{"prompt": [{"role": "user", "content": u}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for u, c, r in CHATS]
    ds, _ = prepare_dataset(datasets.Dataset.from_list(rows), tok, max_length=64)
    for p in ds["prompt_ids"]:
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1


def test_column_mapping_detection_and_missing_column_message(tok, tmp_path):
    rows = [{"instruction": p, "good": c, "bad": r} for p, c, r in TRIPLES]
    path = _write(rows, tmp_path, "jsonl", "renamed")
    mapping = {"prompt": "instruction", "chosen": "good", "rejected": "bad"}
    ds, stats = prepare_dataset(path, tok, max_length=64, columns=mapping)
    assert stats["format"] == "preference"
    assert _ids(ds, PREF_COLS) == [_oracle_pair_ids(tok, p, [c, r]) for p, c, r in TRIPLES]
    assert detect_format(["prompt", "completion", "x"]) == "prompt_completion"
    assert detect_format(["question", "answer"]) == "question_answer"

    raw = load_rows(_write([{"prompt": "a", "chosen": "b"}], tmp_path, "jsonl", "missing"))
    with pytest.raises(ValueError) as err:
        standardize(raw, format="preference")
    msg = str(err.value)
    assert "'rejected'" in msg and "['prompt', 'chosen']" in msg
    with pytest.raises(ValueError, match="cannot detect"):
        standardize(datasets.Dataset.from_list([{"foo": "a"}]))


def _bad_rows():
    long_prompt = " ".join(["sky"] * 40)
    return [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},  # ok
        {"prompt": "The sky is", "chosen": "", "rejected": " green."},  # empty response
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " blue."},  # identical
        {"prompt": long_prompt, "chosen": " blue.", "rejected": " green."},  # prompt > max_length
        {"prompt": "Birds can", "chosen": "   ", "rejected": " fly"},  # whitespace-only response
    ]


def test_bad_rows_dropped_with_counts_and_strict_raises(tok, caplog):
    ds_raw = datasets.Dataset.from_list(_bad_rows())
    with caplog.at_level(logging.WARNING, logger="spo_jax.data.tokenize"):
        ds, stats = prepare_dataset(ds_raw, tok, max_length=24)
    logged = [r.getMessage() for r in caplog.records]
    # each reason counted and its first row numbers named
    assert "dropped 2 row(s): empty_response (dataset rows 1, 4)" in logged
    assert "dropped 1 row(s): identical_responses (dataset rows 2)" in logged
    assert "dropped 1 row(s): prompt_too_long (dataset rows 3)" in logged
    assert stats["rows_in"] == 5 and stats["rows_out"] == 1
    assert stats["dropped_empty_response"] == 2
    assert stats["dropped_identical_responses"] == 1
    assert stats["dropped_prompt_too_long"] == 1
    assert list(ds["example_index"]) == [0]
    with pytest.raises(ValueError, match=r"row 1 .*empty_response"):
        prepare_dataset(ds_raw, tok, max_length=24, strict=True)
    with pytest.raises(ValueError, match="no row survived"):
        prepare_dataset(datasets.Dataset.from_list(_bad_rows()[1:4]), tok, max_length=24)


GOOD = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


def _lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def test_data_errors_name_file_line_and_key(tok, tmp_path):
    good = json.dumps(GOOD)
    # a line that is not JSON: file and line (a blank line counts as a line)
    path = _lines(tmp_path / "bad.jsonl", [good, "", good, '{"prompt": "x", "chosen": "a" "rejected": "b"}', good])
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: not valid JSON: Expecting ',' delimiter \(column 31\)"):
        prepare_dataset(path, tok, max_length=24)
    # a torn last line (a writer killed mid-line)
    path = _lines(tmp_path / "torn.jsonl", [good, good, '{"prompt": "x", "cho'])
    with pytest.raises(ValueError, match=r"torn\.jsonl:3: not valid JSON: Unterminated string"):
        prepare_dataset(path, tok, max_length=24)
    # a JSON document (list of rows) with an error on line 3
    (tmp_path / "bad.json").write_text("[\n" + good + ",\n{\"prompt\": oops}\n]")
    with pytest.raises(ValueError, match=r"bad\.json:3: not valid JSON: Expecting value"):
        prepare_dataset(str(tmp_path / "bad.json"), tok, max_length=24)
    # a row without a required key (or with null) is an error naming file:line, row and key -- not a drop
    for i, row in enumerate([{k: v for k, v in GOOD.items() if k != "rejected"}, dict(GOOD, rejected=None)]):
        path = _lines(tmp_path / f"missing{i}.jsonl", [good, "", good, json.dumps(row)])
        with pytest.raises(ValueError, match=rf"missing{i}\.jsonl:4: row 2 has no 'rejected' \(the key is missing "
                                             r"or null\); every 'preference' row needs \['prompt', 'chosen', "):
            prepare_dataset(path, tok, max_length=24)
    # an empty file and bytes that are not UTF-8
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file is empty"):
        prepare_dataset(str(tmp_path / "empty.jsonl"), tok, max_length=24)
    (tmp_path / "latin1.jsonl").write_bytes((good + "\n").encode() + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        prepare_dataset(str(tmp_path / "latin1.jsonl"), tok, max_length=24)


def test_truncation_prompt_left_then_response_right(tok):
    words = [f" w{i}" for i in range(30)]
    prompt = "The sky is" + "".join(words[:12])
    response = "".join(words[12:])
    full_p = tok(prompt)["input_ids"]
    full_r = tok(prompt + response)["input_ids"][len(full_p):] + [tok.eos_token_id]
    min_prompt = len(full_p) - 4  # the prompt fits max_length, but prompt + response does not
    max_length = len(full_p) + 3
    assert len(full_r) > max_length - min_prompt  # both must be cut
    ds, stats = prepare_dataset(datasets.Dataset.from_list([{"prompt": prompt, "completion": response}]), tok,
                                max_length=max_length, min_prompt_length=min_prompt)
    p, r = ds[0]["prompt_ids"], ds[0]["completion_ids"]
    assert stats["truncated_prompt"] == 1 and stats["truncated_response"] == 1
    assert p == [tok.bos_token_id] + full_p[len(full_p) - (min_prompt - 1):]  # BOS kept, tail of the prompt
    assert r == full_r[:max_length - min_prompt]  # head of the response (its EOS cut)
    # only the response needs cutting: the prompt is cut first, but not below its minimum
    ds, stats = prepare_dataset(datasets.Dataset.from_list([{"prompt": "The sky is", "completion": response}]),
                                tok, max_length=max_length, min_prompt_length=min_prompt)
    assert stats["truncated_prompt"] == 0 and stats["truncated_response"] == 1
    assert len(ds[0]["prompt_ids"]) + len(ds[0]["completion_ids"]) == max_length


def test_num_proc_and_cache_give_identical_rows(tok, tmp_path):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TRIPLES] * 4
    path = _write(rows, tmp_path, "jsonl", "mp")
    one, s1 = prepare_dataset(path, tok, max_length=64)
    two, s2 = prepare_dataset(path, tok, max_length=64, num_proc=2)
    assert s1 == s2 and _ids(one, PREF_COLS) == _ids(two, PREF_COLS)
    assert one.cache_files  # file-backed: datasets' map cache lives next to the loaded data
    again, s3 = prepare_dataset(path, tok, max_length=64)  # served from the cache
    assert s3 == s1 and _ids(again, PREF_COLS) == _ids(one, PREF_COLS)
    np.testing.assert_array_equal(again["example_index"], np.arange(len(rows)))


def test_directories_of_files_and_saved_dataset_dicts(tok, tmp_path):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in TRIPLES]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert load_rows(folder, split="train").num_rows == len(rows)
    assert load_rows(folder, split="test").num_rows == 1
    saved = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(saved))
    ds, stats = prepare_dataset(saved, tok, max_length=64, split="test")
    assert stats["rows_out"] == 2
    with pytest.raises(ValueError, match="split='validation'"):
        load_rows(saved, split="validation")
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(tmp_path / "nothing_here.jsonl")
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "rows.txt").write_text("x")
        load_rows(tmp_path / "rows.txt")


def test_split_slices_of_files_saved_dicts_and_directories(tmp_path):
    """``"train[:64]"``-style slices (datasets' split syntax) on every local source; the oracle: Python's
    list slicing of the rows as written."""
    rows = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(10)]
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    saved = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for split, want in (("train[:4]", rows[:4]), ("train[3:6]", rows[3:6]), ("train[-2:]", rows[-2:]),
                        ("train[:30%]", rows[:3]), ("train[90%:]", rows[9:]), ("train[5:2]", []),
                        ("train[:64]", rows), ("train", rows)):
        for source in (path, saved, folder):
            assert load_rows(source, split=split)["prompt"] == [r["prompt"] for r in want], (split, source)
    assert load_rows(path, split="test[:2]")["prompt"] == ["p0", "p1"]  # a file is one split, whatever its name
    for bad in ("train[:a]", "train[1:2:3]", "train+test"):
        with pytest.raises(ValueError, match=r"not a split name with an optional slice; write e\.g\. 'train'"):
            load_rows(path, split=bad)
