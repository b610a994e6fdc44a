"""LoRA in the trainer (``model.lora.*``, spo_jax.adapters) on the tiny Llama of experiments/tiny_test.py.

Oracles: DPO's closed form at the first step (the reference is the base with the adapters off, so the
policy equals it: loss = log 2, and a cached table's rewards are zero), a straight run vs a stopped-and-
resumed one (bitwise), the base left unchanged by training, and the exports read back by transformers
and PEFT (PyTorch) with the logits of spo_jax's policy.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from spo_jax import adapters, inputs, models, train
from spo_jax.config import ConfigError
from spo_jax.models import lora

from tests.test_train import flat_params, tiny_config, train_losses, write_pairs

# one layer of the tiny Llama (the preset has 2): the layers are unrolled, so each program compiles a smaller graph
LORA = dict(model__lora__enabled=True, model__lora__rank=4, model__lora__alpha=8.0, optim__learning_rate=1e-2,
            model__config__num_hidden_layers=1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def _policy_logits(result, ids):
    model = nnx.merge(result.policy.eval_graphdef, adapters.full_state(*jax.device_get(
        (result.state.params, result.state.frozen))))
    return np.asarray(model.logits(model(jnp.asarray(ids, jnp.int32))))


def test_lora_dpo_trains_adapters_only_resumes_bitwise_and_exports(pairs, tmp_path):
    cfg = tiny_config(tmp_path / "a", pairs, reference__mode="online", train__num_steps=6, checkpoint__every=3,
                      checkpoint__export_hf=True, **LORA)
    straight = train.train(cfg)
    # the reference is the base with the adapters off: the policy equals it before the first update
    assert abs(train_losses(straight)[0] - np.log(2.0)) < 1e-6
    assert train_losses(straight)[-1] < train_losses(straight)[0]
    params, frozen = jax.device_get((straight.state.params, straight.state.frozen))
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(params))
    # optimiser state only for the adapters: Adam's two moments have the adapters' shapes
    n_adapters = sum(x.size for x in jax.tree.leaves(params))
    assert sum(x.size for x in jax.tree.leaves(straight.state.opt_state) if x.ndim >= 1) == 2 * n_adapters
    # the frozen base is the model as built, untouched by 6 steps
    _, base0 = nnx.split(inputs.build_model(cfg))
    frozen_flat = dict(nnx.to_flat_state(frozen))
    for p, v in nnx.to_flat_state(base0):
        np.testing.assert_array_equal(np.asarray(frozen_flat[p][...]), np.asarray(v[...]))

    first = train.train(tiny_config(tmp_path / "b", pairs, reference__mode="online", train__num_steps=6,
                                    checkpoint__every=3, **LORA), stop_at=3)
    resumed = train.train(tiny_config(tmp_path / "b", pairs, reference__mode="online", train__num_steps=6,
                                      checkpoint__every=3, **LORA))
    assert resumed.start_step == 3
    assert train_losses(first) + train_losses(resumed) == train_losses(straight)
    a, b = flat_params(straight.state.params), flat_params(resumed.state.params)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for x, y in zip(jax.tree.leaves(straight.state.opt_state), jax.tree.leaves(resumed.state.opt_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # exports: the merged HF checkpoint (transformers) and the PEFT adapter on the saved base give
    # spo_jax's policy logits
    ids = np.random.default_rng(0).integers(4, 100, size=(2, 10))
    ours = _policy_logits(straight, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(straight.export_dir).eval()
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)
    base_dir = str(tmp_path / "base")
    models.save_pretrained(inputs.build_model(cfg), base_dir)
    pm = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                        os.path.join(straight.run_dir, adapters.ADAPTER_DIR)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(pm(torch.from_numpy(ids)).logits.numpy(), ours, atol=1e-4, rtol=0)

    # import the exported adapter to continue training: the same adapters as the run ended with
    cont = tiny_config(tmp_path / "c", pairs, **LORA)
    cont.model.lora.init_from = os.path.join(straight.run_dir, adapters.ADAPTER_DIR)
    _, imported, _ = adapters.split_policy(cont, inputs.build_model(cont))
    for (p, v), (q, w) in zip(nnx.to_flat_state(imported), nnx.to_flat_state(params)):
        assert p == q
        np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(w[...]))


@pytest.mark.parametrize("name, overrides", [
    ("penalty_inner_sft_packed", dict(spo__enabled=True, spo__solver="penalty", spo__value="inner_sft",
                                      spo__inner_steps=1, data__packing=True, data__pack_rows=8)),
    ("barrier_cached_dropout_bf16_base_remat", dict(spo__enabled=True, spo__solver="barrier", reference__mode="cached",
                                                    model__lora__dropout=0.1, model__lora__base_dtype="bfloat16",
                                                    model__remat=True)),
    ("unrolled_fsdp_tensor", dict(spo__enabled=True, spo__solver="unrolled", spo__inner_steps=1,
                                  reference__mode="online", mesh__data=2, mesh__fsdp=2, mesh__tensor=2)),
    ("implicit_simpo", dict(spo__enabled=True, spo__solver="implicit", loss__name="simpo", loss__hparams={})),
])
def test_lora_with_solvers_packing_sharding(name, overrides, pairs, tmp_path):
    result = train.train(tiny_config(tmp_path, pairs, train__num_steps=2, **{**LORA, **overrides}))
    losses = train_losses(result)
    assert len(losses) == 2 and all(np.isfinite(losses))
    b = [np.asarray(v[...]) for p, v in nnx.to_flat_state(jax.device_get(result.state.params)) if p[-1] == "lora_b"]
    assert max(np.abs(x).max() for x in b) > 0  # the adapters moved (B starts at zero)
    if "cached" in name:  # the cached table comes from the base with the adapters off: policy = reference
        first = next(h for h in result.history if h["split"] == "train")
        assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    if "bf16" in name:
        dtypes = {v[...].dtype for p, v in nnx.to_flat_state(result.state.frozen) if p[-1] == "kernel"}
        assert dtypes == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in jax.tree.leaves(result.state.params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("overrides, field, fix", [
    (dict(model__lora__rank=0), "model.lora.rank", "must be an int >= 1"),
    (dict(model__lora__targets="q_proj,qproj"), "model.lora.targets", "unknown target 'qproj'"),
    (dict(reference__path="/some/other/model"), "reference.path", "the reference is the base model"),
    (dict(model__lora__base_dtype="int8"), "model.lora.base_dtype", "must be one of"),
])
def test_lora_config_errors(overrides, field, fix, pairs, tmp_path):
    with pytest.raises(ConfigError, match=field) as e:
        train.train(tiny_config(tmp_path, pairs, **{**LORA, **overrides}))
    assert fix in str(e.value)


def test_lora_gpt2_target_on_llama_names_the_family(pairs, tmp_path):
    with pytest.raises(ValueError, match="unknown LoRA target 'c_attn' for a llama model"):
        train.train(tiny_config(tmp_path, pairs, **{**LORA, "model__lora__targets": "c_attn"}))
    assert lora.family_targets("gpt2") == ("c_attn", "c_proj", "c_fc")


def test_benchmark_smoke():
    """benchmarks/lora.py's measurement at a tiny size (the real run: SmolLM2-135M, RESULTS.md)."""
    import importlib.util  # the benchmark is a script outside the package: loaded by path

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "lora.py")
    spec = importlib.util.spec_from_file_location("benchmarks_lora", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = dict(bench.SMOLLM2_SHAPE, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    rows = [bench.measure(v, model_config=cfg, pairs=8, prompt_len=6, response_len=6, steps=1)
            for v in ("full", "lora")]
    full, lora_row = rows
    assert lora_row["trainable"] < full["trainable"] and lora_row["frozen"] == full["trainable"]
    for r in rows:
        assert abs(r["first_loss"] - np.log(2.0)) < 1e-4 and r["step_s"] > 0 and r["xla_peak_mib"] > 0
    assert "| lora |" in bench.table(rows)
