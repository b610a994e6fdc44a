"""What the tests and the processes they start share: the XLA flags of the test session.

XLA:CPU spends most of a small program's compile time in LLVM's optimisation of its fused kernels; the
tests check what the programs compute, not how fast they run, so the session compiles with LLVM's
optimisation off (``--xla_backend_optimization_level=0``: ``tests/test_evaluate.py`` 23.2 -> 15.0 s on
one quiet core). ``tests/conftest.py`` adds the flag to ``XLA_FLAGS`` for the session, which every
subprocess inherits; a test that gives a subprocess an ``XLA_FLAGS`` of its own builds it here so that the
flag is kept."""

from __future__ import annotations

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """The session's ``XLA_FLAGS`` for a process with ``devices`` simulated CPU devices (None: the real one)."""
    flags = [FAST_COMPILE]
    if devices is not None:
        flags.insert(0, f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def add_fast_compile(environ: dict = os.environ) -> None:
    """Add the session's compile flag to ``environ["XLA_FLAGS"]`` (before JAX starts its backend)."""
    flags = environ.get("XLA_FLAGS", "").split()
    if FAST_COMPILE not in flags:
        environ["XLA_FLAGS"] = " ".join(flags + [FAST_COMPILE])
