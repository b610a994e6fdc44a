"""Fault injection: what a run leaves behind and how it resumes after a SIGKILL, a
corrupted newest checkpoint and a full disk.

Oracles: the record a killed run wrote for a step equals the record the resumed run
writes for it (resume is bitwise, so loss and gradient norm repeat exactly); the
TensorBoard reader (``tensorboard``'s EventAccumulator, which applies the purge
events) sees the same steps as the JSONL file; a restored checkpoint equals the
state that was saved.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from spo_jax import config as config_lib
from spo_jax import metrics, sharding, train
from spo_jax.checkpoint import (Checkpointer, CheckpointRestoreError, CheckpointSaveError, abstract_like)
from tests.test_train import ROOT, tiny_config, write_pairs

TINY = os.path.join(ROOT, "experiments", "tiny_test.py")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("faults") / "pairs.jsonl")


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def train_records(path) -> dict[int, dict]:
    """step -> record of the train split; fails on a duplicate step."""
    out: dict[int, dict] = {}
    for r in read_jsonl(path):
        if r["split"] == "train":
            assert r["step"] not in out, f"step {r['step']} recorded twice"
            out[r["step"]] = r
    return out


def tensorboard_steps(tb_dir, tag: str = "train/loss") -> list[tuple[int, float]]:
    acc = event_accumulator.EventAccumulator(str(tb_dir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_continuous(run_dir, num_steps: int, before: dict[int, dict] | None = None) -> None:
    """Exactly one train record per step 1..num_steps in metrics.jsonl (and in
    TensorBoard when written); the records a killed run left for a step equal the
    final ones (loss, gradient norm: deterministic)."""
    final = train_records(os.path.join(run_dir, "metrics.jsonl"))
    assert sorted(final) == list(range(1, num_steps + 1))
    for step, rec in (before or {}).items():
        for key in ("loss", "grad_norm"):
            assert final[step][key] == rec[key], (step, key)
    tb = os.path.join(run_dir, "tb")
    if os.path.isdir(tb):
        events = tensorboard_steps(tb)
        assert [s for s, _ in events] == list(range(1, num_steps + 1))
        np.testing.assert_allclose([v for _, v in events], [final[s]["loss"] for s, _ in events], rtol=1e-6)


# --------------------------------------------------------------------------- #
# SIGKILL
# --------------------------------------------------------------------------- #


def test_sigkill_between_checkpoints_resume_has_one_record_per_step(pairs, tmp_path):
    """Kill the CLI after a checkpoint with records past it; the rerun resumes from the
    checkpoint and the metrics (JSONL and TensorBoard) hold each step once."""
    run_dir = tmp_path / "killed"
    # constant schedule: the train step the in-process tests below compile (the shared compile cache serves it)
    num_steps, every = 60, 10
    args = [sys.executable, "-m", "spo_jax.train", f"--config={TINY}", f"--config.run_dir={run_dir}",
            f"--config.data.train_path={pairs}", f"--config.train.num_steps={num_steps}",
            f"--config.checkpoint.every={every}", "--config.checkpoint.async_save=True",
            "--config.checkpoint.keep=2", "--config.metrics.tensorboard=True", "--config.optim.schedule=constant"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckdir, jsonl = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            steps = [int(p) for p in os.listdir(ckdir) if p.isdigit()] if ckdir.is_dir() else []
            if steps and jsonl.exists():
                lines = jsonl.read_text().splitlines()
                last = json.loads(lines[-1])["step"] if lines else 0
                if last % every >= 3:  # records past the newest checkpoint
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = train_records(jsonl)
    latest = Checkpointer(str(ckdir)).latest_step()
    assert latest is not None and max(before) > latest  # the kill left records the resume recomputes
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["start_step"] == latest and summary["last_train"]["step"] == num_steps
    assert_continuous(run_dir, num_steps, before)
    # the console tells the run's story; library chatter (Orbax INFO, JAX's backend probing) stays out
    err = done.stderr
    for want in ("spo_jax.cli: stage=preference", "tokenized 16 rows -> kept 16", f"resumed from {ckdir} step {latest}",
                 f"removed {max(before) - latest} record(s) after step {latest}", f"run directory {run_dir}"):
        assert want in err, (want, err[-3000:])
    assert not re.search(r"^[IWE]\d{4} ", err, re.M), err[-3000:]  # absl-formatted library records
    assert "orbax" not in err.lower() and "Unable to initialize backend" not in err, err[-3000:]


# --------------------------------------------------------------------------- #
# Corrupted checkpoints
# --------------------------------------------------------------------------- #


def _state(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(scale * rng.standard_normal((64, 48)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((48,)), jnp.float32)}
    return {"step": jnp.int32(seed), "params": params, "opt_state": optax.adam(1e-3).init(params)}


def _abstract(state):
    mesh = sharding.make_mesh((-1, 1, 1))
    return abstract_like(state, jax.tree.map(lambda _: sharding.replicated(mesh), state))


def _truncate_data_files(step_dir):
    """Every data file of the array store (state/d/<hash>, state/ocdbt.process_<i>/d/<hash>) cut to half."""
    for r, _, ns in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(r) == "d":
            for n in ns:
                path = os.path.join(r, n)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _delete_data_files(step_dir):
    for r, _, ns in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(r) == "d":
            for n in ns:
                os.remove(os.path.join(r, n))


CORRUPTIONS = {"truncated data files": _truncate_data_files, "deleted _METADATA": _delete_metadata,
               "deleted data files": _delete_data_files}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Checkpoints of _state(1) and _state(2) at steps 1 and 2 (each corruption case damages a copy)."""
    directory = tmp_path_factory.mktemp("two_checkpoints") / "ck"
    ck = Checkpointer(str(directory), keep=3, async_save=False)
    for s in (1, 2):
        ck.save(s, _state(s), {"cursor": s}, {"run": "x"})
    ck.close()
    return directory


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupted_newest_checkpoint_falls_back_and_is_moved_aside(two_checkpoints, tmp_path, how, caplog, capfd):
    directory = tmp_path / "ck"
    shutil.copytree(two_checkpoints, directory)
    states = {s: _state(s) for s in (1, 2)}
    CORRUPTIONS[how](str(directory / "2"))
    listing = sorted(os.path.relpath(os.path.join(r, n), directory / "2") for r, _, ns in os.walk(directory / "2")
                     for n in ns)

    # strict: refuses, names the step, moves nothing
    ck = Checkpointer(str(directory), keep=3, async_save=False)
    with pytest.raises(CheckpointRestoreError, match=r"checkpoint step 2 .*cannot be restored: .*strict_restore"):
        ck.restore_latest(_abstract(states[2]), strict=True)
    assert ck.all_steps() == [1, 2]

    # default: one line naming the step and the cause, the bad one moved aside, step 1 restored exactly
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="spo_jax.checkpoint"):
        step, state, data_state, _ = ck.restore_latest(_abstract(states[2]))
    assert step == 1 and data_state == {"cursor": 1}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lines = [r.getMessage() for r in caplog.records if r.name == "spo_jax.checkpoint"]
    assert len(lines) == 1 and "checkpoint step 2 cannot be restored" in lines[0]
    assert "falling back to step 1" in lines[0] and "\n" not in lines[0]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Event loop is closed" not in err, err[-2000:]
    assert ck.all_steps() == [1]
    (moved,) = os.listdir(str(directory) + ".corrupt")
    assert moved.startswith("2-")
    kept = sorted(os.path.relpath(os.path.join(r, n), os.path.join(str(directory) + ".corrupt", moved))
                  for r, _, ns in os.walk(os.path.join(str(directory) + ".corrupt", moved)) for n in ns)
    assert kept == listing  # moved, never deleted
    ck.close()


