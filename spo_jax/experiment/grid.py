"""The evidence grid (:func:`run_grid`): every family at every value of :data:`SWEEP` on a validation
seed, each family's value chosen there (:func:`choose`, by :data:`CRITERIA`), only the chosen arms run
on the report seeds (which chose nothing); or, without a validation seed, every family at fixed
weights (the demo). Writes ``results.json``, ``report.md`` and ``pareto_style.png``; ``--resume``
continues or extends a grid directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import time
from collections.abc import Mapping, Sequence

import jax

from spo_jax.experiment.methods import Method, is_spo_family, method
from spo_jax.experiment.pipeline import run_world_seed
from spo_jax.experiment.report import summarize, write_report
from spo_jax.experiment.runs import read_json, write_json
from spo_jax.experiment.world import SETTINGS, WorldSettings

#: The hyperparameters swept on the validation seed (every other one stays at its default):
#: SPO's weight gamma for every SPO family ("+SPO", "+SPO(SFT)"), RPO's, SFT-mix's and DPOP's
#: lambda, DPO's beta. The grid of 2026-11-30 (README) swept the values up to gamma 30, lambda 10, DPOP
#: lambda 500 and beta 0.3, and several families chose their largest; the next value of each is added here so
#: that a winner at the old edge can be told from one past it (rerun on the validation seed on 2026-12-07: most
#: winners are now interior; DPO's beta 1 and SimPO+SPO's gamma 100 still rise at the edge, README).
SWEEP: dict[str, dict[str, tuple[float, ...]]] = {
    "+SPO": {"spo_gamma": (3.0, 10.0, 30.0, 100.0)},
    "RPO": {"lam": (0.3, 1.0, 3.0, 10.0, 30.0)},
    "SFT-mix": {"lam": (0.3, 1.0, 3.0, 10.0, 30.0)},
    "DPOP": {"lam": (5.0, 50.0, 500.0, 5000.0)},
    "DPO": {"beta": (0.03, 0.1, 0.3, 1.0)},
}

#: What "best" means when a family's hyperparameter is chosen on the validation seed.
CRITERIA = {
    "correctness": ("held-out accuracy", lambda r: r["accuracy"]),
    "style": ("win rate + held-out accuracy", lambda r: r["win_rate"] + r["accuracy"]),
}


def sweep_arms(families_: Sequence[str], sweep: Mapping[str, Mapping[str, Sequence[float]]] = SWEEP) -> list[Method]:
    """Every family at every swept value (families without a sweep entry: their defaults)."""
    out = []
    for f in families_:
        entry = sweep.get("+SPO" if is_spo_family(f) else f, {})
        if not entry:
            out.append(method(f))
            continue
        ((k, values),) = entry.items()
        out.extend(method(f, **{k: v}) for v in values)
    return out


def choose(runs: Mapping[str, dict], methods: Sequence[Method], setting: str) -> dict[str, Method]:
    """Per family, the arm with the highest criterion (:data:`CRITERIA`) on the validation runs;
    ties go to the first listed."""
    _, crit = CRITERIA[setting]
    best: dict[str, Method] = {}
    for m in methods:
        if m.family not in best or crit(runs[m.label]) > crit(runs[best[m.family].label]):
            best[m.family] = m
    return best


def run_grid(s: WorldSettings, out_dir: str, *, families_: Sequence[str], report_seeds: Sequence[int],
             validation_seed: int | None = None, settings: Sequence[str] = SETTINGS,
             fixed: Mapping[str, Mapping[str, float]] | None = None, n_boot: int = 2000,
             resume: bool = False) -> dict:
    """The whole comparison, written to ``out_dir`` (``results.json``, ``report.md``, ``pareto_style.png``).

    With ``validation_seed``: every family at every value of :data:`SWEEP` runs on that seed,
    each family's value is chosen there (:func:`choose`) and only the chosen arms run on the
    ``report_seeds`` (which must not include the validation seed). Without it: each family runs
    at its defaults, or at ``fixed[family]`` (e.g. ``{"RPO": {"lam": 10}, "+SPO": {"spo_gamma": 30}}``;
    ``"+SPO"`` holds every SPO family's), chosen before running; ``fixed`` may also map each
    setting to such a dict (``{"correctness": {...}, "style": {...}}``).

    ``resume``: continue a grid in ``out_dir`` that was killed, or extend it (more families or
    seeds): the world settings must equal the stored ones (``grid.json``); finished SFT models,
    pairs and arms are read back (:func:`~spo_jax.experiment.pipeline.run_world_seed`), the rest runs, and
    the results and report are written again from all of them."""
    out_dir = os.path.abspath(out_dir)
    _check_grid(s, out_dir, families_, report_seeds, validation_seed, resume)
    os.makedirs(out_dir, exist_ok=True)
    if not resume:
        write_json(os.path.join(out_dir, "grid.json"), {"settings": dataclasses.asdict(s)})
    t0, cpu0, load0 = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    chosen: dict[str, dict[str, Method]] = {}
    validation = None
    if validation_seed is not None:
        arms = sweep_arms(families_)
        validation = run_world_seed(s, validation_seed, {k: arms for k in settings},
                                    os.path.join(out_dir, f"seed{validation_seed}"), resume=resume)
        for k in settings:
            chosen[k] = choose(validation["settings"][k]["runs"], arms, k)
    else:
        chosen = fixed_arms(families_, settings, fixed)
    per_seed = [run_world_seed(s, seed, {k: list(chosen[k].values()) for k in settings},
                               os.path.join(out_dir, f"seed{seed}"), resume=resume) for seed in report_seeds]
    result = {"settings": dataclasses.asdict(s), "families": list(families_), "report_seeds": list(report_seeds),
              "validation_seed": validation_seed, "sweep": {k: {a: list(v) for a, v in d.items()}
                                                            for k, d in SWEEP.items()} if validation else None,
              "chosen": {k: {f: m.label for f, m in c.items()} for k, c in chosen.items()},
              "criteria": {k: CRITERIA[k][0] for k in settings},
              "validation": validation, "per_seed": per_seed}
    result["summary"] = summarize(result, n_boot=n_boot)
    result["timings_s"] = _timings(validation, per_seed, t0, cpu0, load0, resume)
    result["machine"] = _machine()
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, default=float)
    write_report(result, out_dir)
    return result


def fixed_arms(families_: Sequence[str], settings: Sequence[str],
               fixed: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, Method]]:
    """Per setting, each family at ``fixed``'s weights (see :func:`run_grid`) or at its defaults."""
    per_setting = bool(fixed) and set(fixed) <= set(SETTINGS)
    chosen = {}
    for k in settings:
        hp = (fixed or {}).get(k, {}) if per_setting else (fixed or {})
        chosen[k] = {f: method(f, **dict(hp.get(f if not is_spo_family(f) else "+SPO", {}))) for f in families_}
    return chosen


def _check_grid(s: WorldSettings, out_dir: str, families_: Sequence[str], report_seeds: Sequence[int],
                validation_seed: int | None, resume: bool) -> None:
    """Refuse, before anything runs or is written: a resume of a directory with no grid or other world
    settings, a new grid over earlier results, no report seed, a validation seed that also reports, an
    unknown family."""
    grid_file = os.path.join(out_dir, "grid.json")
    if resume:
        if not os.path.exists(grid_file):
            raise FileNotFoundError(f"--resume: {grid_file} not found; resume a directory an earlier grid run wrote, "
                                    "or drop --resume to start one")
        stored, now = read_json(grid_file, ("settings",))["settings"], json.loads(json.dumps(dataclasses.asdict(s)))
        if stored != now:
            diff = sorted(k for k in stored if stored[k] != now.get(k))
            raise ValueError(f"--resume: {out_dir} was run with other world settings (differ: {diff}); resume with "
                             "the same size (--quick or not), or use a new --out")
    else:
        taken = [n for n in sorted(os.listdir(out_dir)) if n in ("results.json", "report.md", "pareto_style.png",
                                                                  "grid.json")
                 or re.fullmatch(r"seed\d+", n)] if os.path.isdir(out_dir) else []
        if taken:
            raise FileExistsError(f"{out_dir} already holds results ({', '.join(taken)}); pass a new --out directory "
                                  "(or --resume it) -- earlier results are not overwritten")
    if not report_seeds:
        raise ValueError("report_seeds is empty; pass at least one seed")
    if validation_seed is not None and validation_seed in report_seeds:
        raise ValueError(f"validation seed {validation_seed} is also a report seed; the seeds that choose must not "
                         "measure")
    for f in families_:
        method(f)  # validates the names before anything runs


def _timings(validation: dict | None, per_seed: Sequence[dict], t0: float, cpu0: float, load0: float,
             resume: bool) -> dict:
    """This invocation's wall and CPU seconds (all threads), and the arms' and SFT runs' own seconds summed
    over every invocation (a resumed grid reads earlier arms back: their seconds are the time they took then)."""
    runs = ([validation] if validation else []) + list(per_seed)
    arm_s = sum(r["seconds"] for run in runs for st in run["settings"].values() for r in st["runs"].values())
    return {"total": time.perf_counter() - t0, "cpu": _cpu_seconds() - cpu0, "arms_all_runs": arm_s,
            "sft_all_runs": sum(run["timings_s"]["sft"] for run in runs),
            "load_start": load0, "load_end": os.getloadavg()[0], "resumed": bool(resume)}


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far."""
    t = os.times()
    return t.user + t.system


def _machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax_devices": str(jax.devices()),
            "load_avg_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
