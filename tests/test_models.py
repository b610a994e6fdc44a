"""Tests for spo_jax.models (Llama-family and GPT-2 decoder) against transformers' PyTorch models as the oracle.

Each tiny PyTorch model is built from a random config, saved with ``save_pretrained`` once per module
(tmp_path_factory) and loaded with our ``from_pretrained``; logits, generation and checkpoint round trips
are compared with the PyTorch classes in float32.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from spo_jax.models import generation, hf_io
from spo_jax.models import (
    SUPPORTED_MODEL_TYPES,
    ModelConfig,
    ModelPathError,
    apply,
    create_model,
    from_pretrained,
    generate,
    load_tokenizer,
    looks_like_path,
    save_pretrained,
    set_attention,
    set_remat,
    unembedding,
)
from tests.helpers import xla_flags

VOCAB = 101
T = 24  # > 16 = original_max_position_embeddings of the llama3-scaled config
ATOL = 1e-4

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=None, pad_token_id=0)

KINDS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=None, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=24, tie_word_embeddings=False)),  # head_dim != 64 / 4
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, {}),
}
# GPT-2 has its own config names; n_inner != 4 * n_embd checks the mapping
GPT2_COMMON = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96,
                   initializer_range=0.1, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                   bos_token_id=1, eos_token_id=None, pad_token_id=0)
TIED = ("qwen2", "gpt2")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial norms and biases too (HF initialises them to 1 and 0, which would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _build_torch(kind: str, seed: int = 0):
    cfg_cls, model_cls, extra = KINDS[kind]
    torch.manual_seed(seed)
    cfg = cfg_cls(**(GPT2_COMMON if kind == "gpt2" else COMMON), **extra)
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    _randomize(model, seed + 1)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (torch model, directory of its save_pretrained output); each built and saved once."""
    cache = {}

    def get(kind):
        if kind not in cache:
            tm = _build_torch(kind, seed=len(cache))
            d = str(tmp_path_factory.mktemp(f"hf_{kind}"))
            tm.save_pretrained(d)
            cache[kind] = (tm, d)
        return cache[kind]
    return get


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """kind -> our Decoder loaded with from_pretrained from the torch checkpoint."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = from_pretrained(checkpoints(kind)[1])
        return cache[kind]
    return get


def _ids(batch, length, seed):
    return np.random.default_rng(seed).integers(2, VOCAB, size=(batch, length)).astype(np.int64)


def _torch_logits(tm, ids, mask=None):
    with torch.no_grad():
        out = tm(input_ids=torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask))
    return out.logits.float().numpy()


def _our_logits(model, ids, positions=None, segment_ids=None):
    hidden = model(jnp.asarray(ids, jnp.int32), None if positions is None else jnp.asarray(positions, jnp.int32),
                   None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32))
    return np.asarray(model.logits(hidden))


# ----------------------------------------------------------------------------- logits vs transformers


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_match_transformers(kind, checkpoints, loaded):
    tm, _ = checkpoints(kind)
    model = loaded(kind)
    assert model.config.model_type == tm.config.model_type
    assert model.config.tie_word_embeddings == (kind in TIED)
    if kind == "llama3_rope":
        assert dict(model.config.rope_scaling)["rope_type"] == "llama3"
    ids = _ids(3, T, seed=11)

    # no padding
    ref = _torch_logits(tm, ids)
    ours = _our_logits(model, ids)
    assert ours.shape == (3, T, VOCAB) and ours.dtype == np.float32
    assert np.abs(ref).max() > 0.5, "oracle logits are degenerate; the comparison would be weak"
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0, err_msg=f"{kind}: logits differ (no padding)")

    # right padding: torch attention_mask vs our segment_ids (0 on pads); compare real positions only
    lengths = np.array([T, 17, 9])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    ids_p = np.where(mask == 1, ids, 0)
    ref_p = _torch_logits(tm, ids_p, mask)
    ours_p = _our_logits(model, ids_p, segment_ids=mask)
    real = mask.astype(bool)
    err = np.abs(ours_p - ref_p)[real].max()
    assert err < ATOL, f"{kind}: logits differ with right padding (max abs {err:.3g})"


def test_gpt2_left_padding_logits(checkpoints, loaded):
    """Left padding: HF gets the attention mask and position ids counted from the first real token
    (what its generate uses); we get segment_ids = mask and the same positions (learned wpe rows)."""
    tm, _ = checkpoints("gpt2")
    model = loaded("gpt2")
    ids = _ids(3, T, seed=12)
    lengths = np.array([T, 15, 6])
    mask = (np.arange(T)[None] >= T - lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(pos)).logits.numpy()
    ours = _our_logits(model, ids, pos, mask)
    real = mask.astype(bool)
    err = np.abs(ours - ref)[real].max()
    assert err < ATOL, f"gpt2: logits differ with left padding (max abs {err:.3g})"
    # the rows are really shifted: the unpadded row 1 alone gives the same logits as its padded copy
    alone = _our_logits(model, ids[1:2, T - 15:])[0]
    np.testing.assert_allclose(ours[1, T - 15:], alone, atol=1e-5, rtol=0)


def test_gpt2_config_mapping_and_rejections():
    hf = transformers.GPT2Config(**GPT2_COMMON).to_dict()
    cfg = ModelConfig.from_hf(hf)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 4)
    assert (cfg.intermediate_size, cfg.max_position_embeddings, cfg.head_dim) == (96, 64, 16)
    assert (cfg.norm_type, cfg.position_embedding, cfg.hidden_act, cfg.gated_mlp) == ("layer", "learned", "gelu_new",
                                                                                      False)
    assert cfg.tie_word_embeddings and cfg.attention_bias and cfg.attention_out_bias and cfg.mlp_bias
    assert cfg.rms_norm_eps == 1e-5
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    # n_inner=None means 4 * n_embd, as in HF
    assert ModelConfig.from_hf({**hf, "n_inner": None}).intermediate_size == 256
    for bad, field in ((dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
                       (dict(scale_attn_weights=False), "scale_attn_weights"),
                       (dict(add_cross_attention=True), "add_cross_attention"),
                       (dict(activation_function="gelu_10"), "activation_function")):
        with pytest.raises(ValueError, match=field):
            ModelConfig.from_hf({**hf, **bad})
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig.from_hf({k: v for k, v in hf.items() if k != "n_embd"})


def test_gpt2_unprefixed_checkpoint_with_mask_buffers(checkpoints, loaded, tmp_path):
    """Original OpenAI-converted GPT-2 files name tensors without "transformer." and carry attn.bias buffers."""
    tm, d = checkpoints("gpt2")
    shutil.copytree(d, tmp_path / "ck")
    path = str(tmp_path / "ck" / "model.safetensors")
    t = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    t["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(t, path, metadata={"format": "pt"})
    model = from_pretrained(str(tmp_path / "ck"))
    ids = _ids(2, 10, seed=5)
    np.testing.assert_array_equal(_our_logits(model, ids), _our_logits(loaded("gpt2"), ids))


def test_unsupported_model_config_options():
    base = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf({**base, "hidden_act": "gelu_10"})


# ----------------------------------------------------------------------------- checkpoint round trip


def _perturbed_model(cfg: ModelConfig, seed: int):
    """Our model with every parameter random (norm scales near 1), so the export mapping is fully exercised."""
    model = create_model(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    key = jax.random.PRNGKey(seed)
    new = {}
    for i, (path, var) in enumerate(sorted(flat.items(), key=lambda kv: str(kv[0]))):
        k = jax.random.fold_in(key, i)
        noise = jax.random.normal(k, var.shape, jnp.float32)
        base = 1.0 if path[-1] == "scale" else 0.0
        scale = 0.2 if path[-1] in ("scale", "bias") else 0.1
        new[path] = var.replace(base + scale * noise)
    nnx.update(model, nnx.from_flat_state(new))
    return model


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_save_pretrained_loads_in_transformers(kind, checkpoints, tmp_path):
    tm, _ = checkpoints(kind)
    cfg = ModelConfig.from_hf(tm.config.to_dict())
    ours = _perturbed_model(cfg, seed=5)
    save_pretrained(ours, str(tmp_path))
    _, model_cls, _ = KINDS[kind]
    back = model_cls.from_pretrained(str(tmp_path), attn_implementation="eager", dtype=torch.float32).eval()
    ids = _ids(2, 12, seed=3)
    ref = _torch_logits(back, ids)
    np.testing.assert_allclose(_our_logits(ours, ids), ref, atol=ATOL, rtol=0,
                               err_msg=f"{kind}: transformers' logits on our save_pretrained output differ")
    # and our own loader reads it back exactly
    again = from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(_our_logits(again, ids), _our_logits(ours, ids))


def test_sharded_safetensors_load(checkpoints, loaded, tmp_path):
    tm, _ = checkpoints("llama")
    tm.save_pretrained(str(tmp_path), max_shard_size="20KB")
    files = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(files) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json"), files
    model = from_pretrained(str(tmp_path))
    ids = _ids(2, 10, seed=4)
    np.testing.assert_allclose(_our_logits(model, ids), _torch_logits(tm, ids), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_packed_row_equals_separate_sequences(kind, loaded):
    model = loaded(kind)
    a, b = _ids(1, 7, seed=21)[0], _ids(1, 9, seed=22)[0]
    L = 20  # 16 real tokens + 4 pads with segment 0
    ids = np.zeros((1, L), np.int64)
    ids[0, :7], ids[0, 7:16] = a, b
    seg = np.zeros((1, L), np.int64)
    seg[0, :7], seg[0, 7:16] = 1, 2
    pos = np.zeros((1, L), np.int64)
    pos[0, :7], pos[0, 7:16] = np.arange(7), np.arange(9)
    packed = _our_logits(model, ids, pos, seg)[0]
    sep_a = _our_logits(model, a[None])[0]
    sep_b = _our_logits(model, b[None])[0]
    np.testing.assert_allclose(packed[:7], sep_a, atol=1e-5, rtol=0, err_msg="first packed segment differs")
    np.testing.assert_allclose(packed[7:16], sep_b, atol=1e-5, rtol=0, err_msg="second packed segment differs")


# ----------------------------------------------------------------------------- functional boundary


def _scalar_loss(graphdef, params, ids, seg):
    hidden = apply(graphdef, params, ids, None, seg)
    w, _ = unembedding(graphdef, params)
    logits = jnp.einsum("btd,dv->btv", hidden, w)
    lp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.roll(ids, -1, axis=1)
    return -jnp.mean(jnp.take_along_axis(lp, tgt[..., None], axis=-1))


def test_grad_through_apply_jit_scan_and_remat(loaded):
    model = loaded("qwen2")  # tied embeddings: unembedding and embed share one parameter
    ids = jnp.asarray(_ids(2, 10, seed=8), jnp.int32)
    seg = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)
    graphdef, params = nnx.split(model)

    loss_and_grad = jax.jit(jax.value_and_grad(_scalar_loss, argnums=1), static_argnums=0)
    val, g = loss_and_grad(graphdef, params, ids, seg)
    assert np.isfinite(float(val))
    assert jax.tree.structure(g) == jax.tree.structure(params)
    gnorms = [float(jnp.linalg.norm(x)) for x in jax.tree.leaves(g)]
    assert all(np.isfinite(gnorms)) and min(gnorms) > 0, "some parameter received no gradient"

    # oracle: central finite difference along a random direction
    leaves, treedef = jax.tree.flatten(params)
    dirs = [jax.random.normal(jax.random.PRNGKey(i), x.shape, x.dtype) for i, x in enumerate(leaves)]
    direction = jax.tree.unflatten(treedef, dirs)
    eps = 5e-4  # the direction is O(1) per element while weights are O(0.1): keep the step small
    f = jax.jit(_scalar_loss, static_argnums=0)
    plus = f(graphdef, jax.tree.map(lambda p, d: p + eps * d, params, direction), ids, seg)
    minus = f(graphdef, jax.tree.map(lambda p, d: p - eps * d, params, direction), ids, seg)
    fd = float(plus - minus) / (2 * eps)
    analytic = sum(float(jnp.vdot(a, d)) for a, d in zip(jax.tree.leaves(g), dirs))
    assert abs(fd - analytic) <= 1e-2 * abs(analytic) + 1e-3, (fd, analytic)

    # inside lax.scan: two SGD steps equal the same two steps in Python
    def sgd(p, _):
        v, gr = jax.value_and_grad(_scalar_loss, argnums=1)(graphdef, p, ids, seg)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, gr), v
    p_scan, vals = jax.jit(lambda p: jax.lax.scan(sgd, p, None, length=2))(params)
    p_loop = params
    for step in range(2):
        v, gr = loss_and_grad(graphdef, p_loop, ids, seg)
        np.testing.assert_allclose(float(vals[step]), float(v), rtol=1e-5)
        p_loop = jax.tree.map(lambda a, b: a - 0.1 * b, p_loop, gr)
    for a, b in zip(jax.tree.leaves(p_scan), jax.tree.leaves(p_loop)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    assert float(vals[1]) < float(vals[0])

    # remat: same value and gradients
    rm = nnx.merge(graphdef, params)
    set_remat(rm, True)
    graphdef_r, params_r = nnx.split(rm)
    jaxpr = str(jax.make_jaxpr(lambda p: _scalar_loss(graphdef_r, p, ids, seg))(params_r))
    assert "remat" in jaxpr or "checkpoint" in jaxpr, "set_remat(model, True) did not insert a remat"
    assert "remat" not in str(jax.make_jaxpr(lambda p: _scalar_loss(graphdef, p, ids, seg))(params))
    val_r, g_r = loss_and_grad(graphdef_r, params_r, ids, seg)
    np.testing.assert_allclose(float(val_r), float(val), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def prompts():
    lengths = np.array([5, 8, 3])
    Tp = int(lengths.max())
    mask = (np.arange(Tp)[None] >= Tp - lengths[:, None]).astype(np.int64)  # left padding
    ids = np.where(mask == 1, _ids(3, Tp, seed=31), 0)
    return ids, mask


@pytest.fixture(scope="module")
def greedy(loaded, prompts):
    ids, mask = prompts
    toks, m = generate(loaded("llama"), ids, mask, max_new_tokens=20)
    return np.asarray(toks), np.asarray(m)


def _hf_greedy(tm, ids, mask, max_new, eos=None, pad=0):
    """transformers' greedy continuation, right-filled with ``pad`` to ``max_new`` (it stops early when all
    rows reached EOS)."""
    tm.generation_config.eos_token_id = eos
    tm.generation_config.pad_token_id = pad
    with torch.no_grad():
        out = tm.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                          max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=pad)


def test_dot_product_attention_implementation(checkpoints, loaded, prompts, greedy):
    """set_attention(model, "xla") (jax.nn.dot_product_attention): the same logits as transformers (GQA with
    biases and tied embeddings: qwen2), the same packed-row segments, the same gradients as the einsum
    default, and the same greedy tokens over a left-padded KV cache."""
    tm, _ = checkpoints("qwen2")
    graphdef, params = nnx.split(loaded("qwen2"))
    m = nnx.merge(graphdef, params)  # new module objects: the shared fixture keeps its einsum attention
    set_attention(m, "xla")
    assert all(layer.attn.implementation == "xla" for layer in m.layers)
    ids = _ids(2, T, seed=3)
    np.testing.assert_allclose(_our_logits(m, ids), _torch_logits(tm, ids), atol=ATOL, rtol=0)
    a, b = _ids(1, 7, seed=21)[0], _ids(1, 9, seed=22)[0]
    packed_ids, seg, pos = np.zeros((1, 20), np.int64), np.zeros((1, 20), np.int64), np.zeros((1, 20), np.int64)
    packed_ids[0, :7], packed_ids[0, 7:16], seg[0, :7], seg[0, 7:16] = a, b, 1, 2
    pos[0, :7], pos[0, 7:16] = np.arange(7), np.arange(9)
    packed = _our_logits(m, packed_ids, pos, seg)[0]
    np.testing.assert_allclose(packed[:7], _torch_logits(tm, a[None])[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(packed[7:16], _torch_logits(tm, b[None])[0], atol=ATOL, rtol=0)
    graphdef_x, params_x = nnx.split(m)
    grad = jax.jit(jax.value_and_grad(_scalar_loss, argnums=1), static_argnums=0)
    pid, pseg = jnp.asarray(packed_ids, jnp.int32), jnp.asarray(seg, jnp.int32)
    (v_e, g_e), (v_x, g_x) = grad(graphdef, params, pid, pseg), grad(graphdef_x, params_x, pid, pseg)
    np.testing.assert_allclose(float(v_x), float(v_e), rtol=1e-6)
    for x, e in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_e)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(e), atol=1e-6, rtol=1e-5)
    llama = nnx.merge(*nnx.split(loaded("llama")))
    set_attention(llama, "xla")
    np.testing.assert_array_equal(np.asarray(generate(llama, *prompts, max_new_tokens=20)[0]), greedy[0])
    with pytest.raises(ValueError, match="must be one of"):
        set_attention(llama, "flash")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_matches_transformers(kind, checkpoints, loaded, prompts, greedy):
    tm, _ = checkpoints(kind)
    ids, mask = prompts
    ref = _hf_greedy(tm, ids, mask, 20)
    toks, m = greedy if kind == "llama" else map(np.asarray, generate(loaded(kind), ids, mask, max_new_tokens=20))
    assert toks.shape == (3, 20) and toks.dtype == np.int32
    np.testing.assert_array_equal(m, np.ones((3, 20), np.float32))
    np.testing.assert_array_equal(toks, ref, err_msg=f"{kind}: greedy tokens differ from transformers' generate")


def test_generation_stops_on_any_of_several_eos_ids(checkpoints, prompts, greedy, tmp_path):
    """A config eos_token_id list (Llama 3.x) is kept whole: generate(eos_id=None) stops at ANY of them,
    as transformers' generate does with the same list."""
    tm, d = checkpoints("llama")
    ids, mask = prompts
    toks, _ = greedy
    eos = [int(toks[1, 3]), int(toks[2, 9])]  # tokens rows 1 and 2 emit; row 0 may hit either or neither
    pad = next(t for t in range(2, VOCAB) if t not in eos)
    shutil.copytree(d, tmp_path / "ck")
    cfg = json.load(open(tmp_path / "ck" / "config.json"))
    cfg["eos_token_id"] = eos
    json.dump(cfg, open(tmp_path / "ck" / "config.json", "w"))
    model = from_pretrained(str(tmp_path / "ck"))
    assert model.config.eos_token_id == tuple(eos) and model.config.to_hf()["eos_token_id"] == eos
    out, m = map(np.asarray, generate(model, ids, mask, max_new_tokens=20, pad_id=pad))
    for r in range(3):
        hits = np.nonzero(np.isin(toks[r], eos))[0]
        stop = int(hits[0]) + 1 if hits.size else 20
        np.testing.assert_array_equal(out[r, :stop], toks[r, :stop])
        np.testing.assert_array_equal(out[r, stop:], pad, err_msg=f"row {r}: no stop at the first EOS id")
        np.testing.assert_array_equal(m[r], (np.arange(20) < stop).astype(np.float32))
    assert m[1].sum() <= 4 and m[2].sum() <= 10
    np.testing.assert_array_equal(out, _hf_greedy(tm, ids, mask, 20, eos=eos, pad=pad),
                                  err_msg="differs from transformers' generate with the same eos list")
    # an explicit list behaves the same, and () disables stopping
    np.testing.assert_array_equal(np.asarray(generate(model, ids, mask, max_new_tokens=20, eos_id=eos,
                                                      pad_id=pad)[0]), out)
    np.testing.assert_array_equal(np.asarray(generate(model, ids, mask, max_new_tokens=20, eos_id=())[0]), toks)


