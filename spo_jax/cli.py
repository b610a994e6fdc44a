"""The trainer's command line.

    python -m spo_jax.train --config experiments/<name>.py [--config.a.b=value ...]
    python -m spo_jax.cli   --config experiments/<name>.py [--config.a.b=value ...]

Loads the ml_collections config file, turns on JAX's persistent compilation cache
(``config.compile_cache``; see ``spo_jax.compile_cache``), runs ``spo_jax.train.train``
(which validates the config before anything heavy starts; a ``ConfigError`` exits with
its message) and prints a JSON summary of the run on process 0, with ``compile``: the
XLA programs the run built, how many were compiled and how many loaded from the cache.
"""

from __future__ import annotations

import json
import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from spo_jax import config as config_lib
from spo_jax.compile_cache import CompileStats, enable_compile_cache
from spo_jax.train import train


def summary(result) -> dict:
    """The printed summary of a ``TrainResult``: run_dir, start_step, final_eval,
    export_dir and the last training metrics."""
    out = {"run_dir": result.run_dir, "start_step": result.start_step, "final_eval": result.final_eval,
           "export_dir": result.export_dir}
    last = next((h for h in reversed(result.history) if h["split"] == "train"), None)
    if last:
        out["last_train"] = last
    return out


def _main(args) -> None:
    if len(args) > 1:
        raise app.UsageError(f"unexpected arguments {args[1:]}; use --config.a.b=value")
    cfg = flags.FLAGS.config
    if cfg is None:
        raise app.UsageError("--config experiments/<name>.py is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cache_dir = enable_compile_cache(cfg.compile_cache)
    except ValueError as e:  # an unusable directory: the message names it and the fix
        raise SystemExit(f"config error: config.compile_cache={cfg.compile_cache!r}: {e}") from None
    try:
        with CompileStats() as compiles:
            result = train(cfg)
    except config_lib.ConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    logging.getLogger("spo_jax.cli").info("compile cache %s: %s", cache_dir or "off", compiles.summary())
    if jax.process_index() == 0:
        out = summary(result)
        out["compile"] = {"cache_dir": cache_dir, "programs": compiles.programs, "compiled": compiles.compiled,
                          "cache_hits": compiles.cache_hits, "seconds": round(compiles.seconds, 2)}
        print(json.dumps(out, default=str))


def main(argv=None) -> None:
    config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/<name>.py)",
                                    lock_config=True)
    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
