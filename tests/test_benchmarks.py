"""Smoke tests of the benchmark scripts' core functions at a tiny size (no timings asserted).

The benchmarks themselves (benchmarks/*.py) are run by hand; these check that
their harness measures what it claims: the token counts against
``common.real_tokens``, padded and packed passes covering the same real tokens,
and that every solver variant compiles and steps.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

TINY = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
            rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=2, eos_token_id=1, pad_token_id=0)


@pytest.fixture(autouse=True)
def _small_vocab(monkeypatch):
    # (batches of 8 pairs: CI runs the tests with 8 CPU devices, and a batch must split over them)
    import common
    monkeypatch.setattr(common, "VOCAB", TINY["vocab_size"])


def test_bench_tokens_match_real_tokens():
    from common import make_pairs, real_tokens
    from spo_jax_train import Bench, make_config
    rows = make_pairs(16, 5, 3, seed=1)
    bench = Bench(make_config("simpo", pairs=8, max_length=8, model_config=TINY), rows, num_batches=2)
    assert bench.tokens == [real_tokens(rows[:8]), real_tokens(rows[8:16])]
    for _ in range(2):
        dt, n = bench.step()
        assert dt > 0 and n in (real_tokens(rows[:8]), real_tokens(rows[8:16]))


def test_reference_cost_cached_equals_online():
    """reference_cost: dpo_cached (reference log-probs computed before training, in the batch) and dpo (the
    reference forward inside the step) take the same steps: same initial parameters and batches, a frozen
    reference, so the same parameters after the same number of steps; so does dpo_cached_all (log-probs at
    every position: batches without score_index), while the scored-only step counts fewer FLOPs."""
    import numpy as np
    import reference_cost
    res = reference_cost.measure(pairs=8, prompt_len=5, response_len=3, rounds=2, model_config=TINY,
                                 extra={"data.length_bucket": 4}, log=lambda s: None)  # N = 4 of T = 8
    online, cached = res["benches"]["dpo"], res["benches"]["dpo_cached"]
    assert "ref_logps" in cached.batches[0] and "ref_logps" not in online.batches[0]
    assert cached.state.ref_params is None and online._i == cached._i == 4
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        np.testing.assert_allclose(float(cached.last_metrics[key]), float(online.last_metrics[key]), rtol=1e-5,
                                   atol=1e-7, err_msg=key)
    every = res["benches"]["dpo_cached_all"]
    assert "score_index" in cached.batches[0] and "score_index" not in every.batches[0]
    assert cached.batches[0]["score_index"].shape[1] < cached.batches[0]["input_ids"].shape[1]
    for other in (online, every):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(float(cached.last_metrics[key]), float(other.last_metrics[key]), rtol=1e-5,
                                       atol=1e-7, err_msg=key)
        for a, b in zip(jax.tree.leaves(cached.state.params), jax.tree.leaves(other.state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert res["dpo_cached"]["gflop"] < res["dpo_cached_all"]["gflop"]
    assert len(res["ratio_cpu"]) == 2 and all(r > 0 for r in res["ratio_wall"] + res["gain_cpu"])


def test_solver_cost_measure_interleaves_variants():
    import solver_cost
    variants = ["penalty_reference", "barrier"]  # cheap to compile; the others share the same path
    res = solver_cost.measure(variants,
                              pairs=8, prompt_len=4, response_len=3, rounds=1, model_config=TINY, cg_iters=2,
                              flops=False, log=lambda s: None)
    assert res["dpo"]["ratios"] == [1.0]
    for v in variants:
        assert len(res[v]["times"]) == 1 and math.isfinite(res[v]["ratios"][0]) and res[v]["ratios"][0] > 0


def test_packing_measure_same_real_tokens_fewer_slots():
    import packing
    from common import make_pairs, real_tokens
    res = packing.measure(n_pairs=16, pairs=8, prompt_len=12, response_len=12, rounds=1, model_config=TINY,
                          log=lambda s: None)
    expected = real_tokens(make_pairs(16, 12, 12, seed=0, skew=True))
    assert res["padded"]["tokens"] == res["packed"]["tokens"] == expected
    assert res["packed"]["slots"] < res["padded"]["slots"]
    assert all(r > 0 for r in res["packed"]["rates"] + res["padded"]["rates"])


def test_mfu_measure_counts_flops():
    import mfu
    res = mfu.measure(pairs=8, prompt_len=4, response_len=4, rounds=1, model_config=TINY, log=lambda s: None)
    n, tokens = res["num_params"], res["tokens"]
    assert tokens == 8 * 2 * (4 + 4)
    assert res["flops"]["trainer"] == 8 * n * tokens
    assert res["num_params_matmul"] == n - 64 * 16
    # the unembedding (16 x 64) at the 16 x 4 response tokens only
    assert res["scored"] == 16 * 4
    assert res["flops"]["matmul"] == 8 * ((n - 2 * 64 * 16) * tokens + 64 * 16 * 16 * 4)
    assert 0 < res["mfu"]["trainer"][0] < math.inf


def test_accelerator_check_peak_table():
    from accelerator_check import peak_tflops_for
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0  # the longer key wins
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("some new chip") is None


def test_accelerator_check_tiny(tmp_path):
    """--tiny end to end on the CPU: counts checked against independent arithmetic, not timings."""
    import json

    import accelerator_check as ac
    from common import make_pairs, real_tokens
    out, md = tmp_path / "res.json", tmp_path / "RESULTS.md"
    ac.main(["--tiny", "--attention", "xla", "--steps", "1", "--rounds", "1", "--sample-new", "3",
             "--peak-tflops", "2.0", "--json", str(out), "--write", str(md)])
    res = json.loads(out.read_text())
    cfg = ac.TINY
    # every sequence is seq/2 = 32 tokens, and 8 pairs fill 8 rows of 64 exactly
    assert res["tokens_per_step"] == real_tokens(make_pairs(8, 8, 24, seed=0, vocab=cfg["vocab_size"])) == 8 * 64
    assert res["batch_shape"][1] == 64
    # N counted by hand for TINY: 2 x (q, o 64x64; k, v 64x32; q/k/v biases 128; MLP 3 x 64x128) + tied 64x512;
    # the model's parameter count adds only the norms (2 per layer + the final one, 64 each)
    assert ac.matmul_params(cfg) == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 128 + 3 * 64 * 128) + 64 * 512
    assert res["num_params"] == ac.matmul_params(cfg) + 5 * 64
    attn = 16 * 4 * 2 * 4 * 16 * 32 * 33 / 2  # 16 sequences of 32: 4·L·H·hd·s(s+1)/2
    # the unembedding (tied 64x512) only at the 16 x 24 response tokens (prompt 8 + response 24), the rest at all 512
    body = ac.matmul_params(cfg) - 64 * 512
    assert math.isclose(res["step_tflop"] * 1e12, 4 * (2 * body * 512 + 2 * 64 * 512 * 16 * 24 + attn))
    assert math.isclose(res["mfu"][0], res["step_tflop"] * 1e12 / res["dpo_step_s"][0] / 2e12)
    assert res["attention"] == "xla" and isinstance(res["attention_trials"]["xla"], float)
    assert res["spo_over_dpo"][0] > 0 and res["sample_tokens"] == 8 * 3
    text = md.read_text()
    assert "## Accelerator check" in text and "| DPO MFU" in text and "--tiny" in text


def _with_ref(w, x):  # named as the trainer's reference forward, for profile_step.classify
    return jnp.sin(x @ (w * 2.0))


def _objective(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)


def test_profile_step_attributes_traced_instructions_to_code(tmp_path):
    """The profiler's per-instruction events map onto the compiled HLO's instructions, whose stacks name the
    Python functions they came from (the reference forward, the policy's forward and backward)."""
    import profile_step

    def step(w, x):
        ref = _with_ref(w, x)
        g = jax.grad(_objective)(w, x)
        return w - 0.1 * g + ref.mean()
    f = jax.jit(step)
    w, x = jnp.ones((64, 64)), jnp.ones((32, 64))
    f(w, x).block_until_ready()
    info = profile_step.parse_hlo(f.lower(w, x).compile().as_text())
    phases = {profile_step.classify(op, stack)[0] for op, stack in info.values()}
    assert {"reference forward", "policy forward", "policy backward"} <= phases
    assert any(fn.endswith("<locals>.step") and path == __file__ for _, stack in info.values() for path, fn, _ in stack)
    jax.profiler.start_trace(str(tmp_path))
    f(w, x).block_until_ready()
    jax.profiler.stop_trace()
    events = profile_step.trace_events(next(tmp_path.glob("**/*.xplane.pb")).as_posix())
    assert events and set(events) <= set(info), set(events) - set(info)


def test_sampling_benchmark_counts_the_same_tokens_on_both_sides(tmp_path):
    """benchmarks/sampling.py at a tiny size: one random Llama exported to transformers, so greedy decoding
    gives the same tokens on both sides, and both sides must count them (up to each row's stop) the same."""
    import numpy as np
    import sampling as bench
    import transformers
    from flax import nnx

    from spo_jax import models
    from spo_jax.data import synthetic

    tok = synthetic.build_tokenizer()
    cfg = models.ModelConfig.from_hf({**TINY, "vocab_size": len(synthetic.vocabulary()), "hidden_size": 32,
                                      "intermediate_size": 64, "num_hidden_layers": 2})
    ours = models.create_model(cfg, rngs=nnx.Rngs(0))
    models.save_pretrained(ours, str(tmp_path))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, cfg.vocab_size, n).tolist() for n in (3, 7, 5)]
    first = ours(np.asarray([prompts[0]]))  # a token greedy decoding emits, as a stop id: rows stop early
    stop = int(np.argmax(np.asarray(ours.logits(first))[0, -1]))
    sides = [bench.SpoJax(ours, tok, (stop,), 0), bench.Transformers(hf, (stop,), 0)]
    res = bench.measure(sides, prompts, new_tokens=6, temperatures=(0.0, 0.7), rounds=1, log=lambda s: None)
    greedy = res["0.0"]
    assert greedy["spo_jax"]["tokens"] == greedy["transformers"]["tokens"]
    assert 3 <= greedy["spo_jax"]["tokens"][0] < 18  # row 0 stopped at its first token
    for r in res.values():
        for m in r.values():
            assert m["tokens_per_s"][0] > 0 and m["ttft_s"][0] > 0 and m["first_ttft_s"] > 0
        # only the side that compiles gets a timed first call (transformers' warm-up is a 1-token call)
        assert r["spo_jax"]["first_s"] > 0 and r["spo_jax"]["first_cpu_s"] > 0 and "first_s" not in r["transformers"]
    assert "spo_jax / transformers" in bench.table(res)


