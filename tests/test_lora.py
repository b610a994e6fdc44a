"""LoRA adapters (spo_jax.models.lora) against Hugging Face PEFT + transformers (PyTorch) as the oracle.

One tiny random checkpoint per family is built with transformers' classes and ``save_pretrained``; our
adapters are exported and loaded by ``peft.PeftModel.from_pretrained`` (and the merged export by
transformers), PEFT adapters made by ``peft.get_peft_model`` are imported, and logits and adapter
gradients are compared in float32.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from spo_jax import sharding as sharding_lib
from spo_jax.models import from_pretrained, save_pretrained
from spo_jax.models import lora
from spo_jax import models as models_lib

VOCAB = 67
ATOL = 1e-4
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, initializer_range=0.1, bos_token_id=1,
              eos_token_id=None, pad_token_id=0)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(COMMON, tie_word_embeddings=False)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(COMMON, sliding_window=None, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(COMMON, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(COMMON, head_dim=16, tie_word_embeddings=False)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=48,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=None, pad_token_id=0)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> directory of a tiny random HF checkpoint (built once per module)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cfg_cls, model_cls, kw = FAMILIES[kind]
            torch.manual_seed(len(cache))
            cfg = cfg_cls(**kw)
            cfg._attn_implementation = "eager"
            d = str(tmp_path_factory.mktemp(f"hf_{kind}"))
            model_cls(cfg).save_pretrained(d)
            cache[kind] = d
        return cache[kind]
    return get


def _hf(path):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return m.float()


def _ids(seed=0, batch=2, length=12):
    return np.random.default_rng(seed).integers(2, VOCAB, size=(batch, length)).astype(np.int64)


def _torch_logits(tm, ids):
    with torch.no_grad():
        return tm(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def _our_logits(model, ids):
    return np.asarray(model.logits(model(jnp.asarray(ids, jnp.int32))))


def _randomize_adapters(model, seed):
    """Non-zero A and B (B starts at zero, which would hide a wrong B layout or scaling)."""
    _, adapters, _ = lora.split_adapters(model)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


# ----------------------------------------------------------------------------- export -> PEFT / transformers


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_export_loads_in_peft_and_merged_in_transformers(kind, checkpoint, tmp_path):
    base_dir = checkpoint(kind)
    ids = _ids()
    model = from_pretrained(base_dir)
    base_logits = _our_logits(model, ids)
    chosen = lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=6.0), rngs=nnx.Rngs(1))
    expected = {"gpt2": 4}.get(kind, 7) * 2
    assert len(chosen) == expected  # every projection of both layers by default ("all-linear")
    # B = 0: the adapted model is the base at step 0
    np.testing.assert_array_equal(_our_logits(model, ids), base_logits)
    _randomize_adapters(model, seed=2)
    ours = _our_logits(model, ids)
    assert np.abs(ours - base_logits).max() > 1e-2

    lora.save_peft_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=base_dir)
    peft_model = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(_torch_logits(peft_model, ids), ours, atol=ATOL, rtol=0)
    with peft_model.disable_adapter():  # PEFT's base == our adapters-off graph from the same state
        theirs_off = _torch_logits(peft_model, ids)
    graphdef, state = nnx.split(model)
    off = nnx.merge(lora.base_graphdef(model), state)
    np.testing.assert_allclose(_our_logits(off, ids), theirs_off, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(_our_logits(off, ids), base_logits)

    save_pretrained(lora.merged_model(model), str(tmp_path / "merged"))
    np.testing.assert_allclose(_torch_logits(_hf(str(tmp_path / "merged")), ids), ours, atol=ATOL, rtol=0)
    assert _our_logits(model, ids) == pytest.approx(ours)  # merging left the adapted model as it was


# ----------------------------------------------------------------------------- PEFT adapter -> import


IMPORT_CASES = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "qwen3": dict(target_modules=r"model\.layers\.1\.(self_attn\.o_proj|mlp\.gate_proj)", use_rslora=True),
    "gpt2": dict(target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True),  # Conv1D weights are [in, out]
}


@pytest.mark.parametrize("kind", list(IMPORT_CASES))
def test_import_peft_adapter_logits_and_adapter_gradients(kind, checkpoint, tmp_path):
    base_dir = checkpoint(kind)
    torch.manual_seed(5)
    pm = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0,
                                                            **IMPORT_CASES[kind]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    pm.eval()

    model = from_pretrained(base_dir)
    cfg = lora.load_peft_adapter(model, str(tmp_path / "adapter"))
    assert cfg.rank == 3 and cfg.alpha == 5.0
    ids = _ids(seed=3)
    np.testing.assert_allclose(_our_logits(model, ids), _torch_logits(pm, ids), atol=ATOL, rtol=0)

    # gradients w.r.t. the adapters (the trainable state) equal PEFT's, GPT-2's shared c_attn A included
    w = np.random.default_rng(4).normal(size=(2, 12, VOCAB)).astype(np.float32)
    out = pm(input_ids=torch.from_numpy(ids)).logits
    (out * torch.from_numpy(w)).sum().backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
              for n, p in pm.named_parameters() if p.requires_grad}

    graphdef, adapters, base = lora.split_adapters(model)

    def loss(adapters):
        m = nnx.merge(graphdef, adapters, base)
        return jnp.sum(m.logits(m(jnp.asarray(ids, jnp.int32))) * w)

    grads = jax.jit(jax.grad(loss))(adapters)
    graph_model = nnx.merge(graphdef, grads, base)  # gradient values in the adapters' places
    for name, mods in lora.adapted_modules(graph_model).items():
        ga = np.asarray(mods[0].lora.lora_a[...])
        gb = np.concatenate([np.asarray(m.lora.lora_b[...]) for m in mods], axis=-1)
        np.testing.assert_allclose(ga.T, theirs[f"{name}.lora_A.weight"], atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(gb.T, theirs[f"{name}.lora_B.weight"], atol=2e-4, rtol=1e-4)
    assert len(theirs) == 2 * len(lora.adapted_modules(model))

    # re-export what was imported: the same PEFT files, up to the target spelling
    lora.save_peft_adapter(model, str(tmp_path / "again"))
    again = peft.PeftModel.from_pretrained(_hf(base_dir), str(tmp_path / "again")).eval()
    np.testing.assert_allclose(_torch_logits(again, ids), _torch_logits(pm, ids), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- behaviour and errors


def test_dropout_keyed_only_in_training_and_base_frozen_by_split(checkpoint):
    model = from_pretrained(checkpoint("llama"))
    ids = _ids()
    base_logits = _our_logits(model, ids)
    lora.apply_lora(model, lora.LoRAConfig(rank=2, dropout=0.5, targets=("q_proj", "up_proj")),
                    rngs=nnx.Rngs(0))
    _randomize_adapters(model, seed=1)
    key_a = _our_logits(model, ids)
    np.testing.assert_array_equal(_our_logits(model, ids), key_a)  # one key: one mask, one function
    graphdef, adapters, base = lora.split_adapters(model)
    new_base = lora.set_dropout_key(base, jax.random.PRNGKey(7))
    key_b = _our_logits(nnx.merge(graphdef, adapters, new_base), ids)
    assert np.abs(key_a - key_b).max() > 1e-4  # another key: another mask
    lora.set_dropout_key(model, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(_our_logits(model, ids), key_b)
    model.eval()
    eval_logits = _our_logits(model, ids)
    no_dropout = from_pretrained(checkpoint("llama"))
    lora.apply_lora(no_dropout, lora.LoRAConfig(rank=2, targets=("q_proj", "up_proj")))
    nnx.update(no_dropout, nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(eval_logits, _our_logits(no_dropout, ids), atol=1e-6, rtol=0)
    assert np.abs(eval_logits - base_logits).max() > 1e-2
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(adapters))
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(base))
    assert len(nnx.to_flat_state(adapters)) == 2 * 2 * 2  # (A, B) x (q_proj, up_proj) x 2 layers


@pytest.mark.parametrize("kw, message", [
    (dict(rank=0), "rank=0: must be an integer >= 1"),
    (dict(alpha=0.0), "alpha=0.0: must be > 0"),
    (dict(dropout=1.0), "dropout=1.0: must be in"),
    (dict(targets=("q_proj", "qproj")), "unknown LoRA target 'qproj' for a llama model"),
    (dict(targets=("c_attn",)), "unknown LoRA target 'c_attn' for a llama model"),
    (dict(targets=r"model\.layers\.9\..*"), "matches no projection"),
])
def test_bad_config_errors(kw, message, checkpoint):
    model = from_pretrained(checkpoint("llama"))
    with pytest.raises(ValueError, match=re.escape(message)):
        lora.apply_lora(model, lora.LoRAConfig(**kw))


def test_import_refuses_unsupported_peft_options(checkpoint, tmp_path):
    model = from_pretrained(checkpoint("gpt2"))
    lora.apply_lora(model, lora.LoRAConfig(rank=2, targets=("c_fc",)))
    lora.save_peft_adapter(model, str(tmp_path))
    cfg_file = os.path.join(tmp_path, lora.ADAPTER_CONFIG)
    d = json.load(open(cfg_file))
    json.dump(dict(d, use_dora=True), open(cfg_file, "w"))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.load_peft_adapter(from_pretrained(checkpoint("gpt2")), str(tmp_path))
    json.dump(dict(d, target_modules=["c_attn"]), open(cfg_file, "w"))  # weights are for c_fc
    with pytest.raises(ValueError, match="do not match adapter_config.json's targets"):
        lora.load_peft_adapter(from_pretrained(checkpoint("gpt2")), str(tmp_path))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        lora.load_peft_adapter(model, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply_lora(model, lora.LoRAConfig())


def test_adapter_sharding_follows_the_tensor_split():
    mesh = sharding_lib.make_mesh((1, 4, 2))
    spec = lambda path, shape: sharding_lib.spec_for(path, shape, sharding_lib.DEFAULT_RULES, mesh)  # noqa: E731
    assert spec("layers/0/attn/q_proj/lora/lora_a", (64, 8)) == P(None, None)
    assert spec("layers/0/attn/q_proj/lora/lora_b", (8, 64)) == P(None, "tensor")
    assert spec("layers/0/mlp/down_proj/lora/lora_a", (96, 8)) == P("tensor", None)
    assert spec("layers/0/mlp/down_proj/lora/lora_b", (8, 64)) == P(None, None)
    assert spec("layers/0/mlp/down_proj/kernel", (96, 64)) == P("tensor", "fsdp")  # the base as before


def test_lora_delta_gradients_and_hvps_equal_autodiff_of_the_formula():
    """``lora.lora_delta``'s written-out VJP against autodiff of PEFT's formula ``(x @ A @ B) * scaling``:
    gradients w.r.t. x, A and B, and forward-over-reverse (``jax.linearize`` of the gradient: the implicit
    solver's Hessian-vector products), with a [B, T, in] input as the decoder gives it."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x, a, b = (jax.random.normal(k[0], (2, 5, 7)), jax.random.normal(k[1], (7, 3)), jax.random.normal(k[2], (3, 6)))
    w = jax.random.normal(k[3], (2, 5, 6))
    ours = lambda *p: jnp.sum(jnp.sin(lora.lora_delta(*p, 2.5)) * w)  # noqa: E731
    plain = lambda x, a, b: jnp.sum(jnp.sin((x @ a @ b) * 2.5) * w)  # noqa: E731
    np.testing.assert_allclose(ours(x, a, b), plain(x, a, b), rtol=1e-6)
    for g1, g0 in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(plain, (0, 1, 2))(x, a, b)):
        np.testing.assert_allclose(g1, g0, rtol=0, atol=1e-6 * float(jnp.abs(g0).max()))  # fp32 sums reordered
    v = tuple(jax.random.normal(kk, p.shape) for kk, p in zip(jax.random.split(k[4], 3), (x, a, b)))
    hvp = [jax.linearize(lambda p, f=f: jax.grad(f, (0, 1, 2))(*p), (x, a, b))[1](v) for f in (ours, plain)]
    for h1, h0 in zip(*hvp):
        np.testing.assert_allclose(h1, h0, rtol=0, atol=1e-6 * float(jnp.abs(h0).max()))


