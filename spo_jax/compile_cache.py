"""JAX's persistent compilation cache, on by default for spo_jax's entry points.

Every start of the CLI, the demo or an experiment compiles the same XLA programs
again (the train step per shape bucket, the sampling programs, the evaluation
forward); on a small CPU that is most of a short run's start-up. With the cache
on, a second identical run loads the compiled executables from disk instead.

Where the cache lives (first that applies):

1. the explicit setting: the CLI's ``compile_cache`` config field, the
   ``--compile-cache`` flag of the demo and the experiments (:func:`add_flag`), or the
   argument of :func:`enable_compile_cache`;
2. the environment variable ``SPO_JAX_COMPILE_CACHE``;
3. ``$XDG_CACHE_HOME/spo_jax/jax_cache`` (``~/.cache/spo_jax/jax_cache`` when
   ``XDG_CACHE_HOME`` is unset).

A setting of ``off`` (also ``none``, ``false``, ``0``) disables the cache.
Every program is cached whatever its compile time or size (JAX's defaults skip
programs that compile in under a second, which on an accelerator is most of a
small run's programs).

The cache is trusted code: do not point it at a directory others can write to
(JAX's warning on ``jax.experimental.compilation_cache``).
"""

from __future__ import annotations

import argparse
import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

__all__ = ["ENV_VAR", "OFF_VALUES", "default_cache_dir", "resolve_cache_dir", "add_flag", "enable_compile_cache",
           "CompileStats"]

ENV_VAR = "SPO_JAX_COMPILE_CACHE"
OFF_VALUES = ("off", "none", "false", "0")

log = logging.getLogger(__name__)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/spo_jax/jax_cache``, or ``~/.cache/spo_jax/jax_cache``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spo_jax", "jax_cache")


def resolve_cache_dir(setting: str | None = None) -> str | None:
    """The cache directory for ``setting`` (see the module docstring), or None when the cache is off.

    ``setting`` None or "" defers to ``$SPO_JAX_COMPILE_CACHE``, then to :func:`default_cache_dir`."""
    for value in (setting, os.environ.get(ENV_VAR)):
        if value is None or str(value).strip() == "":
            continue
        value = str(value).strip()
        if value.lower() in OFF_VALUES:
            return None
        return os.path.abspath(os.path.expanduser(value))
    return default_cache_dir()


def add_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--compile-cache DIR|off`` flag of the demo and the experiments (its value goes to
    :func:`enable_compile_cache`)."""
    parser.add_argument("--compile-cache", default=None,
                        help="JAX compilation cache directory, or 'off' (default: $SPO_JAX_COMPILE_CACHE, else "
                             "~/.cache/spo_jax/jax_cache; see spo_jax.compile_cache)")


def enable_compile_cache(setting: str | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on at the resolved directory (or off); returns the directory.

    Call it before the first compilation. Calling it again with another directory
    (or ``off``) switches the cache for the programs compiled afterwards."""
    path = resolve_cache_dir(setting)
    current = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            source = "the setting" if setting else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "the default")
            raise ValueError(
                f"compile cache: cannot create the directory {path!r} (from {source}): {e}. Point the compile "
                f"cache at a writable directory (the CLI's runtime.compile_cache, the --compile-cache flag or "
                f"${ENV_VAR}), or set it to 'off'") from e
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_enable_compilation_cache", True)
        # cache everything: JAX skips programs under 1 s of compile time by default
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if path != current:
        # JAX opens the cache once per process, at the first compilation; make it reopen at the new place
        compilation_cache.reset_cache()
    log.info("compile cache: %s", path or "off")
    return path


_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_HITS = "/jax/compilation_cache/cache_hits"
_WRITES = "/jax/compilation_cache/cache_misses"  # JAX records it when it writes a new entry
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # a compilation or a cache load


class CompileStats:
    """Counts this process's XLA program loads while active (a context manager, or ``start``/``stop``).

    ``programs``: executables built (each a fresh compilation or a cache load),
    ``seconds``: their total time; ``cache_hits``: loaded from the persistent
    cache; ``cache_writes``: compiled and written to it; ``compiled``: programs
    that XLA compiled (``programs - cache_hits``)."""

    def __init__(self):
        self.programs = self.cache_requests = self.cache_hits = self.cache_writes = 0
        self.seconds = 0.0

    @property
    def compiled(self) -> int:
        return self.programs - self.cache_hits

    def _event(self, event: str, **_) -> None:
        if event == _REQUESTS:
            self.cache_requests += 1
        elif event == _HITS:
            self.cache_hits += 1
        elif event == _WRITES:
            self.cache_writes += 1

    def _duration(self, event: str, seconds: float, **_) -> None:
        if event == _BACKEND_COMPILE:
            self.programs += 1
            self.seconds += seconds

    def start(self) -> "CompileStats":
        jax.monitoring.register_event_listener(self._event)
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        return self

    def stop(self) -> None:
        jax.monitoring.unregister_event_listener(self._event)
        jax.monitoring.unregister_event_duration_listener(self._duration)

    def __enter__(self) -> "CompileStats":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> str:
        return (f"{self.programs} XLA programs in {self.seconds:.1f} s: {self.compiled} compiled, "
                f"{self.cache_hits} loaded from the compile cache ({self.cache_writes} written to it)")