def test_generation_eos_then_pad(loaded, prompts, greedy):
    ids, mask = prompts
    toks, _ = greedy
    eos = int(toks[0, 6])  # a token greedy decoding emits in row 0
    pad = 99 if eos != 99 else 98
    out, m = generate(loaded("llama"), ids, mask, max_new_tokens=20, eos_id=eos, pad_id=pad)
    out, m = np.asarray(out), np.asarray(m)
    for r in range(3):
        hits = np.nonzero(toks[r] == eos)[0]
        stop = int(hits[0]) + 1 if hits.size else 20  # EOS itself is kept with mask 1
        np.testing.assert_array_equal(out[r, :stop], toks[r, :stop], err_msg=f"row {r} before EOS")
        np.testing.assert_array_equal(m[r, :stop], 1.0)
        np.testing.assert_array_equal(out[r, stop:], pad, err_msg=f"row {r} after EOS must be pad")
        np.testing.assert_array_equal(m[r, stop:], 0.0, err_msg=f"row {r} mask after EOS must be 0")
    assert m[0, 7:].sum() == 0 and m[0, :7].sum() == 7


def test_prefill_packs_distinct_prompts_once(loaded, prompts, greedy):
    """The prefill computes each distinct prompt once, packed without padding, and a batch with repeated
    prompts generates what each prompt generates alone (here: the transformers-checked greedy rows)."""
    ids, mask = prompts
    rep = [0, 1, 0, 2, 1, 0]
    pack = generation.pack_prompts(ids[rep], mask[rep])
    lengths = mask.sum(1)
    assert pack.ids.shape == (1, 32) and (pack.segments > 0).sum() == lengths.sum()  # 16 tokens, one row
    flat = pack.ids.reshape(-1)
    for b, r in enumerate(rep):
        real = ids[r][mask[r] == 1]
        n = len(real)
        np.testing.assert_array_equal(flat[pack.src[b, -n:]], real)
        np.testing.assert_array_equal(pack.kv_mask[b], np.arange(8) >= 8 - n)  # right-aligned at Tp = 8
        np.testing.assert_array_equal(pack.positions.reshape(-1)[pack.src[b, -n:]], np.arange(n))
        assert pack.last[b] == pack.src[b, -1] and pack.lengths[b] == n
    assert len({(pack.src[b, -1]) for b in range(6)}) == 3  # repeats share their packed tokens
    toks, m = map(np.asarray, generate(loaded("llama"), ids[rep], mask[rep], max_new_tokens=20))
    np.testing.assert_array_equal(toks, greedy[0][rep])
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        generation.pack_prompts(ids[:2], np.stack([mask[0], 0 * mask[1]]))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2_window"])
def test_shared_prompt_prefix_is_prefilled_once(kind, checkpoints, loaded, tmp_path):
    """Prompts that share their first tokens (a chat template's system turn): the shared prefix is prefilled
    once, the rest of each distinct prompt packed, and greedy decoding gives transformers' tokens (prompts
    of several lengths, one repeated; on windowed layers the window counts positions across the prefix)."""
    if kind == "qwen2_window":
        tm = _windowed_torch("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
        tm.save_pretrained(str(tmp_path / "hf"))
        model = from_pretrained(str(tmp_path / "hf"))
    else:
        tm, model = checkpoints(kind)[0], loaded(kind)
    shared = _ids(1, 19, seed=41)[0]
    rows = [np.concatenate([shared, _ids(1, n, seed=42 + n)[0]]) for n in (3, 6, 1, 3)]  # rows 0 and 3 equal
    Tp = max(map(len, rows))
    ids, mask = np.zeros((4, Tp), np.int64), np.zeros((4, Tp), np.int64)
    for b, r in enumerate(rows):
        ids[b, Tp - len(r):], mask[b, Tp - len(r):] = r, 1
    pack = generation.pack_prompts(ids, mask)
    np.testing.assert_array_equal(pack.prefix, shared[:16])  # >= 19 shared tokens, rounded down to 8s: 16
    assert (pack.segments > 0).sum() == sum(len(r) - 16 for r in rows[:3])  # each distinct prompt's rest once
    assert len(generation.pack_prompts(ids, mask, prefix_multiple=0).prefix) == 0
    toks = np.asarray(generate(model, ids, mask, max_new_tokens=12, eos_id=())[0])
    np.testing.assert_array_equal(toks, _hf_greedy(tm, ids, mask, 12), err_msg=f"{kind}: shared-prefix prefill")
    np.testing.assert_array_equal(toks[0], toks[3])


def test_sampling_deterministic_and_topk1_is_greedy(loaded, prompts, greedy):
    model = loaded("llama")
    ids, mask = prompts
    kw = dict(max_new_tokens=20, temperature=1.0)
    a = np.asarray(generate(model, ids, mask, key=jax.random.PRNGKey(3), **kw)[0])
    b = np.asarray(generate(model, ids, mask, key=jax.random.PRNGKey(3), **kw)[0])
    c = np.asarray(generate(model, ids, mask, key=jax.random.PRNGKey(4), **kw)[0])
    np.testing.assert_array_equal(a, b, err_msg="sampling with the same key is not deterministic")
    assert (a != c).any(), "different keys gave identical samples over 60 tokens"
    assert ((a >= 0) & (a < VOCAB)).all()
    k1 = np.asarray(generate(model, ids, mask, key=jax.random.PRNGKey(5), max_new_tokens=20,
                             temperature=0.7, top_k=1)[0])
    np.testing.assert_array_equal(k1, greedy[0], err_msg="top_k=1 sampling differs from greedy")
    p0 = np.asarray(generate(model, ids, mask, key=jax.random.PRNGKey(6), max_new_tokens=20,
                             temperature=1.0, top_p=1e-6)[0])
    np.testing.assert_array_equal(p0, greedy[0], err_msg="top_p->0 sampling differs from greedy")


@pytest.fixture
def decode_calls(monkeypatch):
    """Records (cache slots, steps run, rows computed) of every compiled decode chunk ``generate`` runs."""
    calls = []
    original = generation._decode_jit

    def record(*args):
        out = original(*args)
        calls.append((args[2][1][0].shape[2], int(out[7]), args[2][1][0].shape[0]))  # values [B, KV, S, hd]
        return out
    monkeypatch.setattr(generation, "_decode_jit", record)
    return calls


def test_greedy_across_chunks_and_cache_growth_matches_transformers(checkpoints, loaded, prompts, decode_calls,
                                                                    monkeypatch):
    """Chunks of 8 steps and a cache that grows 16 -> 24 -> 32 -> 48 slots give transformers' greedy tokens."""
    monkeypatch.setattr(generation, "DECODE_CHUNK", 8)
    tm, _ = checkpoints("llama")
    ids, mask = prompts
    toks, m = generate(loaded("llama"), ids, mask, max_new_tokens=30, eos_id=())
    np.testing.assert_array_equal(np.asarray(toks), _hf_greedy(tm, ids, mask, 30))
    assert np.asarray(m).all()
    assert sum(c[1] for c in decode_calls) == 30 and max(c[1] for c in decode_calls) <= 8
    assert sorted({c[0] for c in decode_calls}) == [16, 24, 32, 48], decode_calls  # Tp=8: slots 8..37


def test_generation_stops_computing_when_every_row_is_done(loaded, prompts, greedy, decode_calls):
    ids, mask = prompts
    g = greedy[0]
    eos = {int(t) for t in g[:, 1]}  # every row ends at its 1st or 2nd token
    ends = [next(j for j, t in enumerate(row) if t in eos) + 1 for row in g]
    toks, m = generate(loaded("llama"), ids, mask, max_new_tokens=200, eos_id=tuple(eos))
    assert sum(c[1] for c in decode_calls) == max(ends), decode_calls
    for r, end in enumerate(ends):
        np.testing.assert_array_equal(np.asarray(toks)[r, :end], g[r, :end])
        assert (np.asarray(toks)[r, end:] == 0).all() and np.asarray(m)[r].sum() == end


def test_finished_rows_leave_the_batch(checkpoints, loaded, prompts, greedy, decode_calls, monkeypatch):
    """Between chunks, finished rows stop being computed (3 rows -> 2 -> 1 here) and greedy still equals
    transformers' generate with the same stop ids (sampling: test_sampling_key_chain_across_chunks)."""
    monkeypatch.setattr(generation, "DECODE_CHUNK", 4)
    tm, _ = checkpoints("llama")
    ids, mask = prompts
    toks = greedy[0]
    # stop ids that end row 1 within the first chunk, row 2 within the second and row 0 never
    a = next(int(t) for t in toks[1, :4] if t not in toks[0, :12] and t not in toks[2, :8])
    b = next(int(t) for t in toks[2, 4:8] if t not in toks[0, :12] and t not in toks[2, :4] and t != a)
    eos = [a, b]
    pad = next(t for t in range(2, VOCAB) if t not in eos)
    out = np.asarray(generate(loaded("llama"), ids, mask, max_new_tokens=12, eos_id=eos, pad_id=pad)[0])
    np.testing.assert_array_equal(out, _hf_greedy(tm, ids, mask, 12, eos=eos, pad=pad))
    # a chunk ends at the step a row finishes (the next one computes the 2 or 1 rows left)
    stops = sorted(int(np.argmax(np.isin(toks[r], eos))) + 1 for r in (1, 2))
    computed = [c[2] for c in decode_calls]
    assert computed == sorted(computed, reverse=True) and set(computed) == {3, 2, 1}, decode_calls
    assert sum(c[1] for c in decode_calls if c[2] == 3) == stops[0], decode_calls
    assert sum(c[1] for c in decode_calls if c[2] >= 2) == stops[1], decode_calls

    class Compiling:  # a fewer rows' program still compiling at the first look, done at the next
        def __init__(self):
            self.looks = 0

        def is_alive(self):
            self.looks += 1
            return self.looks == 1

        def join(self):
            pass
    monkeypatch.setattr(generation, "_precompile_decode", lambda *a: Compiling())
    decode_calls.clear()
    held = np.asarray(generate(loaded("llama"), ids, mask, max_new_tokens=12, eos_id=eos, pad_id=pad)[0])
    np.testing.assert_array_equal(held, out)
    # the 3 rows run one more (full) chunk while the 2 rows' program compiles, then the batch shrinks
    assert [c[2] for c in decode_calls][:2] == [3, 3] and decode_calls[1][1] == 4, decode_calls
    assert 2 in [c[2] for c in decode_calls], decode_calls


def test_budgets_and_prompt_widths_share_compiled_programs(loaded, prompts):
    """Budgets within one cache bucket and prompt widths share the decode program; the budget is traced."""
    ids, mask = prompts
    model = loaded("llama")
    for n in (3, 16):  # Tp=8: caches of 16 and 24 slots
        generate(model, ids, mask, max_new_tokens=n, eos_id=())
    before = generation._decode_jit._cache_size()
    for n in (4, 8, 9, 13):
        generate(model, ids, mask, max_new_tokens=n, eos_id=())
    wider = np.pad(ids, ((0, 0), (4, 0))), np.pad(mask, ((0, 0), (4, 0)))  # Tp 8 -> 12: same 24-slot cache
    np.testing.assert_array_equal(np.asarray(generate(model, *wider, max_new_tokens=12, eos_id=())[0]),
                                  np.asarray(generate(model, ids, mask, max_new_tokens=12, eos_id=())[0]))
    for t in (0.7, 1.3):  # the temperature is traced: sampling runs greedy's programs
        generate(model, ids, mask, max_new_tokens=16, eos_id=(), key=jax.random.PRNGKey(0), temperature=t)
    assert generation._decode_jit._cache_size() == before


def test_row_levels():
    """The row counts a job computes as its rows finish (compact_size) and where a chunk ends (next_size)."""
    assert generation.row_levels(32) == (32, 24, 16, 8) and generation.row_levels(8) == (8, 4, 2)
    assert generation.row_levels(3) == (3, 2, 1)
    assert [generation.compact_size(n, 32) for n in (32, 25, 24, 17, 16, 9, 8, 1)] == [32, 32, 24, 24, 16, 16, 8, 8]
    assert [generation.next_size(n, 32) for n in (32, 24, 16, 8)] == [24, 16, 8, 0]


def test_compact_slots():
    """A compacted batch's cache: grown at the compaction when the next chunk would not fit, sized for the
    rest of the budget at the last row level when that is one growth away, never shrunk. (SmolLM2's
    benchmark batch: 32 rows, prompts up to 145 tokens, 256 new tokens, chunks of 32.)"""
    cs = generation.compact_slots
    assert cs(256, 145 + 70, 186, 32, 24, 32) == 256  # 41 free slots hold the next chunk: keep
    assert cs(256, 145 + 107, 149, 32, 24, 32) == 384  # 4 free: grow now, not after a (24, 256) program's 4 steps
    assert cs(384, 145 + 140, 116, 32, 16, 32) == 384  # room for a chunk, not the last level: keep
    assert cs(384, 145 + 200, 56, 32, 8, 32) == 512  # last level: 401 tokens at most, one growth away
    assert cs(384, 145 + 200, 30, 32, 8, 32) == 384  # ... the whole budget fits
    assert cs(384, 300, 700, 32, 8, 32) == 384  # ... the whole budget is two growths away: grow as needed
    assert cs(512, 100, 10, 32, 8, 32) == 512  # never shrinks


def test_argmax_is_jnp_argmax():
    """generation._argmax (two vectorised reductions) picks jnp.argmax's index: the first maximum."""
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 300)).at[1, 7].set(9.0).at[1, 200].set(9.0)
    x = x.at[2].set(-jnp.inf).at[2, 5].set(0.0).at[3].set(1.0).at[4, :150].set(-jnp.inf)
    np.testing.assert_array_equal(np.asarray(generation._argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))
    assert int(generation._argmax(x)[1]) == 7 and int(generation._argmax(x)[3]) == 0


