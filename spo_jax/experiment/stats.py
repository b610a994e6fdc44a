"""Measurements and statistics: how a method moved its training pairs' log-probs (:func:`pair_shift`),
95% intervals paired across arms (:func:`paired_bootstrap`, :func:`diff_interval`), the Pareto frontier
(:func:`pareto_front`, :func:`frontier_position`) and the plain-words verdict against the baselines'
frontier (:func:`reading`), which says what the numbers show, whatever they show.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def pair_shift(start: Mapping[str, np.ndarray], now: Mapping[str, np.ndarray]) -> dict:
    """How a method moved the log-probs of its training pairs (``evaluate.pair_logps`` outputs of
    the start model and of the trained one, same pairs in the same order).

    Returns means and the per-pair vectors: ``delta_chosen`` [P] (summed log-prob, now − start),
    ``delta_rejected`` [P], ``violation`` [P] (1 where the chosen *token-mean* log-prob fell below
    the start's: SPO's q_i > 0), and their means ``delta_chosen_logp``, ``delta_rejected_logp``,
    ``delta_chosen_token_mean``, ``violation_frac``, ``margin_gain``."""
    if not np.array_equal(start["example_index"], now["example_index"]):
        raise ValueError("pair_shift: the two pair_logps results cover different pairs or orders")
    d_c = np.asarray(now["chosen"], float) - np.asarray(start["chosen"], float)
    d_r = np.asarray(now["rejected"], float) - np.asarray(start["rejected"], float)
    d_tm = d_c / np.asarray(start["chosen_len"], float)
    viol = (d_tm < 0).astype(float)
    return {"delta_chosen": d_c, "delta_rejected": d_r, "violation": viol,
            "delta_chosen_logp": float(d_c.mean()), "delta_rejected_logp": float(d_r.mean()),
            "delta_chosen_token_mean": float(d_tm.mean()), "violation_frac": float(viol.mean()),
            "margin_gain": float((d_c - d_r).mean())}



def paired_bootstrap(values: Mapping[str, Sequence[np.ndarray]], *, n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0, reference: str | None = None, return_draws: bool = False) -> dict[str, dict]:
    """Means and percentile intervals of per-item values, paired across arms.

    ``values[arm][s]`` is a 1-D array of per-item values (e.g. correct[problem]) of seed ``s``;
    for every seed all arms must have the same items in the same order. One bootstrap draw
    resamples the seeds with replacement and, within each seed, the items with replacement;
    the statistic is the mean over the drawn seeds of the per-seed item means. The *same*
    draws are used for every arm, so ``reference`` (an arm) also gives each arm's difference
    to it with its interval (``diff``, ``diff_lo``, ``diff_hi``). One seed: items only.

    Returns ``{arm: {"mean", "lo", "hi", "n_seeds", "n_items"[, "diff", "diff_lo", "diff_hi"][, "draws"]}}``
    (``draws``: the arm's bootstrap statistics, [n_boot], with ``return_draws``; the draws of two
    arms are paired, so :func:`diff_interval` of them is the interval of their difference).
    """
    arms = list(values)
    if not arms:
        raise ValueError("paired_bootstrap: no arms")
    n_seeds = len(values[arms[0]])
    if n_seeds == 0:
        raise ValueError("paired_bootstrap: no seeds")
    for a in arms:
        if len(values[a]) != n_seeds:
            raise ValueError(f"paired_bootstrap: arm {a!r} has {len(values[a])} seeds, {arms[0]!r} has {n_seeds}")
        for s in range(n_seeds):
            if np.ndim(values[a][s]) != 1 or len(values[a][s]) != len(values[arms[0]][s]) or not len(values[a][s]):
                raise ValueError(f"paired_bootstrap: arm {a!r} seed {s}: items must be a non-empty 1-D array as "
                                 f"long as arm {arms[0]!r}'s ({len(values[arms[0]][s])}): pair the same items")
    if reference is not None and reference not in values:
        raise ValueError(f"paired_bootstrap: reference {reference!r} is not an arm ({arms})")
    rng = np.random.default_rng(seed)
    per_seed = {a: np.empty((n_boot, n_seeds)) for a in arms}
    for s in range(n_seeds):
        n = len(values[arms[0]][s])
        idx = rng.integers(n, size=(n_boot, n))
        for a in arms:
            per_seed[a][:, s] = np.asarray(values[a][s], float)[idx].mean(axis=1)
    pick = rng.integers(n_seeds, size=(n_boot, n_seeds)) if n_seeds > 1 else np.zeros((n_boot, 1), int)
    boot = {a: np.take_along_axis(per_seed[a], pick, axis=1).mean(axis=1) for a in arms}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    out = {}
    for a in arms:
        point = float(np.mean([np.mean(np.asarray(v, float)) for v in values[a]]))
        lo, hi = np.percentile(boot[a], q)
        r = {"mean": point, "lo": float(lo), "hi": float(hi), "n_seeds": n_seeds,
             "n_items": int(sum(len(v) for v in values[a]))}
        if reference is not None:
            ref_point = float(np.mean([np.mean(np.asarray(v, float)) for v in values[reference]]))
            dlo, dhi = np.percentile(boot[a] - boot[reference], q)
            r.update(diff=point - ref_point, diff_lo=float(dlo), diff_hi=float(dhi))
        if return_draws:
            r["draws"] = boot[a]
        out[a] = r
    return out


def diff_interval(a: Mapping, b: Mapping, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean_a − mean_b, lo, hi)`` from two arms of one :func:`paired_bootstrap` call made with
    ``return_draws=True`` (the same draws, so the interval is that of the paired difference)."""
    d = np.asarray(a["draws"]) - np.asarray(b["draws"])
    lo, hi = np.percentile(d, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return a["mean"] - b["mean"], float(lo), float(hi)


# --------------------------------------------------------------------------- #
# Pareto frontier and the reading
# --------------------------------------------------------------------------- #


def dominates(p: Sequence[float], q: Sequence[float]) -> bool:
    """``p`` is at least as good as ``q`` on both objectives (higher is better) and better on one."""
    return p[0] >= q[0] and p[1] >= q[1] and (p[0] > q[0] or p[1] > q[1])


def pareto_front(points: Mapping[str, Sequence[float]]) -> list[str]:
    """The labels of the points no other point dominates, sorted by the first objective."""
    front = [a for a, p in points.items() if not any(dominates(q, p) for b, q in points.items() if b != a)]
    return sorted(front, key=lambda a: (points[a][0], points[a][1]))


def frontier_position(point: Sequence[float], baselines: Mapping[str, Sequence[float]]) -> tuple[str, list[str]]:
    """Where ``point`` lies against the Pareto frontier of the ``baselines`` points:

    * ``"behind"``: some baseline point dominates it (returned: those baselines);
    * ``"ahead of"``: no baseline dominates it and it dominates at least one frontier point
      (returned: the frontier points it dominates) -- it moves the frontier out;
    * ``"on"``: neither (it trades one objective for the other along the frontier).
    """
    if not baselines:
        raise ValueError("frontier_position: no baseline points")
    over = [b for b, q in baselines.items() if dominates(q, point)]
    if over:
        return "behind", over
    front = pareto_front(baselines)
    beaten = [b for b in front if dominates(point, baselines[b])]
    return ("ahead of", beaten) if beaten else ("on", [])


def reading(points: Mapping[str, Sequence[float]], diffs: Callable[[str, str], Sequence[tuple[float, float]]],
            names: Sequence[str], *, spo_families: Sequence[str], baseline_families: Sequence[str],
            family_of: Mapping[str, str]) -> str:
    """A plain-words verdict per SPO point against the frontier of the baseline points.

    ``points[label] = (x, y)`` (both higher-is-better, named ``names``); ``diffs(a, b)`` the 95%
    intervals ``((lo, hi) on x, (lo, hi) on y)`` of the paired differences a − b;
    ``family_of[label]`` its family. Says "ahead of", "on" or "behind", which baselines decide
    it, and whether the deciding difference is resolved (on some axis the interval of the
    difference excludes 0) or within the noise."""
    base = {a: p for a, p in points.items() if family_of[a] in baseline_families}
    if not base:
        return "No baseline points: no frontier to compare with."
    front = pareto_front(base)
    lines = [f"Frontier of the baselines ({', '.join(baseline_families)}) in ({names[0]}, {names[1]}): "
             + ", ".join(f"{a} ({points[a][0]:.3f}, {points[a][1]:.3f})" for a in front) + "."]
    counts = {"ahead of": 0, "on": 0, "behind": 0}
    for a, p in points.items():
        if family_of[a] not in spo_families:
            continue
        where, by = frontier_position(p, base)
        counts[where] += 1
        if by:
            sure = all(any(lo > 0 or hi < 0 for lo, hi in diffs(a, b)) for b in by)
            tail = (f" ({'dominating' if where == 'ahead of' else 'dominated by'} {', '.join(by)}; "
                    + ("the 95% interval of the paired difference excludes 0 on at least one axis)" if sure else
                       "within the noise: the 95% intervals of the paired differences include 0 on both axes)"))
        else:
            tail = " (it trades one objective for the other against the frontier)"
        lines.append(f"{a} ({p[0]:.3f}, {p[1]:.3f}) is {where.upper()} the frontier{tail}.")
    n = sum(counts.values())
    lines.append(f"In all: {counts['ahead of']} of {n} SPO points ahead of the baselines' frontier, "
                 f"{counts['on']} on it, {counts['behind']} behind it.")
    return " ".join(lines)

