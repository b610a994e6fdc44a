"""What the tests and the processes they start share: the XLA flags of the test session, and the fork
runner that runs many short processes from one interpreter (:data:`FORK_EACH`).

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


#: Python source defining ``fork_each(cases, child, out=None)``, for the runner scripts (``python -c``) of
#: ``tests/test_cli.py`` and ``tests/test_compile_cache.py``: one interpreter imports the libraries once
#: (no JAX backend started), then runs ``child(i, case)`` in a forked process per case, one after another,
#: each a process of its own with JAX's in-memory caches empty; with ``out``, the child's stdout / stderr go
#: to ``<out>/<i>.out`` / ``.err``. Returns the exit codes (``child``'s return value or ``SystemExit`` code;
#: an exception: its traceback and 1).
FORK_EACH = r"""
import os, sys, traceback


def fork_each(cases, child, out=None):
    codes = []
    for i, case in enumerate(cases):
        pid = os.fork()
        if pid == 0:
            if out is not None:
                for fd, name in ((1, "out"), (2, "err")):
                    os.dup2(os.open(os.path.join(out, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            code = 0
            try:
                code = child(i, case) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    return codes
"""
