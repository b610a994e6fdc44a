"""The report of a grid or demo run: :func:`summarize` (per setting and arm, bootstrap means and 95%
intervals over the report seeds, and the generated readings), :func:`write_report` (``report.md``: the
tables, the readings, which seeds chose and which measured, the SFT curves, the timings) and
:func:`pareto_figure` (``pareto_style.png``: setting (b)'s win rate against held-out accuracy).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from spo_jax.experiment.methods import FRONTIER_BASELINES, is_spo_family, plain_family
from spo_jax.experiment.stats import diff_interval, paired_bootstrap, reading
from spo_jax.experiment.style import win_rate
from spo_jax.experiment.world import SFT_RULE, curve_words


def summarize(result: Mapping, *, n_boot: int = 2000) -> dict:
    """Per setting and chosen arm, over the report seeds: bootstrap means and 95% intervals of
    accuracy (and its difference to SFT), win rate, style reward, chosen / rejected log-prob
    change and violation fraction. Pure function of ``result`` (tested on stored results)."""
    seeds = result["per_seed"]
    out = {}
    for k in seeds[0]["settings"]:
        labels = list(seeds[0]["settings"][k]["runs"])
        for run in seeds[1:]:
            if list(run["settings"][k]["runs"]) != labels:
                raise ValueError(f"setting {k}: the report seeds ran different arms; cannot pair them")
        acc = {"SFT": [np.asarray(r["sft"]["correct"], float) for r in seeds]}
        acc.update({a: [np.asarray(r["settings"][k]["runs"][a]["correct"], float) for r in seeds] for a in labels})
        win = {"SFT": [np.full(len(r["sft"]["correct"]), 0.5) for r in seeds]}
        win.update({a: [np.asarray(r["settings"][k]["runs"][a]["reward_items"], float) for r in seeds]
                    for a in labels})
        for a in labels:
            win[a] = [win_rate(w, r["sft"]["reward_items"]) for w, r in zip(win[a], seeds)]
        rew = {"SFT": [np.asarray(r["sft"]["reward_items"], float) for r in seeds]}
        rew.update({a: [np.asarray(r["settings"][k]["runs"][a]["reward_items"], float) for r in seeds]
                    for a in labels})
        per_pair = {f: {a: [np.asarray(r["settings"][k]["runs"][a][f], float) for r in seeds] for a in labels}
                    for f in ("delta_chosen", "delta_rejected", "violation")}
        # accuracy and win rate share one set of draws (same seed): paired across arms and across the two
        stats = {"accuracy": paired_bootstrap(acc, n_boot=n_boot, reference="SFT", return_draws=True),
                 "win_rate": paired_bootstrap(win, n_boot=n_boot, return_draws=True),
                 "reward": paired_bootstrap(rew, n_boot=n_boot, seed=2),
                 **{f: paired_bootstrap(v, n_boot=n_boot, seed=3 + i) for i, (f, v) in enumerate(per_pair.items())}}
        fams = {a: seeds[0]["settings"][k]["methods"][a]["family"] for a in labels}
        fams["SFT"] = "SFT"
        out[k] = {"labels": labels, "family": fams, **stats}
        out[k]["reading"] = (_reading_correctness(out[k]) if k == "correctness" else _reading_style(out[k]))
        for f in ("accuracy", "win_rate"):
            for r in out[k][f].values():
                r.pop("draws")
    return out


def _reading_style(st: Mapping) -> str:
    labels = st["labels"]
    pts = {a: (st["accuracy"][a]["mean"], st["win_rate"][a]["mean"]) for a in labels}

    def diffs(a, b):
        return [diff_interval(st[f][a], st[f][b])[1:] for f in ("accuracy", "win_rate")]

    fam = st["family"]
    return reading(pts, diffs, ("held-out accuracy", "win rate vs SFT"),
                   spo_families=[f for f in set(fam.values()) if is_spo_family(f)],
                   baseline_families=[f for f in FRONTIER_BASELINES if f in fam.values()], family_of=fam)


def _reading_correctness(st: Mapping) -> str:
    """On correctness pairs preference and ability are one objective: each SPO arm's accuracy
    against the best baseline's, with the paired interval of the difference."""
    fam, acc = st["family"], st["accuracy"]
    base = [a for a in st["labels"] if fam[a] in FRONTIER_BASELINES]
    if not base:
        return "No baseline arms: nothing to compare SPO with."
    best = max(base, key=lambda a: acc[a]["mean"])
    parts = [f"Best baseline by held-out accuracy: {best} ({acc[best]['mean']:.3f} "
             f"[{acc[best]['lo']:.3f}, {acc[best]['hi']:.3f}]; SFT {acc['SFT']['mean']:.3f})."]
    for a in st["labels"]:
        if not is_spo_family(fam[a]):
            continue
        d, lo, hi = diff_interval(acc[a], acc[best])  # paired: the same bootstrap draws
        word = "AHEAD OF" if lo > 0 else "BEHIND" if hi < 0 else "LEVEL WITH (the interval includes 0)"
        plain = plain_family(fam[a])
        alone = acc.get(next((b for b in st["labels"] if fam[b] == plain), ""), None)
        tail = (f"; the loss alone reaches {alone['mean']:.3f}" if alone else "")
        parts.append(f"{a}: {acc[a]['mean']:.3f} [{acc[a]['lo']:.3f}, {acc[a]['hi']:.3f}], {d:+.3f} "
                     f"[{lo:+.3f}, {hi:+.3f}] vs {best}: {word} the best baseline{tail}.")
    return " ".join(parts)