def test_non_finite_checkpoint_is_bad_and_no_usable_checkpoint_refuses(tmp_path):
    directory = tmp_path / "ck"
    ck = Checkpointer(str(directory), keep=3, async_save=False)
    good = _state(1)
    ck.save(1, good, {}, {})
    bad = _state(2)
    bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.inf)
    ck.save(2, bad, {}, {})
    step, _, _, _ = ck.restore_latest(_abstract(good))
    assert step == 1
    _truncate_data_files(str(directory / "1"))
    with pytest.raises(CheckpointRestoreError, match=r"no checkpoint in .* can be restored"):
        ck.restore_latest(_abstract(good))
    assert len(os.listdir(str(directory) + ".corrupt")) == 2
    ck.close()


def run_cli(run_dir, pairs, *overrides, timeout=400) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "spo_jax.train", f"--config={TINY}", f"--config.run_dir={run_dir}",
            f"--config.data.train_path={pairs}", *overrides]
    return subprocess.run(args, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=timeout)


def test_trainer_resumes_from_previous_checkpoint_when_newest_is_corrupt(pairs, tmp_path):
    run_dir = tmp_path / "run"
    # constant learning rate: the resumed steps 6..10 repeat the first run's exactly though num_steps grows
    same = dict(optim__schedule="constant", metrics__tensorboard=True)
    train.train(tiny_config(run_dir, pairs, train__num_steps=10, **same))
    before = train_records(run_dir / "metrics.jsonl")
    _truncate_data_files(str(run_dir / "checkpoints" / "10"))
    strict = tiny_config(run_dir, pairs, train__num_steps=12, checkpoint__strict_restore=True, **same)
    with pytest.raises(CheckpointRestoreError, match="checkpoint step 10"):
        train.train(strict)
    resumed = train.train(tiny_config(run_dir, pairs, train__num_steps=12, **same))
    assert resumed.start_step == 5
    assert_continuous(run_dir, 12, {s: r for s, r in before.items() if s <= 10})


