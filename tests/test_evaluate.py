"""spo_jax.evaluate against independent oracles: per-example gradients vs a loop of jax.grad on
one-sequence batches (through the trainer's logps_fn), the first-order prediction vs the measured change
(error O(eta^2)), and the mass split vs a hand count."""

import datasets
import jax
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest
from flax import nnx

from spo_jax import evaluate, losses, models
from spo_jax.data import BatchIterator, prepare_dataset, synthetic
from spo_jax.objectives import batch_pair_stats, make_logps_fn

TINY = dict(model_type="llama", vocab_size=len(synthetic.vocabulary()), hidden_size=16, intermediate_size=32,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
            eos_token_id=3)


@pytest.fixture(scope="module")
def setup():
    tok = synthetic.build_tokenizer()
    rows, _ = synthetic.make_splits(4, 1, seed=2)
    pairs = [{"prompt": f"Question: {r['question']}\nAnswer:", "chosen": " " + r["answer"],
              "rejected": " " + r["answer"].replace("####", "= 1 . ####") + " 7"} for r in rows]
    ds, _ = prepare_dataset(datasets.Dataset.from_list(pairs), tok, max_length=96, format="preference",
                            min_prompt_length=8)
    it = BatchIterator(ds, batch_size=4, max_length=96, packing=False, length_bucket=16, shuffle=False,
                       num_epochs=1, process_index=0, process_count=1)
    batch = next(iter(it))
    model = models.create_model(models.ModelConfig.from_hf(TINY), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return graphdef, params, batch, ds


def _row(batch, r):
    """A one-sequence Contract-1 batch holding row r of a padded batch."""
    out = {k: np.asarray(batch[k])[r:r + 1] for k in ("input_ids", "targets", "loss_mask", "positions", "segment_ids")}
    out["seq_ids"] = np.zeros_like(out["input_ids"])
    out["seq_valid"] = np.ones(1, np.float32)
    return out


def test_per_sequence_grads_match_a_loop_of_grad(setup):
    graphdef, params, batch, _ = setup
    logps_fn = jax.jit(make_logps_fn(graphdef))  # the trainer's function, compiled (not run op by op)
    g = np.asarray(evaluate.per_sequence_grads(graphdef, params, batch))
    S = len(batch["seq_valid"])
    assert g.shape[0] == S
    loop = []
    row_grad = jax.jit(jax.grad(lambda p, b: logps_fn(p, b)[0][0]))  # one compile for the S one-row batches
    for r in range(S):
        gr = row_grad(params, _row(batch, r))
        loop.append(np.asarray(ravel_pytree(gr)[0]))
    loop = np.stack(loop)
    np.testing.assert_allclose(g, loop, rtol=1e-4, atol=1e-5 * np.abs(loop).max())
    stats = evaluate.pair_gradient_stats(graphdef, params, batch)
    gw, gl = loop[0::2].astype(np.float64), loop[1::2].astype(np.float64)
    np.testing.assert_allclose(stats["gw_gl"], np.sum(gw * gl, 1), rtol=1e-4)
    np.testing.assert_allclose(stats["gw_sq"], np.sum(gw * gw, 1), rtol=1e-4)
    np.testing.assert_allclose(stats["gl_sq"], np.sum(gl * gl, 1), rtol=1e-4)
    np.testing.assert_allclose(stats["dpo_chosen_direction"], np.sum(gw * gw, 1) - np.sum(gw * gl, 1),
                               rtol=1e-3, atol=1e-3 * np.sum(gw * gw, 1).max())
    # the sums are the trainer's sequence log-probs
    sums, _ = logps_fn(params, batch)
    np.testing.assert_allclose(stats["chosen_logps"], np.asarray(sums)[0::2], rtol=1e-5)


def test_first_order_prediction_error_scales_as_eta_squared(setup):
    graphdef, params, batch, _ = setup
    logps_fn = jax.jit(make_logps_fn(graphdef))  # the trainer's function, compiled (not run op by op)
    sums, _ = logps_fn(params, batch)
    batch = {**batch, "ref_logps": np.asarray(sums) + np.linspace(-1, 1, len(sums)).astype(np.float32)}
    dpo = losses.get_loss("dpo", beta=0.5)

    @jax.jit  # compiled once for both step sizes (jax.grad of it inside first_order_change)
    def loss_fn(p, b):
        s, c = logps_fn(p, b)
        return dpo(batch_pair_stats(s, c, b))[0]

    errs = []
    for eta in (4e-3, 1e-3):
        out = evaluate.first_order_change(graphdef, params, batch, loss_fn, eta)
        assert out["predicted"].shape == (len(sums),)
        errs.append(np.abs(out["measured"] - out["predicted"]).max())
        # the prediction carries the change: same sign, and close relative to its size
        np.testing.assert_allclose(out["measured"], out["predicted"], atol=0.2 * np.abs(out["predicted"]).max())
    # eta / 4: the second-order error drops ~16x (allow 6x for fp32 noise)
    assert errs[1] < errs[0] / 6, errs
    with pytest.raises(ValueError, match="eta"):
        evaluate.first_order_change(graphdef, params, batch, loss_fn, 0.0)


def test_pair_logps_covers_the_dataset(setup):
    graphdef, params, batch, ds = setup
    out = evaluate.pair_logps(graphdef, params, ds, batch_size=3, max_length=96)
    sums, counts = evaluate.batch_logps(graphdef, params, batch)
    assert list(out["example_index"]) == list(range(len(ds)))
    np.testing.assert_allclose(out["chosen"], sums[0::2], rtol=1e-5)
    np.testing.assert_allclose(out["rejected_len"], counts[1::2])


def test_mass_split_counts():
    got = evaluate.mass_split([["5", "5.0", "7", None], ["3", "4"]], ["5", "3"], ["7", "9"])
    assert got == {"chosen": 3 / 6, "rejected": 1 / 6, "other": 2 / 6, "num_samples": 6}
    with pytest.raises(ValueError, match="one of each"):
        evaluate.mass_split([["1"]], ["1", "2"], ["3"])


def test_packed_batches_are_refused(setup):
    graphdef, params, batch, _ = setup
    bad = dict(batch)
    bad["seq_ids"] = np.zeros_like(batch["seq_ids"])
    with pytest.raises(ValueError, match="padded"):
        evaluate.per_sequence_grads(graphdef, params, bad)
