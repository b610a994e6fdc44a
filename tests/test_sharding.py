"""spo_jax.sharding: mesh axes, partition rules, global batch assembly.

Multi-device checks need 8 CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
which ``.ci/run`` exports). When this process has fewer, the check runs in a
subprocess with the flag set, never skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from spo_jax import sharding
from tests.helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_8_devices(module: str, name: str) -> None:
    """Call ``module.name()`` here if 8 devices exist, else in a subprocess that has them."""
    if jax.device_count() >= 8:
        getattr(sys.modules[module], name)()
        return
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    code = f"import {module} as m; m.{name}()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{name} failed in the 8-device subprocess:\n{proc.stdout}\n{proc.stderr}"


def test_resolve_axes():
    assert sharding.resolve_axes((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_axes((2, -1, 1), 8) == (2, 4, 1)
    assert sharding.resolve_axes((2, 2, 2), 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis"):
        sharding.resolve_axes((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="do not divide"):
        sharding.resolve_axes((3, -1, 1), 8)
    with pytest.raises(ValueError, match="product"):
        sharding.resolve_axes((2, 2, 1), 8)


class _FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_partition_rules_fit_shapes():
    mesh = _FakeMesh(data=2, fsdp=2, tensor=2)
    rules = sharding.DEFAULT_RULES
    # column-parallel kernel [D, F]: D over fsdp, F over tensor
    assert sharding.spec_for("layers/0/attn/q_proj/kernel/value", (32, 64), rules, mesh) == P("fsdp", "tensor")
    # row-parallel kernel [F, D]
    assert sharding.spec_for("layers/0/mlp/down_proj/kernel", (64, 32), rules, mesh) == P("tensor", "fsdp")
    # a stacked-layer leading axis is left unsharded
    assert sharding.spec_for("layers/mlp/up_proj/kernel", (2, 32, 64), rules, mesh) == P(None, "fsdp", "tensor")
    # an axis that does not divide its dimension is dropped (vocab 67 is odd)
    assert sharding.spec_for("embed_tokens/embedding", (67, 32), rules, mesh) == P(None, "fsdp")
    # GPT-2: learned positions [P, D] split D over fsdp; biases replicated
    assert sharding.spec_for("pos_embed/embedding", (64, 32), rules, mesh) == P(None, "fsdp")
    assert sharding.spec_for("layers/0/attn/q_proj/bias", (64,), rules, mesh) == P(None)
    assert sharding.spec_for("embed/embedding", (64, 32), rules, mesh) == P("tensor", "fsdp")
    # norms replicated; unmatched matrices split their largest dimension over fsdp
    assert sharding.spec_for("layers/0/input_norm/scale", (32,), rules, mesh) == P(None)
    assert sharding.spec_for("something/else", (6, 40), rules, mesh) == P(None, "fsdp")
    assert sharding.spec_for("something/vector", (40,), rules, mesh) == P()


def test_path_str():
    tree = {"a": [{"b": 1}, {"c": 2}]}
    paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == ["a/0/b", "a/1/c"]


def test_initialize_distributed_single_process_is_noop():
    assert sharding.initialize_distributed("") is False


def check_mesh_and_batch_8():
    assert jax.device_count() >= 8
    mesh = sharding.make_mesh((2, -1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    rng = np.random.default_rng(0)
    local = {"input_ids": rng.integers(0, 50, (8, 12)).astype(np.int32),
             "seq_valid": np.ones(8, np.float32),
             "loss_mask": rng.random((8, 12)).astype(np.float32)}
    batch = sharding.make_global_batch(local, mesh)
    for k, v in local.items():
        np.testing.assert_array_equal(np.asarray(batch[k]), v)
        assert batch[k].sharding.spec[0] == ("data", "fsdp")
        # each of the 8 devices holds one row
        assert {s.data.shape[0] for s in batch[k].addressable_shards} == {1}
    # micro-batch axis: leading axis unsharded, rows sharded
    stacked = sharding.make_global_batch({k: np.stack([v, v]) for k, v in local.items()}, mesh,
                                         leading_micro_axis=True)
    assert stacked["input_ids"].sharding.spec[:2] == (None, ("data", "fsdp"))
    with pytest.raises(ValueError, match="does not split"):
        sharding.check_batch_divisible(6, 12, mesh)

    # sharded parameters: a jitted matmul chain gives the unsharded (NumPy) result
    mesh2 = sharding.make_mesh((2, 2, 2))
    params = {"q_proj": {"kernel": rng.standard_normal((16, 32)).astype(np.float32)},
              "down_proj": {"kernel": rng.standard_normal((32, 16)).astype(np.float32)},
              "embed_tokens": {"embedding": rng.standard_normal((10, 16)).astype(np.float32)}}
    shards = sharding.param_shardings(params, mesh2)
    assert shards["q_proj"]["kernel"].spec == P("fsdp", "tensor")
    assert shards["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    placed = jax.device_put(params, shards)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    xs = jax.device_put(x, NamedSharding(mesh2, sharding.batch_spec(2)))
    out = jax.jit(lambda p, x: jnp.tanh(x @ p["q_proj"]["kernel"]) @ p["down_proj"]["kernel"])(placed, xs)
    ref = np.tanh(x @ params["q_proj"]["kernel"]) @ params["down_proj"]["kernel"]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_mesh_and_batch_on_8_devices():
    run_with_8_devices(__name__, "check_mesh_and_batch_8")