# --------------------------------------------------------------------------- #
# Full disk
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def small_filesystem(path, size_kib: int):
    """A tmpfs of ``size_kib`` at ``path`` (yields True), or None where this process may
    not mount (not root)."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)], capture_output=True).returncode:
        yield None
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory) -> None:
    """Write a filler file into ``directory`` until its filesystem is full (bounded)."""
    chunk = b"\0" * (64 * 1024)
    with open(os.path.join(directory, ".filler"), "wb", buffering=0) as f:  # unbuffered: close flushes nothing
        for _ in range(100_000):
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return
    raise AssertionError("the small filesystem never filled up")


def test_disk_full_while_checkpointing_keeps_last_checkpoint_and_resumes(pairs, tmp_path, monkeypatch, capfd):
    """A real full disk (a tmpfs under the checkpoints, filled after the first run, where the
    test may mount one) or a writer that fails with ENOSPC: one message naming the step, the
    cause and the intact last checkpoint; the rerun after freeing space resumes from it with
    continuous metrics (which live outside the full filesystem)."""
    run_dir = tmp_path / "run"
    # constant schedule: the train step of the other runs in this module (compiled once)
    config = tiny_config(run_dir, pairs, train__num_steps=15, metrics__tensorboard=True, optim__schedule="constant")
    with small_filesystem(run_dir / "checkpoints", 16384) as mounted:
        if mounted is None:  # inject: the second save fails as a full disk would
            real_save = Checkpointer.save

            def failing_save(self, step, *a, **k):
                if step == 10:  # the second save (not the last)
                    raise CheckpointSaveError(self._save_failure_message(
                        step, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
                return real_save(self, step, *a, **k)

            monkeypatch.setattr(Checkpointer, "save", failing_save)
            last = 5
        else:  # a complete run to step 5, then the disk under the checkpoints fills up (the save at 10 fails)
            train.train(config, stop_at=5)
            last = Checkpointer(str(run_dir / "checkpoints")).all_steps()[-1]
            assert last == 5
            _fill(run_dir / "checkpoints")
        capfd.readouterr()
        with pytest.raises(CheckpointSaveError) as err:
            train.train(config)
        msg = str(err.value)
        assert "no space left on device" in msg and "\n" not in msg, msg
        assert f"the last complete checkpoint, step {last} " in msg and "intact" in msg, msg
        assert Checkpointer(str(run_dir / "checkpoints")).all_steps()[-1] == last
        stderr = capfd.readouterr().err
        assert "Event loop is closed" not in stderr and "Traceback" not in stderr, stderr[-2000:]
        assert not [n for n in os.listdir(run_dir / "checkpoints") if "tmp" in n]  # partial files removed
        before = train_records(run_dir / "metrics.jsonl")
        if mounted is None:
            monkeypatch.undo()
        else:
            os.remove(run_dir / "checkpoints" / ".filler")  # space freed
        resumed = train.train(config)
        assert resumed.start_step == last
        assert_continuous(run_dir, 15, before)


# --------------------------------------------------------------------------- #
# Divergence and degenerate training
# --------------------------------------------------------------------------- #


def test_divergence_names_a_good_checkpoint_that_resumes_with_a_lower_learning_rate(pairs, tmp_path):
    """lr 1e30 without clipping: step 1 (warm-up lr 0) is saved, step 2 (lr 5e29) explodes. The
    message names step 1; its weights are finite; the same command with a lower
    learning rate is refused unless checkpoint.allow_optim_change, then continues."""
    run_dir = tmp_path / "diverged"
    bad = dict(train__num_steps=6, checkpoint__every=1, optim__learning_rate=1e30, optim__warmup_steps=2,
               optim__grad_clip=0.0, optim__schedule="constant")
    with pytest.raises(metrics.DegenerateTrainingError, match=r"at step 2: .*not saved\. The last good checkpoint "
                                                            r"is step 1 .*checkpoint\.allow_optim_change=True"):
        train.train(tiny_config(run_dir, pairs, **bad))
    ck = Checkpointer(str(run_dir / "checkpoints"))
    assert ck.all_steps() == [1]
    import orbax.checkpoint as ocp
    restored = ck.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]))
    ck.close()
    lower = dict(bad, optim__learning_rate=1e-3, optim__grad_clip=1.0)
    with pytest.raises(config_lib.ConfigError, match=r"other settings: optim\.grad_clip: 0\.0 -> 1\.0; optim\."
                       r"learning_rate: .*optim\.\* may change with checkpoint\.allow_optim_change=True"):
        train.train(tiny_config(run_dir, pairs, **lower))
    assert Checkpointer(str(run_dir / "checkpoints")).all_steps() == [1]  # a config mismatch moves nothing
    resumed = train.train(tiny_config(run_dir, pairs, checkpoint__allow_optim_change=True, **lower))
    assert resumed.start_step == 1
    losses = [h["loss"] for h in resumed.history if h["split"] == "train"]
    assert len(losses) == 5 and np.isfinite(losses).all()
    assert [s for s in train_records(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    # starting over in a directory that holds checkpoints is refused (metrics and checkpoints kept)
    with pytest.raises(config_lib.ConfigError, match=r"resume=False: run_dir .* already holds checkpoints"):
        train.train(tiny_config(run_dir, pairs, checkpoint__resume=False, **lower))
    assert sorted(train_records(run_dir / "metrics.jsonl")) == [1, 2, 3, 4, 5, 6]


def test_huge_learning_rate_with_clipping_is_stopped_not_silent(pairs, tmp_path, caplog):
    """lr 1e6 with clipping saturated the model silently (gradient norm exactly 0, exit 0):
    now the parameter explosion stops the run at step 2; on_degenerate='warn' logs it."""
    huge = dict(train__num_steps=4, optim__learning_rate=1e6, optim__schedule="constant")
    with pytest.raises(metrics.DegenerateTrainingError, match=r"parameters exploding at step 2: parameter norm "):
        train.train(tiny_config(tmp_path / "stop", pairs, **huge))
    with caplog.at_level(logging.WARNING, logger="spo_jax.train"):
        res = train.train(tiny_config(tmp_path / "warn", pairs, train__on_degenerate="warn",
                                      **dict(huge, train__num_steps=2)))  # (NaN follows at step 3)
    assert res.history[-1]["step"] == 2
    assert any("parameters exploding at step 2" in r.getMessage() and "continuing" in r.getMessage()
               for r in caplog.records)


def test_training_health_detects_each_degenerate_pattern():
    from spo_jax.metrics import TrainingHealth

    def first_problem(seq, patience=3):
        h = TrainingHealth(initial_param_norm=10.0, patience=patience)
        for step, m in enumerate(seq, 1):
            p = h.check(step, {"param_norm": 10.0, **m})
            if p:
                return step, p[0], h.first_bad_step
        return None

    healthy = [{"loss": 1.0 / s, "grad_norm": 0.5} for s in range(1, 20)]
    assert first_problem(healthy) is None
    assert first_problem(healthy[:4] + [{"loss": float("nan"), "grad_norm": 1.0}]) == (5, "non_finite", 5)
    assert first_problem(healthy[:2] + [{"loss": 0.3, "grad_norm": float("inf")}]) == (3, "non_finite", 3)
    assert first_problem(healthy[:3] + [{"loss": 0.3, "grad_norm": 1.0, "param_norm": 2e4}]) == (4, "exploding", 4)
    assert first_problem(healthy[:3] + [{"loss": 0.3, "grad_norm": 1.0, "param_norm": 9e3}]) is None  # < 1000x
    zero = healthy[:2] + [{"loss": 0.7 + 0.01 * i, "grad_norm": 0.0} for i in range(5)]
    assert first_problem(zero) == (5, "zero_grad", 3)
    assert first_problem(healthy[:2] + [{"loss": 0.7, "grad_norm": 0.0}, {"loss": 0.6, "grad_norm": 0.1}] * 3) is None
    frozen = healthy[:2] + [{"loss": 0.69, "grad_norm": 0.2}] * 5
    assert first_problem(frozen) == (6, "frozen_loss", 3)