def test_decode_programs_compile_ahead_once(monkeypatch):
    """Decode programs compile in a background thread (the first during the prefill, the grown cache's during
    the chunk that fills the cache), once each: the calls find them compiled (the default on an accelerator;
    the tokens are the same executables', wherever they compiled)."""
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=64, hidden_size=24, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0))
    model = create_model(cfg, rngs=nnx.Rngs(1))  # a graphdef no other test compiles
    ids = np.asarray([[5, 6, 7, 8, 9, 10, 11, 12]], np.int32)
    compiles, started = [], []
    main = threading.current_thread()

    def listen(event, secs, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and kw.get("fun_name") == "jit(_decode_jit)":
            compiles.append(threading.current_thread() is main)
    jax.monitoring.register_event_duration_secs_listener(listen)
    monkeypatch.setattr(generation, "DECODE_CHUNK", 32)
    monkeypatch.setattr(generation, "BACKGROUND_COMPILE", True)  # the default on an accelerator (CPU: False)
    real = generation._precompile_decode
    monkeypatch.setattr(generation, "_precompile_decode", lambda *a: started.append(a[4:6]) or real(*a))
    toks = np.asarray(generate(model, ids, np.ones_like(ids), max_new_tokens=60, eos_id=())[0])
    assert started == [(1, 48), (1, 96)], started  # Tp = 8: 48 slots, then 96 from step 40
    assert compiles == [False, False], compiles  # two programs, each compiled once, off the main thread
    generate(model, ids, np.ones_like(ids), max_new_tokens=60, eos_id=())
    assert len(started) == 4 and len(compiles) == 2  # known programs are not compiled again
    assert toks.shape == (1, 60)
    jax.monitoring.unregister_event_duration_listener(listen)


_EXIT_WHILE_COMPILING = """
import time
import jax.numpy as jnp, jax
from flax import nnx
from spo_jax import models
from spo_jax.models import generation
cfg = models.ModelConfig.from_hf(dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
model = models.create_model(cfg, rngs=nnx.Rngs(0))
g, p = nnx.split(model)
generation.BACKGROUND_COMPILE = True
t = generation._precompile_decode(model, g, p, jax.random.PRNGKey(0), 2, 64, 32, 2, (jnp.float32(0), 0, 1.0, (2,), 0))
time.sleep(0.5)  # past tracing: into XLA's compile (~1.5 s for 30 layers)
print(t.is_alive())
"""


def test_exit_while_a_decode_program_compiles_in_the_background():
    """A process may end while a background compile runs (a prefetched program its last generate did not
    need): the interpreter waits for it; exiting during an XLA compile would abort the process."""
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    proc = subprocess.run([sys.executable, "-c", _EXIT_WHILE_COMPILING], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", (proc.returncode, proc.stdout, proc.stderr[-2000:])


def _resampled_without_cache(model, ids, mask, n, key, temperature):
    """Oracle for the sampling semantics: the key chain ``key, sub = split(key)`` per step, each step's
    batch drawn with ``categorical(sub, logits / T)`` from a full forward over the sequence so far (no cache,
    no chunks); rows stop at nothing (eos_id=()). The sequence lives in a fixed [B, Tp + n] buffer whose
    unfilled tail is padding (segment 0) that causal attention never lets a filled position see, so one
    compiled forward serves every step."""
    B, Tp = ids.shape
    seq = jnp.zeros((B, Tp + n), jnp.int32).at[:, :Tp].set(jnp.asarray(ids, jnp.int32))
    m = jnp.zeros((B, Tp + n), jnp.int32).at[:, :Tp].set(jnp.asarray(mask, jnp.int32))
    graphdef, params = nnx.split(model)

    @jax.jit
    def last_logits(params, seq, m, t):
        model = nnx.merge(graphdef, params)
        pos = jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)
        return model.logits(jax.lax.dynamic_slice_in_dim(model(seq, pos, m), t, 1, axis=1))[:, 0]

    out = []
    for i in range(n):
        key, sub = jax.random.split(key)
        tok = jax.random.categorical(sub, last_logits(params, seq, m, Tp + i - 1) / temperature,
                                     axis=-1).astype(jnp.int32)
        out.append(tok)
        seq, m = seq.at[:, Tp + i].set(tok), m.at[:, Tp + i].set(1)
    return np.stack(out, 1)


def test_sampling_key_chain_across_chunks(loaded, prompts, decode_calls, monkeypatch):
    """Sampled tokens follow the documented key chain whatever the chunking, cache growth and rows that
    leave the batch."""
    monkeypatch.setattr(generation, "DECODE_CHUNK", 4)
    ids, mask = prompts
    key = jax.random.PRNGKey(11)
    got = np.asarray(generate(loaded("llama"), ids, mask, max_new_tokens=14, key=key, temperature=1.0,
                              eos_id=())[0])
    np.testing.assert_array_equal(got, _resampled_without_cache(loaded("llama"), ids, mask, 14, key, 1.0))
    # with stop ids, finished rows leave the batch (3 -> 2 -> 1 rows); every row still draws its tokens
    # of the run above up to its stop
    eos = [int(got[1, 1]), int(got[2, 5])]
    pad = next(t for t in range(2, VOCAB) if t not in eos)
    decode_calls.clear()
    out, m = map(np.asarray, generate(loaded("llama"), ids, mask, max_new_tokens=14, key=key, temperature=1.0,
                                      eos_id=eos, pad_id=pad))
    assert min(c[2] for c in decode_calls) < 3, decode_calls
    for r in range(3):
        hits = np.nonzero(np.isin(got[r], eos))[0]
        stop = int(hits[0]) + 1 if hits.size else 14
        np.testing.assert_array_equal(out[r, :stop], got[r, :stop], err_msg=f"row {r}")
        np.testing.assert_array_equal(out[r, stop:], pad)
        np.testing.assert_array_equal(m[r], (np.arange(14) < stop).astype(np.float32))


def test_generate_rejects_bad_settings(loaded, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(loaded("llama"), ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(loaded("llama"), ids, mask, max_new_tokens=2, temperature=1.0, top_p=0.0)


# ----------------------------------------------------------------------------- errors


def test_unsupported_model_type_lists_supported(checkpoints, tmp_path):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf({"model_type": "falcon", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
                             "num_hidden_layers": 1, "num_attention_heads": 2})
    msg = str(e.value)
    assert "falcon" in msg and all(t in msg for t in SUPPORTED_MODEL_TYPES), msg
    # the same through from_pretrained on a directory
    _, d = checkpoints("llama")
    shutil.copytree(d, tmp_path / "ck")
    cfg = json.load(open(tmp_path / "ck" / "config.json"))
    cfg["model_type"] = "falcon"
    json.dump(cfg, open(tmp_path / "ck" / "config.json", "w"))
    with pytest.raises(ValueError, match="falcon"):
        from_pretrained(str(tmp_path / "ck"))


def _tampered(checkpoints, tmp_path, edit):
    _, d = checkpoints("llama")
    out = tmp_path / "ck"
    shutil.copytree(d, out)
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(out)


def test_missing_weight(checkpoints, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    d = _tampered(checkpoints, tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match="missing") as e:
        from_pretrained(d)
    assert name in str(e.value) and d in str(e.value)


def test_extra_weight(checkpoints, tmp_path):
    name = "model.layers.0.self_attn.q_proj.bias"
    d = _tampered(checkpoints, tmp_path, lambda t: t.__setitem__(name, np.zeros(64, np.float32)))
    with pytest.raises(ValueError, match="unexpected") as e:
        from_pretrained(d)
    assert name in str(e.value) and d in str(e.value)


def test_shape_mismatch(checkpoints, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    d = _tampered(checkpoints, tmp_path, lambda t: t.__setitem__(name, np.zeros((64, 95), np.float32)))
    with pytest.raises(ValueError, match="shape") as e:
        from_pretrained(d)
    msg = str(e.value)
    assert name in msg and "layers/0/mlp/down_proj/kernel" in msg and d in msg, msg


def test_missing_config_json(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------- sliding-window attention


def _windowed_torch(kind: str, **window):
    """A tiny Qwen2 / Qwen3 torch model with the given window settings (2 layers, so a window on layer 1
    only differs from a window on both)."""
    cfg_cls, model_cls, extra = KINDS[kind]
    torch.manual_seed(7)
    cfg = cfg_cls(**COMMON, **extra, **window)
    cfg._attn_implementation = "eager"
    tm = model_cls(cfg).eval()
    _randomize(tm, 8)
    return tm


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_sliding_window_layers_match_transformers(kind, tmp_path):
    """transformers windows only the layers at or above ``max_window_layers`` when ``use_sliding_window``;
    import, generation and export must keep exactly that (the export keeps ``use_sliding_window``)."""
    tm = _windowed_torch(kind, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert tm.config.layer_types == ["full_attention", "sliding_attention"]
    tm.save_pretrained(str(tmp_path / "hf"))
    ours = from_pretrained(str(tmp_path / "hf"))
    ids = _ids(2, 12, seed=5)
    ref = _torch_logits(tm, ids)
    full = _torch_logits(_windowed_torch(kind), ids)  # same weights, no window: the window must matter
    assert np.abs(full - ref).max() > 10 * ATOL
    np.testing.assert_allclose(_our_logits(ours, ids), ref, atol=ATOL, rtol=0,
                               err_msg=f"{kind}: windowed layers differ from transformers'")

    lengths = np.array([5, 8])
    pmask = (np.arange(8)[None] >= 8 - lengths[:, None]).astype(np.int64)
    pids = np.where(pmask == 1, ids[:, :8], 0)
    toks, _ = generate(ours, pids, pmask, max_new_tokens=10, eos_id=())
    np.testing.assert_array_equal(np.asarray(toks), _hf_greedy(tm, pids, pmask, 10),
                                  err_msg=f"{kind}: windowed greedy generation differs from transformers'")

    save_pretrained(ours, str(tmp_path / "ours"))
    exported = json.load(open(tmp_path / "ours" / "config.json"))
    assert exported["use_sliding_window"] is True and exported["sliding_window"] == 4
    _, model_cls, _ = KINDS[kind]
    back = model_cls.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager", dtype=torch.float32)
    assert back.config.layer_types == tm.config.layer_types
    np.testing.assert_allclose(_torch_logits(back.eval(), ids), ref, atol=ATOL, rtol=0,
                               err_msg=f"{kind}: our export reloads in transformers with other attention")


def test_mistral_full_attention_export_reloads_without_window(tmp_path):
    """Mistral with ``sliding_window=None`` is full attention; transformers fills a missing field with 4096,
    so the export must write null. Checked on a sequence longer than 4096 (a 1-layer model, cheap)."""
    cfg = ModelConfig.from_hf(dict(model_type="mistral", vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=8192, sliding_window=None))
    assert cfg.sliding_window is None
    ours = _perturbed_model(cfg, seed=2)
    save_pretrained(ours, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["sliding_window"] is None
    back = transformers.MistralForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    assert back.config.sliding_window is None
    # with the 4096 window transformers would fill in, positions >= 4096 differ by ~1e-3 here (> ATOL)
    ids = _ids(1, 4100, seed=9)
    np.testing.assert_allclose(_our_logits(ours, ids)[:, 4090:], _torch_logits(back, ids)[:, 4090:], atol=ATOL,
                               rtol=0, err_msg="mistral: logits past position 4096 differ after the export")


def test_window_config_defaults_follow_transformers():
    """A Mistral config without ``sliding_window`` gets transformers' default window; Qwen without
    ``use_sliding_window`` has none; a Llama config has no window whatever it carries."""
    small = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2)
    for mt, cls, extra in (("mistral", transformers.MistralConfig, {}),
                           ("qwen2", transformers.Qwen2Config, dict(sliding_window=8)),
                           ("qwen2", transformers.Qwen2Config, dict(use_sliding_window=True, max_window_layers=2))):
        hf = cls(**small, **extra)
        ours = ModelConfig.from_hf({"model_type": mt, **small, **extra})
        want = getattr(hf, "layer_types", None) or ["sliding_attention" if getattr(hf, "sliding_window", None)
                                                    else "full_attention"] * 3
        windows = [hf.sliding_window if t == "sliding_attention" else None for t in want]
        assert list(ours.layer_windows) == windows, (mt, extra, ours.layer_windows, windows)
    # LlamaConfig keeps an unknown sliding_window attribute, but LlamaAttention never applies it
    assert ModelConfig.from_hf({"model_type": "llama", **small, "sliding_window": 8}).layer_windows == (None,) * 3
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf({"model_type": "mistral", **small, "layer_types": ["full_attention"] * 3})


# ----------------------------------------------------------------------------- model names: path or Hub id


@pytest.mark.parametrize("name", ["./no/such/model", "../nope", "no_such_dir/sub/model", "~/no-such-model-dir",
                                  "absent.gguf", "runs/absent", "a model"])
def test_missing_local_path_is_named_not_sent_to_the_hub(name, tmp_path, monkeypatch):
    """A path-like name that does not exist gets "no such directory or file: <name>", never a Hub request."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # "runs/absent": its first component is a local directory, so it is a path
    monkeypatch.setattr(hf_io, "snapshot_download", lambda *a, **k: pytest.fail(f"{name!r} went to the Hub"))
    for load in (from_pretrained, load_tokenizer):
        with pytest.raises(ModelPathError, match="no such directory or file: " + re.escape(name)):
            load(name)
    assert issubclass(ModelPathError, ValueError)  # the CLI's config-error handling catches it


def test_hub_ids_still_go_to_the_hub(checkpoints, monkeypatch):
    """``org/name`` and ``name`` that do not exist locally are Hub ids: the download is asked for them."""
    asked = []

    def fake_download(repo_id, **kw):
        asked.append(repo_id)
        return checkpoints("llama")[1]
    monkeypatch.setattr(hf_io, "snapshot_download", fake_download)
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "Qwen/Qwen2.5-0.5B"):
        assert not looks_like_path(hub_id)
        from_pretrained(hub_id)
    assert asked == ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "Qwen/Qwen2.5-0.5B"]