def ci(r: Mapping, nd: int = 3, diff: bool = False) -> str:
    """``mean [lo, hi]`` of a :func:`~spo_jax.experiment.stats.paired_bootstrap` arm (``diff``: its difference
    to the reference arm), ``nd`` decimals."""
    if diff:
        return f"{r['diff']:+.{nd}f} [{r['diff_lo']:+.{nd}f}, {r['diff_hi']:+.{nd}f}]"
    return f"{r['mean']:.{nd}f} [{r['lo']:.{nd}f}, {r['hi']:.{nd}f}]"


def _time_line(result: Mapping) -> str:
    t, m = result["timings_s"], result["machine"]
    line = (f"Wall time of this invocation: {t['total']:.0f} s, {t.get('cpu', float('nan')):.0f} CPU s, on "
            f"{m['cpu_count']} CPU cores (1-min load average at the end {m['load_avg_1min_at_end'] or float('nan'):.1f}).")
    if t.get("resumed"):
        line += (f" It resumed a grid: the SFT models took {t['sft_all_runs']:.0f} s and the arms "
                 f"{t['arms_all_runs']:.0f} s of wall time summed over the invocations that ran them (concurrent "
                 "processes on a shared machine count each their own wall time).")
    return line


def write_report(result: Mapping, out_dir: str) -> str:
    """``report.md`` (tables with 95% intervals, the readings, which seeds chose and which
    measured, the SFT curves, timings) and ``pareto_style.png``; returns the report text."""
    summ, seeds = result["summary"], result["per_seed"]
    L = _report_header(result)
    for k, st in summ.items():
        L += ["", f"## Setting {'(a) correctness pairs' if k == 'correctness' else '(b) off-task style preference'}", ""]
        L += _correctness_table(st, seeds) if k == "correctness" else _style_table(st)
        L += ["", "**Reading** (generated from the numbers above): " + st["reading"]]
    L += ["", "Columns: Δ log p = summed log-prob of the setting's training pairs, trained model minus SFT; "
          "violation frac = share of pairs whose chosen token-mean log-prob fell below the SFT model's (SPO's "
          "q_i > 0); win rate = share of held-out prompts where the arm's greedy response has a higher style reward "
          "than the SFT model's (ties half); style reward = share of equations written result-first.", "",
          _time_line(result)]
    text = "\n".join(L) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    if "style" in summ:
        pareto_figure(result, os.path.join(out_dir, "pareto_style.png"))
    return text


def _report_header(result: Mapping) -> list[str]:
    """Which seeds chose and which measured, the chosen arms, the world's sizes and the SFT curves."""
    s = result["settings"]
    if result.get("validation_seed") is not None:
        L = [f"Hyperparameters were swept on **seed {result['validation_seed']}** (its own task split, SFT, "
             f"samples and pairs; criteria: " + "; ".join(f"{k}: {v}" for k, v in result["criteria"].items())
             + f") and the chosen ones are **reported on seeds {result['report_seeds']}**, which chose nothing."]
    else:
        L = [f"No sweep: every family ran at hyperparameters fixed before running; seeds {result['report_seeds']}."]
    return ["# SPO against the simple fixes on the synthetic world", "", *L,
            "", "Chosen arms: " + "; ".join(f"{k}: " + ", ".join(c.values()) for k, c in result["chosen"].items())
            + ".", "", f"Every seed is a whole pipeline (task split -> SFT -> samples -> pairs -> preference order). "
            f"Held-out problems per seed: {s['n_test']}; pairs per setting from {s['n_pair_prompts']} training prompts "
            f"x {s['num_samples']} samples; preference training {s['pref_steps']} steps, batch {s['pref_batch']}, "
            f"AdamW lr {s['pref_lr']}, the same for every arm. Intervals: 95% paired bootstrap over seeds and items.",
            "", "SFT (greedy accuracy on the validation problems during SFT, per seed): "
            + "; ".join(f"seed {r['seed']}: " + ", ".join(f"{k}: {v:.3f}" for k, v in r['sft']['curve'].items())
                        + f" -- {curve_words(r['sft']['curve'])}; the arms start from step {_start(r['sft'])}"
                        for r in result["per_seed"]) + f". Rule: {SFT_RULE}."]


