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


def _wandb_history(run_dir) -> list[dict]:
    """The history records of an offline W&B run, read from its transaction log (``run-<id>.wandb``:
    a LevelDB-style log of 32 KiB blocks, 7-byte record headers, after a 7-byte ``:W&B`` file header;
    each record a ``wandb_internal_pb2.Record``)."""
    import glob
    import json
    import time

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    for _ in range(120):  # W&B's service process finishes the file after run.finish() returns
        if [r for r in _records(path) if r.WhichOneof("record_type") == "exit"]:
            break
        time.sleep(0.5)
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in _records(path) if r.WhichOneof("record_type") == "history"]


def _records(path):
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, part, out = open(path, "rb").read(), 7, 32768, b"", []
    assert data.startswith(b":W&B")
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):  # the end, or a record being written
            break
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            out.append(record)
    return out


def test_wandb_writer_logs_each_split_at_its_step_offline(tmp_path, monkeypatch):
    from spo_jax.metrics import MetricWriter

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = MetricWriter(str(tmp_path), jsonl=False, tensorboard=False, wandb_project="spo", wandb_config={"seed": 3})
    w.start(0)
    for step in (1, 2):
        w.write(step, {"loss": 1.0 / step, "grad_norm": np.float32(0.25)})
    w.write(2, {"loss": 0.75}, split="eval")
    w.close()
    got = [{k: v for k, v in h.items() if not k.startswith("_")} | {"_step": h["_step"]}
           for h in _wandb_history(tmp_path)]
    assert got == [{"train/loss": 1.0, "train/grad_norm": 0.25, "_step": 1},
                   {"train/loss": 0.5, "train/grad_norm": 0.25, "eval/loss": 0.75, "_step": 2}]
