"""spo_jax.train end to end on a tiny Llama (2 layers, width 32, T <= 32).

Oracles: the same run on another device layout (1 device vs a 2x4 data x fsdp
mesh of 8 simulated CPU devices vs two processes with ``jax.distributed``),
a straight run vs a stopped-and-resumed one, online vs cached reference
log-probs, gradient accumulation vs one large batch, DPO's closed form at the
first step (policy = reference: loss = log 2).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from spo_jax import config as config_lib
from spo_jax import sharding, train
from spo_jax.checkpoint import Checkpointer
from tests.helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import tiny_test  # noqa: E402

NAMES = ["Ben", "Tom", "Ana", "Mia"]
OBJECTS = ["apples", "coins", "books"]


def write_pairs(path, n: int = 16, seed: int = 0) -> str:
    """Short GSM8K-style preference pairs in the synthetic task's vocabulary."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = int(rng.integers(2, 30)), int(rng.integers(1, 9))
            wrong = a + b + int(rng.integers(1, 4))
            row = {"prompt": f"{NAMES[i % 4]} has {a} {OBJECTS[i % 3]} . He gets {b} more . How many ?",
                   "chosen": f" {a} + {b} = {a + b} . #### {a + b}",
                   "rejected": f" {a} + {b} = {wrong} . #### {wrong}"}
            f.write(json.dumps(row) + "\n")
    return str(path)


def write_sft(path, n: int = 16, seed: int = 1) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = int(rng.integers(2, 30)), int(rng.integers(1, 9))
            f.write(json.dumps({"prompt": f"{NAMES[i % 4]} has {a} apples . He gets {b} more . How many ?",
                                "completion": f" {a} + {b} = {a + b} . #### {a + b}"}) + "\n")
    return str(path)