def test_remat_gives_the_same_loss_and_adapter_gradients(checkpoint):
    """Per-layer remat (``model.remat``) with adapters, the frozen base and dropout key entering the jitted
    function as arguments as in the trainer: the same loss and gradients as without, with dropout (0.3) and
    without (``model.eval()``). Once it crashed: nnx.remat wrote the dropout key back across trace levels."""
    ids = jnp.asarray(_ids(), jnp.int32)
    model = from_pretrained(checkpoint("llama"))
    # two targets (an attention and an MLP projection) rather than all seven: 4 compiles of a smaller graph
    lora.apply_lora(model, lora.LoRAConfig(rank=2, dropout=0.3, targets=("q_proj", "down_proj")), rngs=nnx.Rngs(0))
    _randomize_adapters(model, seed=1)
    results = {}
    for training in (True, False):
        model.train() if training else model.eval()
        for remat in (False, True):
            models_lib.set_remat(model, remat)
            graphdef, adapters, base = lora.split_adapters(model)
            base = lora.set_dropout_key(base, jax.random.PRNGKey(5))

            def loss(adapters, base, graphdef=graphdef):
                m = nnx.merge(graphdef, adapters, base)
                return jnp.mean(jax.nn.log_softmax(m.logits(m(ids)))[..., 3])

            results[training, remat] = jax.jit(jax.value_and_grad(loss))(adapters, base)
    for training in (True, False):
        (l0, g0), (l1, g1) = results[training, False], results[training, True]
        np.testing.assert_allclose(l1, l0, atol=1e-6, rtol=0)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    assert abs(results[True, False][0] - results[False, False][0]) > 1e-4  # dropout was on in training
    assert max(np.abs(np.asarray(x)).max() for x in jax.tree.leaves(results[True, False][1])) > 1e-3
