"""spo_jax.sampling: the fixed-shape batched path equals models.generate on each prompt alone, prompts
are tokenized exactly as the trainer's data layer does, and pairs follow the scorer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spo_jax import models, sampling
from spo_jax.data import prepare_dataset, synthetic

# one layer: each prompt bucket / cache size compiles its own decode program, and the layers are unrolled
TINY = dict(model_type="llama", vocab_size=len(synthetic.vocabulary()), hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
            eos_token_id=3)


@pytest.fixture(scope="module")
def tok():
    return synthetic.build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return models.create_model(models.ModelConfig.from_hf(TINY), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def rows():
    train, _ = synthetic.make_splits(7, 1, seed=5)
    return train


def test_prompts_match_the_trainers_tokenization(tok, rows):
    import datasets
    for chat in (False, True):
        ds, _ = prepare_dataset(datasets.Dataset.from_list(rows), tok, max_length=128, format="question_answer",
                                use_chat_template=chat, min_prompt_length=8)
        ids = sampling.encode_prompts(tok, sampling.render_prompts(tok, rows, use_chat_template=chat))
        assert ids == [list(p) for p in ds["prompt_ids"]], f"use_chat_template={chat}"
        assert all(p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1 for p in ids)


def _alone(model, prompt, n, key=None, temperature=0.0):
    """Oracle: models.generate on one unpadded prompt, cut after EOS."""
    toks, mask = models.generate(model, jnp.asarray([prompt], jnp.int32), jnp.ones((1, len(prompt)), jnp.int32),
                                 max_new_tokens=n, key=key, temperature=temperature, eos_id=3, pad_id=0)
    return [int(t) for t, m in zip(np.asarray(toks)[0], np.asarray(mask)[0]) if m > 0]


def test_greedy_batched_equals_generate_per_prompt(tok, model, rows):
    ids = sampling.encode_prompts(tok, sampling.render_prompts(tok, rows))
    assert len({len(p) for p in ids}) > 1  # left padding is exercised
    texts, out_ids = sampling.generate_texts(model, tok, ids, max_new_tokens=12, batch_size=3, prompt_width=48,
                                             return_ids=True)
    assert len(texts) == len(rows) and all(len(t) == 1 for t in texts)
    for p, t, got in zip(ids, texts, out_ids):
        want = _alone(model, p, 12)
        assert got[0] == want
        assert t[0] == tok.decode([x for x in want if x != 3], skip_special_tokens=True)


def test_num_samples_repeat_prompts_and_keys_are_reproducible(tok, model, rows):
    ids = sampling.encode_prompts(tok, sampling.render_prompts(tok, rows[:3]))
    key = jax.random.PRNGKey(0)
    a = sampling.generate_texts(model, tok, ids, max_new_tokens=8, key=key, temperature=1.0, num_samples=4,
                                batch_size=5)
    b = sampling.generate_texts(model, tok, ids, max_new_tokens=8, key=key, temperature=1.0, num_samples=4,
                                batch_size=5)
    c = sampling.generate_texts(model, tok, ids, max_new_tokens=8, key=jax.random.PRNGKey(1), temperature=1.0,
                                num_samples=4, batch_size=5)
    assert a == b and a != c
    assert [len(x) for x in a] == [4, 4, 4]
    assert len({s for x in a for s in x}) > 3  # a random model at temperature 1 gives different samples
    with pytest.raises(ValueError, match="key"):
        sampling.generate_texts(model, tok, ids, max_new_tokens=8, temperature=1.0)
    with pytest.raises(ValueError, match="prompt_width"):
        sampling.generate_texts(model, tok, ids, max_new_tokens=8, prompt_width=4)


def test_greedy_last_batch_runs_in_a_smaller_bucket(tok, model, rows, monkeypatch):
    """Greedy: 7 prompts in batches of 4 run as 4 + 4 rows (3 real: the next power of two); sampling keeps
    batch_size rows (a row's draw depends on its batch); both give the per-prompt results."""
    ids = sampling.encode_prompts(tok, sampling.render_prompts(tok, rows))
    shapes = []
    real_generate = models.generate

    def record(model, prompt_ids, prompt_mask, **kw):
        shapes.append(prompt_ids.shape)
        return real_generate(model, prompt_ids, prompt_mask, **kw)
    monkeypatch.setattr(models, "generate", record)
    _, got = sampling.generate_texts(model, tok, ids, max_new_tokens=6, batch_size=4, return_ids=True)
    assert [s[0] for s in shapes] == [4, 4] and all(s[1] == models.prompt_bucket(max(map(len, ids[i:i + 4])))
                                                     for s, i in zip(shapes, (0, 4)))
    assert [g[0] for g in got] == [_alone(model, p, 6) for p in ids]
    shapes.clear()
    sampling.generate_texts(model, tok, ids[:5], max_new_tokens=2, batch_size=4, key=jax.random.PRNGKey(0),
                            temperature=1.0)
    assert [s[0] for s in shapes] == [4, 4]
    shapes.clear()
    sampling.generate_texts(model, tok, ids[:5], max_new_tokens=2, batch_size=4)
    assert [s[0] for s in shapes] == [4, 1]


def test_eos_cuts_the_text_and_stop_ids(tok, model, rows):
    ids = sampling.encode_prompts(tok, sampling.render_prompts(tok, rows[:2]))
    _, full = sampling.generate_texts(model, tok, ids, max_new_tokens=10, eos_id=(), return_ids=True)
    stop = full[0][0][4]  # a token greedy decoding emits at position 4 of row 0
    texts, cut = sampling.generate_texts(model, tok, ids, max_new_tokens=10, stop_ids=[stop], return_ids=True)
    first = full[0][0].index(stop)
    assert cut[0][0] == full[0][0][:first + 1]
    assert texts[0][0] == tok.decode([t for t in full[0][0][:first] if t != 3], skip_special_tokens=True)


def test_sample_pairs_follow_the_scorer(tok, rows, monkeypatch):
    answers = [synthetic.score(r, r["answer"])["answer"] for r in rows]
    fake = []
    for i, r in enumerate(rows):
        a = int(answers[i])
        if i % 3 == 0:  # all correct -> no pair
            fake.append([r["answer"]] * 4)
        elif i % 3 == 1:  # all wrong -> no pair
            fake.append([f"#### {a + 1}", f"#### {a + 2}", "no answer", f"#### {a + 3}"])
        else:
            fake.append([f"1 + 1 = 2 . #### {a}", f"#### {a + 5}", f"#### {a}", "nothing"])
    monkeypatch.setattr(sampling, "generate_texts", lambda *a, **k: fake)
    pairs, stats = sampling.sample_pairs(object(), tok, rows, num_samples=4, max_new_tokens=4,
                                         key=jax.random.PRNGKey(0), score_fn=synthetic.score,
                                         max_pairs_per_question=None)
    qs = sorted({p["question_index"] for p in pairs})
    assert qs == [i for i in range(len(rows)) if i % 3 == 2]
    for p in pairs:
        row = rows[p["question_index"]]
        assert synthetic.score(row, p["chosen"])["correct"] and not synthetic.score(row, p["rejected"])["correct"]
        assert p["chosen"].strip() in fake[p["question_index"]] and p["rejected"].strip() in fake[p["question_index"]]
        assert p["chosen"].startswith(" ") and p["prompt"].startswith("Question: ")
    assert len(pairs) == 4 * len(qs)  # 2 correct x 2 incorrect per mixed question
    correct = np.array([[synthetic.score(r, t)["correct"] for t in f] for r, f in zip(rows, fake)])
    assert stats["sample_accuracy"] == pytest.approx(correct.mean())
    assert stats["pass_at_k"] == pytest.approx(correct.any(1).mean())
    assert stats["questions_with_pair"] == len(qs) and stats["num_pairs"] == len(pairs)


def test_greedy_accuracy_is_the_scored_mean(tok, model, rows):
    res = sampling.greedy_accuracy(model, tok, rows, max_new_tokens=10, batch_size=4, score_fn=synthetic.score)
    want = np.mean([synthetic.score(r, t)["correct"] for r, t in zip(rows, res["texts"])])
    assert res["accuracy"] == pytest.approx(want) and res["num_prompts"] == len(rows)
    with pytest.raises(ValueError, match="question"):
        sampling.render_prompts(tok, [{"q": "x"}])
