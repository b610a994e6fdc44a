"""Accumulation precision: the one "at least fp32" rule of the package.

Log-probs, losses, metrics and pytree dot products accumulate in at least fp32:
bf16 / fp16 inputs are promoted to fp32, and fp64 inputs (``jax_enable_x64``, used
by the finite-difference tests) stay fp64 so that those tests are exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["accumulation_dtype", "at_least_f32", "f32_metrics"]


def accumulation_dtype(dtype) -> jnp.dtype:
    """fp32 for bf16 / fp16 / fp32 (and integer) dtypes; fp64 kept."""
    return jnp.promote_types(dtype, jnp.float32)


def at_least_f32(x) -> jax.Array:
    """``x`` as an array of ``accumulation_dtype(x.dtype)``."""
    x = jnp.asarray(x)
    return x.astype(accumulation_dtype(x.dtype))


def f32_metrics(metrics: Mapping[str, Any]) -> dict[str, jax.Array]:
    """A metrics dict with every value an fp32 array (what solvers and steps return:
    metrics are reported, never differentiated, so fp32 suffices even under x64)."""
    return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
