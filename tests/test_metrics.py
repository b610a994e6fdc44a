"""metrics: the evaluation pooling and the degenerate-training message (NumPy / string oracles)."""

import numpy as np

from spo_jax.metrics import DegenerateTrainingError, NonFiniteLossError, degenerate_error, pooled_mean


def test_pooled_mean_weights_by_pairs_and_sums_counts():
    batches = [{"loss": 1.0, "num_pairs": 3.0}, {"loss": 4.0, "num_pairs": 1.0}]
    out = pooled_mean(batches)
    assert out["num_pairs"] == 4.0
    np.testing.assert_allclose(out["loss"], np.average([1.0, 4.0], weights=[3.0, 1.0]))
    sft = pooled_mean([{"sft/nll": 2.0, "num_seqs": 2.0}, {"sft/nll": 5.0, "num_seqs": 6.0}])
    np.testing.assert_allclose(sft["sft/nll"], (2 * 2 + 5 * 6) / 8)


def test_degenerate_error_names_the_last_good_checkpoint_and_the_fix():
    e = degenerate_error(("non_finite", "non-finite values at step 7"), [2, 4], "/r/checkpoints")
    assert type(e) is NonFiniteLossError
    assert "step 4 (/r/checkpoints/4)" in str(e) and "allow_optim_change=True" in str(e)
    e = degenerate_error(("zero_grad", "gradient norm exactly 0 at steps 3-5"), [], "/r/checkpoints")
    assert type(e) is DegenerateTrainingError
    assert "No checkpoint was written" in str(e) and "on_degenerate='warn'" in str(e)