def _start(sft: Mapping) -> int:
    """The SFT step the arms started from (a result written before the best-point rule: the last one)."""
    return sft.get("chosen_step", max(int(k) for k in sft["curve"]))


def _correctness_table(st: Mapping, seeds: Sequence[Mapping]) -> list[str]:
    """Setting (a)'s table (accuracy, pair shift, violation, mass split) and the gradient geometry line."""
    acc = st["accuracy"]

    def mass(get):
        m = [get(r) for r in seeds]
        return " / ".join(f"{np.mean([x[n] for x in m]):.2f}" for n in ("chosen", "rejected", "other"))
    L = ["| arm | held-out accuracy | Δ vs SFT | Δ log p chosen | Δ log p rejected | violation frac | "
         "mass: chosen / rejected / other |", "|---|---|---|---|---|---|---|",
         f"| SFT | {ci(acc['SFT'])} | 0 | 0 | 0 | - | "
         f"{mass(lambda r: r['settings']['correctness']['sft_mass_split'])} |"]
    for a in st["labels"]:
        L.append(f"| {a} | {ci(acc[a])} | {ci(acc[a], diff=True)} | {ci(st['delta_chosen'][a], 2)} | "
                 f"{ci(st['delta_rejected'][a], 2)} | {ci(st['violation'][a], 2)} | "
                 f"{mass(lambda r, a=a: r['settings']['correctness']['runs'][a]['mass_split'])} |")
    g = [r["settings"]["correctness"]["gradient_diagnostics"] for r in seeds]
    return L + ["", "Mass: share of answers sampled at the pairs' prompts equal to the pair's chosen answer / its "
                "rejected answer / anything else. Gradient geometry at the SFT model (per-example gradients of "
                f"{g[0]['num_pairs']} pairs): mean cos(g_w, g_l) "
                + ", ".join(f"{x['mean_cos']:.3f}" for x in g) + "; share of pairs where one DPO step lowers the "
                "chosen log-prob to first order (<g_w, g_l> > |g_w|^2): "
                + ", ".join(f"{x['frac_dpo_lowers_chosen']:.2f}" for x in g) + " (per seed)."]


def _style_table(st: Mapping) -> list[str]:
    """Setting (b)'s table (win rate, style reward, accuracy, pair shift, violation) and the figure."""
    acc = st["accuracy"]
    L = ["| arm | win rate vs SFT | style reward | held-out accuracy | Δ acc vs SFT | Δ log p chosen | "
         "violation frac |", "|---|---|---|---|---|---|---|",
         f"| SFT | 0.500 | {ci(st['reward']['SFT'])} | {ci(acc['SFT'])} | 0 | 0 | - |"]
    for a in st["labels"]:
        L.append(f"| {a} | {ci(st['win_rate'][a])} | {ci(st['reward'][a])} | {ci(acc[a])} | "
                 f"{ci(acc[a], diff=True)} | {ci(st['delta_chosen'][a], 2)} | {ci(st['violation'][a], 2)} |")
    return L + ["", "![Pareto](pareto_style.png)"]


def pareto_figure(result: Mapping, path: str) -> None:
    """Setting (b): win rate against held-out accuracy, one point per arm on the report seeds
    (95% intervals as error bars), the validation seed's whole sweep as small markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = result["summary"]["style"]
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    fams = sorted(set(st["family"].values()))
    color = {f: f"C{i % 10}" for i, f in enumerate(fams)}
    val = result.get("validation")
    if val is not None and "style" in val["settings"]:
        sft_r = np.asarray(val["sft"]["reward_items"], float)
        for a, r in val["settings"]["style"]["runs"].items():
            f = val["settings"]["style"]["methods"][a]["family"]
            ax.scatter(r["accuracy"], win_rate(r["reward_items"], sft_r).mean(), s=14, marker="x",
                       color=color.get(f, "gray"), alpha=0.6)
    for a in ["SFT"] + st["labels"]:
        acc, win = st["accuracy"][a], st["win_rate"][a]
        f = st["family"][a]
        ax.errorbar(acc["mean"], win["mean"], xerr=[[acc["mean"] - acc["lo"]], [acc["hi"] - acc["mean"]]],
                    yerr=[[win["mean"] - win["lo"]], [win["hi"] - win["mean"]]], fmt="o" if is_spo_family(f) else "s",
                    color="black" if a == "SFT" else color[f], capsize=3, ms=6)
        ax.annotate(a, (acc["mean"], win["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("held-out greedy accuracy (ability)")
    ax.set_ylabel("win rate vs SFT, exact style reward (preference)")
    ax.set_title("Setting (b): preference vs ability (circles: +SPO"
                 + ("; x: validation-seed sweep)" if val is not None else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
