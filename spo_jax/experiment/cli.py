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
from spo_jax.experiment.grid import run_grid, sweep_arms
from spo_jax.experiment.methods import families, method
from spo_jax.experiment.world import SETTINGS, WorldSettings


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


#: The measured cost of one preference run per world size, in CPU seconds of the whole invocation divided by its
#: preference runs (so its seed's share of the SFT model, the sampling and the measurements is included), and
#: where it was measured; ``--dry-run`` multiplies it by the number of runs.
RUN_COST = {
    "grid": (4800 / 144, "the first complete grid run (README, 2026-11-30, commit 39b9770): 4,800 CPU s for 144 "
                         "preference runs and 3 SFT models on this 2-core machine, 81 min wall at load 6-21"),
    "quick": (198 / 12, "python -m spo_jax.demo --quick (2026-12-07, commit 49a05e9): 198 CPU s for 12 preference "
                        "runs and 1 SFT model on this 2-core machine, 454 s wall at load 1-10, a cold compile cache "
                        "(56 CPU s with a warm one)"),
}


def dry_run(size: str, families_: Sequence[str], report_seeds: Sequence[int], validation_seed: int | None,
            settings: Sequence[str] = SETTINGS) -> str:
    """What ``python -m spo_jax.experiment`` would run, without running it: the runs (families x weights x
    seeds x settings), their count and the estimated time from :data:`RUN_COST`."""
    for f in families_:
        method(f)  # validates the names
    L = [f"World size: {size}; settings: {', '.join(settings)}; families ({len(families_)}): {', '.join(families_)}."]
    n = 0
    if validation_seed is not None:
        arms = sweep_arms(families_)
        L += [f"Validation seed {validation_seed}: every family at every swept value, {len(arms)} runs per setting:"]
        by_family: dict[str, list[str]] = {}
        for m in arms:
            by_family.setdefault(m.family, []).append(m.label[len(m.family):].strip() or "defaults")
        L += [f"  {f}: {', '.join(v)}" for f, v in by_family.items()]
        n += len(arms) * len(settings)
        what = "the weight chosen on the validation seed"
    else:
        what = "its default weights"
    L += [f"Report seeds {', '.join(map(str, report_seeds))}: each family at {what}, {len(families_)} runs per "
          "setting and seed."]
    n += len(families_) * len(report_seeds) * len(settings)
    n_sft = len(report_seeds) + (validation_seed is not None)
    per_run, source = RUN_COST[size]
    cpu = n * per_run
    cores = os.cpu_count() or 1
    L += [f"In all: {n_sft} SFT models (one per seed) and {n} preference runs.",
          f"Estimated cost: {n} runs x {per_run:.1f} CPU s = {cpu:,.0f} CPU s, at least {cpu / cores / 60:.0f} min "
          f"of wall time on this machine's {cores} cores if they are kept busy (more on a shared machine). "
          f"The cost per run is from {source}."]
    return "\n".join(L)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m spo_jax.experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The evidence grid: the six Table-2 losses +/- SPO and the baselines, both settings, swept on a "
                    "validation seed, reported on others.\nSee what it will run and cost first: --dry-run.")
    p.add_argument("--out", default="", help="run directory (default: runs/grid-<timestamp>)")
    p.add_argument("--validation-seed", type=int, default=0,
                   help="the seed whose whole pipeline runs every swept value and chooses each family's "
                        "(default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2],
                   help="report seeds: only the chosen arms run on them (default: 1 2)")
    p.add_argument("--families", nargs="+", default=None, help=f"subset of {families()} (default: all)")
    p.add_argument("--quick", action="store_true", help="test-sized world (default: the grid's size)")
    p.add_argument("--resume", action="store_true",
                   help="continue (or extend with more --families / --seeds) the grid in --out: finished SFT models, "
                        "pairs and arms are read back, the rest runs, the report is written again (default: off)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the runs, their count and the estimated time, and run nothing (default: off)")
    compile_cache.add_flag(p)
    a = p.parse_args(argv)
    if a.resume and not a.out:
        p.error("--resume needs --out (the grid directory to continue)")
    fams = a.families or families()
    if a.dry_run:
        try:
            print(dry_run("quick" if a.quick else "grid", fams, a.seeds, a.validation_seed))
        except ValueError as e:  # an unknown family
            p.exit(2, f"{p.prog}: error: {e}\n")
        return
    s = WorldSettings.quick() if a.quick else WorldSettings.grid()
    out = a.out or os.path.join("runs", "grid-" + time.strftime("%Y%m%d-%H%M%S"))
    run_command(p, a, out, lambda: run_grid(s, out, families_=fams, report_seeds=a.seeds,
                                            validation_seed=a.validation_seed, resume=a.resume),
                expected=(FileExistsError, FileNotFoundError, ValueError))  # bad --out / --families / --seeds
