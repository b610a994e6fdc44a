"""spo_jax.checkpoint: Orbax round trip, keep-K, atomicity (no half-written step is resumed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spo_jax import sharding
from spo_jax.checkpoint import Checkpointer, abstract_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(seed: int):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32),
              "b": jnp.asarray(rng.standard_normal((6,)), jnp.bfloat16)}
    opt = optax.adamw(1e-3).init(params)
    return {"step": jnp.int32(seed), "params": params, "opt_state": opt, "rng": jax.random.PRNGKey(seed)}


def _assert_tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keep_and_json(tmp_path):
    mesh = sharding.make_mesh((-1, 1, 1))
    ckpt = Checkpointer(str(tmp_path / "ck"), keep=2, async_save=True)
    states = {s: _state(s) for s in (1, 2, 3)}
    for s, st in states.items():
        ckpt.save(s, st, {"epoch": 0, "cursor": 4 * s}, {"stage": "sft", "optim": {"learning_rate": 1e-3}})
    ckpt.wait()
    assert ckpt.latest_step() == 3
    assert ckpt.all_steps() == [2, 3]  # keep the last 2
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), states[3])
    restored, data_state, cfg = ckpt.restore(3, abstract_like(states[3], shardings))
    _assert_tree_equal(restored, states[3])
    assert data_state == {"epoch": 0, "cursor": 12}
    assert cfg == {"stage": "sft", "optim": {"learning_rate": 1e-3}}
    ckpt.close()


def test_latest_step_ignores_half_written(tmp_path):
    """A directory Orbax has not finalised (its temporary name) is never returned."""
    ckpt = Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
    ckpt.save(5, _state(5), {}, {})
    ckpt.wait()
    # what a process killed in the middle of writing step 10 leaves behind
    tmp = tmp_path / "ck" / "10.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
    fresh = Checkpointer(str(tmp_path / "ck"), keep=3, async_save=False)
    assert fresh.latest_step() == 5
    mesh = sharding.make_mesh((-1, 1, 1))
    st = _state(5)
    restored, _, _ = fresh.restore(5, abstract_like(st, jax.tree.map(lambda _: sharding.replicated(mesh), st)))
    _assert_tree_equal(restored, st)
    fresh.close()
    ckpt.close()


def test_killed_writer_leaves_previous_checkpoint_readable(tmp_path):
    """SIGKILL a process while it writes large asynchronous checkpoints in a loop;
    whatever is left, the latest complete step restores exactly."""
    directory = tmp_path / "ck"
    script = textwrap.dedent(f"""
        import os, signal, jax, jax.numpy as jnp, numpy as np
        from spo_jax.checkpoint import Checkpointer
        ck = Checkpointer({str(directory)!r}, keep=10, async_save=True)
        for step in range(1, 1000):
            state = {{"w": jnp.full((512, 1024), float(step), jnp.float32), "step": jnp.int32(step)}}
            ck.save(step, state, {{"cursor": step}}, {{}})
            if step == 2:
                ck.wait()
                print("saved", flush=True)
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-way through step 4's async write
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert "saved" in proc.stdout
    ckpt = Checkpointer(str(directory), keep=10, async_save=False)
    latest = ckpt.latest_step()
    assert latest is not None and 2 <= latest <= 4
    mesh = sharding.make_mesh((-1, 1, 1))
    like = {"w": jnp.zeros((512, 1024), jnp.float32), "step": jnp.int32(0)}
    restored, data_state, _ = ckpt.restore(latest, abstract_like(like, jax.tree.map(lambda _: sharding.replicated(mesh), like)))
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full((512, 1024), float(latest), np.float32))
    assert int(restored["step"]) == latest and data_state == {"cursor": latest}
    ckpt.close()


def test_resume_accepts_a_checkpoint_written_before_a_field_existed_only_at_its_default():
    from spo_jax import config as config_lib
    from spo_jax.checkpoint import check_resume_config
    from spo_jax.validation import ConfigError

    defaults = json.loads(json.dumps(config_lib.get_default_config().to_dict(), default=str))
    now = json.loads(json.dumps(defaults))
    saved = json.loads(json.dumps(defaults))
    del saved["model"]["remat_policy"]  # a checkpoint written before model.remat_policy existed
    check_resume_config(saved, now, "ckpt", defaults=defaults)
    now["model"]["remat_policy"] = "dots_saveable"  # the new field away from its default is a change
    with pytest.raises(ConfigError, match=r"model\.remat_policy: '<absent>' -> 'dots_saveable'"):
        check_resume_config(saved, now, "ckpt", defaults=defaults)
    with pytest.raises(ConfigError, match=r"model\.remat_policy"):  # without the defaults: as before
        check_resume_config(saved, defaults, "ckpt")
