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
    assert 0 < res["mfu"]["trainer"][0] < math.inf
