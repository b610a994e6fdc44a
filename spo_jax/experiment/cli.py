"""The command lines of the grid and the demo: :func:`main` (``python -m spo_jax.experiment``, the
evidence grid) and :func:`run_command`, the part both share once their flags are parsed (compile cache,
logging, one-line errors with exit code 2, where the report is).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Sequence

from spo_jax import compile_cache
from spo_jax.compile_cache import CompileStats, enable_compile_cache
from spo_jax.experiment.grid import run_grid
from spo_jax.experiment.methods import families
from spo_jax.experiment.world import WorldSettings


#: Loggers whose INFO records the grid's and the demo's consoles leave out.
QUIET_LOGGERS = ("absl", "orbax", "jax", "spo_jax.train", "datasets")


def run_command(p: argparse.ArgumentParser, args, out: str, run: Callable[[], dict], *,
                expected: tuple[type[Exception], ...], quiet: Sequence[str] = QUIET_LOGGERS) -> dict:
    """The common part of ``python -m spo_jax.experiment`` and ``python -m spo_jax.demo`` once the flags are
    parsed: the compile cache (``--compile-cache``, :func:`spo_jax.compile_cache.add_flag`), INFO logging
    without the ``quiet`` loggers, ``run()`` under ``CompileStats``; an ``expected`` error (a bad flag value
    found while running) is one line and exit code 2. Prints where the report is; returns ``run()``'s result."""
    enable_compile_cache(args.compile_cache)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with CompileStats() as compiles:
            res = run()
    except expected as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    print(f"report: {os.path.join(os.path.abspath(out), 'report.md')}  (wall {res['timings_s']['total']:.0f} s; "
          f"{compiles.summary()})")
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m spo_jax.experiment",
                                description="The evidence grid: the six Table-2 losses +/- SPO and the baselines, "
                                            "both settings, swept on a validation seed, reported on others.")
    p.add_argument("--out", default="", help="run directory (default runs/grid-<timestamp>)")
    p.add_argument("--validation-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="report seeds")
    p.add_argument("--families", nargs="+", default=None, help=f"subset of {families()}")
    p.add_argument("--quick", action="store_true", help="test-sized world")
    p.add_argument("--resume", action="store_true",
                   help="continue (or extend with more --families / --seeds) the grid in --out: finished SFT models, "
                        "pairs and arms are read back, the rest runs, the report is written again")
    compile_cache.add_flag(p)
    a = p.parse_args(argv)
    if a.resume and not a.out:
        p.error("--resume needs --out (the grid directory to continue)")
    s = WorldSettings.quick() if a.quick else WorldSettings.grid()
    out = a.out or os.path.join("runs", "grid-" + time.strftime("%Y%m%d-%H%M%S"))
    run_command(p, a, out, lambda: run_grid(s, out, families_=a.families or families(), report_seeds=a.seeds,
                                            validation_seed=a.validation_seed, resume=a.resume),
                expected=(FileExistsError, FileNotFoundError, ValueError))  # bad --out / --families / --seeds