def set_dotted(config, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def tiny_config(run_dir, train_path, **overrides) -> ml_collections.ConfigDict:
    c = tiny_test.get_config()
    c.run_dir = str(run_dir)
    c.data.train_path = str(train_path)
    for k, v in overrides.items():
        set_dotted(c, k.replace("__", "."), v)
    return c


def flat_params(params) -> dict[str, np.ndarray]:
    return {sharding.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def train_losses(result) -> list[float]:
    return [h["loss"] for h in result.history if h["split"] == "train"]


# --------------------------------------------------------------------------- #
# Subprocess runs (other device counts, several processes)
# --------------------------------------------------------------------------- #


def _run_spec(spec: dict) -> None:
    """Train the run of ``spec`` ({run_dir, train_path, overrides, out}); process 0 writes params + losses."""
    c = tiny_config(spec["run_dir"], spec["train_path"], **spec["overrides"])
    result = train.train(c)
    params = jax.jit(lambda p: p, out_shardings=sharding.replicated(sharding.make_mesh(
        (c.mesh.data, c.mesh.fsdp, c.mesh.tensor))))(result.state.params)
    if jax.process_index() == 0:
        np.savez(spec["out"], __losses__=np.asarray(train_losses(result)), **flat_params(params))


def _subprocess_main() -> None:
    """Entry point of a child: argv[1] = JSON spec (see ``_run_spec``)."""
    _run_spec(json.loads(sys.argv[1]))


def _child(spec: dict, devices: int, extra_env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
    env.update(extra_env or {})
    code = "import sys; sys.argv[1:] = [sys.argv[1]]; from tests.test_train import _subprocess_main; _subprocess_main()"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, timeout: float = 400) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


DIST_OVERRIDES = {"train.num_steps": 5, "checkpoint.every": 0, "checkpoint.async_save": False,
                  "reference.mode": "online", "optim.learning_rate": 3e-3}


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The reference: 5 steps on a single CPU device (a child process)."""
    d = tmp_path_factory.mktemp("one")
    train_path = write_pairs(d / "pairs.jsonl")
    spec = {"run_dir": str(d / "run"), "train_path": train_path, "out": str(d / "out.npz"),
            "overrides": dict(DIST_OVERRIDES, **{"mesh.data": 1})}
    _wait(_child(spec, devices=1))
    return train_path, _load(d / "out.npz")


def _assert_same_run(got: dict, want: dict, tol: float) -> None:
    assert set(got) == set(want)
    np.testing.assert_allclose(got["__losses__"], want["__losses__"], rtol=tol, atol=tol)
    assert len(want["__losses__"]) == 5
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)


def test_eight_devices_data_x_fsdp_matches_one_device(one_device_run, tmp_path):
    train_path, want = one_device_run
    spec = {"run_dir": str(tmp_path / "run"), "train_path": train_path, "out": str(tmp_path / "out.npz"),
            "overrides": dict(DIST_OVERRIDES, **{"mesh.data": 2, "mesh.fsdp": 4})}
    if jax.device_count() == 8 and jax.process_count() == 1:  # CI's 8 CPU devices: this process will do
        _run_spec(spec)
    else:
        _wait(_child(spec, devices=8))
    got = _load(tmp_path / "out.npz")
    _assert_same_run(got, want, 1e-5)
    # training moved the model (the comparison is not between two initialisations)
    assert abs(got["__losses__"][-1] - got["__losses__"][0]) > 1e-4


def test_two_processes_match_one_process(one_device_run, tmp_path):
    train_path, want = one_device_run
    port = _free_port()
    procs = []
    for pid in range(2):
        spec = {"run_dir": str(tmp_path / "run"), "train_path": train_path, "out": str(tmp_path / "out.npz"),
                "overrides": dict(DIST_OVERRIDES, **{"distributed.coordinator_address": f"127.0.0.1:{port}",
                                                      "distributed.num_processes": 2,
                                                      "distributed.process_id": pid})}
        procs.append(_child(spec, devices=1))
    for p in procs:
        _wait(p)
    _assert_same_run(_load(tmp_path / "out.npz"), want, 1e-5)


# --------------------------------------------------------------------------- #
# In-process runs
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="module")
def straight(pairs, tmp_path_factory):
    """The tiny preset's run (10 steps, cached reference), straight through; tests only read it."""
    return train.train(tiny_config(tmp_path_factory.mktemp("straight") / "a", pairs))


def test_resume_is_bitwise_identical(straight, pairs, tmp_path):
    assert straight.start_step == 0
    first = train.train(tiny_config(tmp_path / "b", pairs), stop_at=5)
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == 5
    resumed = train.train(tiny_config(tmp_path / "b", pairs))
    assert resumed.start_step == 5
    a, b = flat_params(straight.state.params), flat_params(resumed.state.params)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the data iterator resumed at the right batch: the same losses at steps 6..10
    assert train_losses(first) + train_losses(resumed) == train_losses(straight)


def test_cached_and_online_reference_give_the_same_loss(straight, pairs, tmp_path):
    cached = straight  # the tiny preset's reference.mode is "cached"
    assert tiny_config(tmp_path, pairs).reference.mode == "cached"
    online = train.train(tiny_config(tmp_path / "online", pairs, reference__mode="online", checkpoint__every=0))
    np.testing.assert_allclose(train_losses(cached), train_losses(online), rtol=1e-6, atol=1e-6)
    cache_dir = tmp_path / "ref_cache"
    shutil.copytree(os.path.join(cached.run_dir, "ref_cache"), cache_dir)
    files = os.listdir(cache_dir)
    assert len(files) == 1 and files[0].startswith("ref_logps-") and files[0].endswith(".npz")
    # the key depends on the data: another dataset gets another file
    other = write_pairs(tmp_path / "other.jsonl", seed=5)
    train.train(tiny_config(tmp_path / "cached2", other, reference__mode="cached", reference__cache_dir=str(cache_dir)),
                stop_at=1)
    assert len(os.listdir(cache_dir)) == 2
    # before any update the policy is the reference: every DPO loss is log 2 at step 1
    assert abs(train_losses(cached)[0] - np.log(2.0)) < 1e-5


def test_gradient_accumulation_matches_one_batch(pairs, tmp_path):
    one = train.train(tiny_config(tmp_path / "one", pairs, train__num_steps=3, data__shuffle=False,
                                  data__batch_size=8))
    acc = train.train(tiny_config(tmp_path / "acc", pairs, train__num_steps=3, data__shuffle=False,
                                  data__batch_size=8, optim__grad_accum_steps=2))
    np.testing.assert_allclose(train_losses(acc), train_losses(one), rtol=1e-5, atol=1e-6)
    a, b = flat_params(one.state.params), flat_params(acc.state.params)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sft_then_spo_preference_and_metrics_files(tmp_path):
    sft_data = write_sft(tmp_path / "sft.jsonl")
    # batch 8: SFT sequences must split over the 8 CPU devices CI exposes
    sft = train.train(tiny_config(tmp_path / "sft", sft_data, stage="sft", reference__mode="none",
                                  train__num_steps=6, checkpoint__export_hf=True,
                                  data__batch_size=8, data__eval_batch_size=8))
    losses = train_losses(sft)
    assert losses[-1] < losses[0]
    assert os.path.isdir(sft.export_dir)
    pairs_path = write_pairs(tmp_path / "p.jsonl")
    c = tiny_config(tmp_path / "spo", pairs_path, spo__enabled=True, spo__gamma=5.0, train__num_steps=3,
                    data__eval_path=pairs_path, data__eval_split="train")
    c.model.config = None
    c.model.path = sft.export_dir
    res = train.train(c)
    last = [h for h in res.history if h["split"] == "train"][-1]
    for key in ("loss", "spo/objective", "spo/penalty", "grad_norm", "learning_rate", "tokens_per_sec", "mfu"):
        assert key in last and np.isfinite(last[key]), key
    assert res.final_eval["num_pairs"] == 16
    lines = [json.loads(x) for x in open(tmp_path / "spo" / "metrics.jsonl")]
    assert [x["step"] for x in lines if x["split"] == "train"] == [1, 2, 3]
    assert lines[-1]["split"] == "eval"


# --------------------------------------------------------------------------- #
# Config validation
# --------------------------------------------------------------------------- #


def test_config_errors_name_field_value_and_fix(pairs, tmp_path):
    c = tiny_config(tmp_path / "v", pairs)
    config_lib.validate_config(c, num_devices=8, process_count=1)  # the tiny config is valid

    with pytest.raises(AttributeError, match="learnig_rate"):
        c.optim.learnig_rate = 1e-3  # locked ConfigDict: typos cannot add keys

    bad = tiny_config(tmp_path / "v", pairs, data__batch_size=3)
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.batch_size=3: .*8 devices"):
        config_lib.validate_config(bad, num_devices=8, process_count=1)

    bad = tiny_config(tmp_path / "v", str(tmp_path / "missing.jsonl"))
    with pytest.raises(config_lib.ConfigError, match=r"config\.data\.train_path=.*missing\.jsonl.*no such file"):
        config_lib.validate_config(bad, num_devices=1, process_count=1)

    bad = tiny_config(tmp_path / "v", pairs, optim__schedule="cosin")
    with pytest.raises(config_lib.ConfigError, match=r"config\.optim\.schedule='cosin': must be one of"):
        config_lib.validate_config(bad, num_devices=1, process_count=1)

    bad = tiny_config(tmp_path / "v", pairs, mesh__data=3)
    with pytest.raises(config_lib.ConfigError, match=r"config\.mesh"):
        config_lib.validate_config(bad, num_devices=8, process_count=1)

    bad = tiny_config(tmp_path / "v", pairs, reference__mode="none")
    with pytest.raises(config_lib.ConfigError, match=r"config\.reference\.mode='none'.*'online' or 'cached'"):
        config_lib.validate_config(bad, num_devices=1, process_count=1)

    bad = tiny_config(tmp_path / "v", pairs, spo__enabled=True, spo__solver="newton")
    with pytest.raises(config_lib.ConfigError, match=r"solver='newton'"):
        config_lib.validate_config(bad, num_devices=1, process_count=1)


GPT2_16 = dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=2,
               eos_token_id=3, pad_token_id=0)


def test_max_length_beyond_the_models_positions(pairs, tmp_path, caplog):
    """data.max_length past max_position_embeddings: learned positions (GPT-2) are refused before anything is
    built (inline config or a local config.json); RoPE models run past it as in transformers, with a warning
    naming both fields and the fix."""
    from spo_jax import inputs, models
    c = tiny_config(tmp_path, pairs)  # the tiny Llama: max_position_embeddings=64, data.max_length=32
    assert inputs.check_positions(c, models.ModelConfig.from_hf(dict(c.model.config))) is None
    long = tiny_config(tmp_path, pairs, data__max_length=128)
    config_lib.validate_config(long, num_devices=1, process_count=1)  # RoPE: not refused
    warning = inputs.check_positions(long, models.ModelConfig.from_hf(dict(long.model.config)))
    assert all(s in warning for s in ("config.data.max_length=128", "max_position_embeddings=64", "<= 64"))
    with caplog.at_level(logging.WARNING, logger="spo_jax.train"):  # the trainer runs, warning once
        result = train.train(tiny_config(tmp_path / "long", pairs, data__max_length=128), stop_at=1)
    assert [r.getMessage() for r in caplog.records if "max_position_embeddings" in r.getMessage()] == [warning]
    assert np.isfinite(train_losses(result)).all()

    want = (r"config\.data\.max_length=32: longer than the gpt2 model's max_position_embeddings=16 \(n_positions.*"
            r"lower data\.max_length to <= 16, or use a model with longer positions")
    gpt2 = tiny_config(tmp_path, pairs)
    gpt2.model.config = ml_collections.ConfigDict(GPT2_16)
    with pytest.raises(config_lib.ConfigError, match=want + ".*"):
        config_lib.validate_config(gpt2, num_devices=1, process_count=1)
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(GPT2_16))
    local = tiny_config(tmp_path, pairs, model__config=None, model__path=str(hf_dir))
    with pytest.raises(config_lib.ConfigError, match=want):
        config_lib.validate_config(local, num_devices=1, process_count=1)
    gpt2.data.max_length = 16
    config_lib.validate_config(gpt2, num_devices=1, process_count=1)


def test_model_attention_config(pairs, tmp_path):
    """model.attention reaches every layer of the trainer's model (the kernels are compared in test_models)."""
    from spo_jax import inputs
    model = inputs.build_model(tiny_config(tmp_path, pairs, model__attention="xla"))
    assert [layer.attn.implementation for layer in model.layers] == ["xla"] * len(model.layers)
    bad = tiny_config(tmp_path, pairs, model__attention="flash")
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.attention='flash': must be one of"):
        config_lib.validate_config(bad, num_devices=1, process_count=1)


def test_cli_rejects_unknown_key(pairs, tmp_path):
    args = [sys.executable, "-m", "spo_jax.train", f"--config={os.path.join(ROOT, 'experiments', 'tiny_test.py')}",
            f"--config.run_dir={tmp_path}", f"--config.data.train_path={pairs}", "--config.optim.learnig_rate=1e-3"]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode != 0
    assert "learnig_rate" in proc.stderr
