"""What the tests and the processes they start share: the XLA flags of the test session.

XLA:CPU spends most of a small program's compile time generating and optimising the code of its fused
kernels; the tests check what the programs compute, not how fast they run, so the session compiles with
LLVM's optimisation off (``--xla_backend_optimization_level=0``) and XLA's older kernel emitter in place of
its MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``). ``tests/test_evaluate.py`` on one quiet
core: 23.2 s with XLA's defaults, 15.0 s with the first flag, 8.8 s with both. ``tests/conftest.py`` adds
the flags to ``XLA_FLAGS`` for the session, which every subprocess inherits; a test that gives a subprocess
an ``XLA_FLAGS`` of its own builds it here so that the flags are kept."""

from __future__ import annotations

import os

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int | None = None) -> str:
    """The session's ``XLA_FLAGS`` for a process with ``devices`` simulated CPU devices (None: the real one)."""
    flags = list(FAST_COMPILE)
    if devices is not None:
        flags.insert(0, f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def add_fast_compile(environ: dict = os.environ) -> None:
    """Add the session's compile flags to ``environ["XLA_FLAGS"]`` (before JAX starts its backend)."""
    flags = environ.get("XLA_FLAGS", "").split()
    environ["XLA_FLAGS"] = " ".join(flags + [f for f in FAST_COMPILE if f not in flags])