def test_step_memory_splits_state_and_temporaries():
    import step_memory
    one, two = (step_memory.analyse(a, False, 8, 8, 8, model_config=TINY) for a in (1, 2))
    for r in (one, two):
        assert r["argument_gb"] > r["state_gb"] > 0
        assert math.isclose(r["alias_gb"], r["state_gb"])  # the state is donated: outputs reuse its buffers
    # half the micro-batch: fewer activations held for the backward pass
    assert two["micro_pairs"] == 4 and two["temp_gb"] < one["temp_gb"]


def test_step_memory_reads_the_buffers_live_at_xla_peak(tmp_path):
    """--peak's reader of XLA's dump: the values listed at the peak, each classed by its optimized-HLO shape."""
    import step_memory
    (tmp_path / "module_0007.jit_step.cpu_after_optimizations.txt").write_text(
        "ENTRY %main {\n"
        "  %state_params__embed____embedding___value.1 = f32[100,8]{1,0} parameter(1), metadata={op_name=\"p\"}\n"
        "  %state_params__layers___0___mlp____up_proj____kernel___value.1 = f32[8,16]{1,0} parameter(2)\n"
        "  %ynn_fusion.3 = f32[4,6,100]{2,1,0} fusion(%a), metadata={op_name=\"jit(step)/jvp(dot_general)\"}\n"
        "  %add_fusion = f32[16,8]{1,0} fusion(%b), metadata={op_name=\"jit(step)/transpose(jvp())/add\"}\n"
        "  ROOT %mul_fusion.2 = (f32[24,16]{1,0}, f32[2]{0}) fusion(%c)\n}\n")
    (tmp_path / "module_0007.jit_step.cpu_after_optimizations-live-range.txt").write_text(
        "HloLiveRange (max 9):\n  Live ranges at 5 (peak):\n"
        "    ynn_fusion.3{}: 9600 bytes (cumulative: 9600 bytes)\n"
        "    state_params__embed____embedding___value.1{}: 3200 bytes (cumulative: 12800 bytes)\n"
        "    mul_fusion.2{}: 1536 bytes (cumulative: 14336 bytes)\n"
        "    add_fusion{}: 512 bytes (cumulative: 14848 bytes)\n\n  other section:\n    x{}: 7 bytes\n")
    kinds = step_memory.peak_buffers(str(tmp_path), vocab=100)
    gb = {k.split(" ")[0]: round(v * 1e9) for k, v in kinds.items()}
    assert gb == {"log-prob": 9600, "train": 3200, "activations": 1536, "parameter-shaped": 512}, kinds
