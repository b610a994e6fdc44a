"""The experiment pipeline: start model -> pairs -> every method from the same start -> measurements -> report.

One pipeline, used by the demo (``python -m spo_jax.demo``), by the evidence grid
(``python -m spo_jax.experiment``) and by ``experiments/smollm2.py``:

1. **Methods** (:class:`Method`, :func:`method`): the six Bradley-Terry losses of the
   paper's Table 2 (DPO, CPO, DPOP, R-DPO, SimPO, AlphaDPO), each alone or ``+SPO``
   (penalty solver, reference value, per-sample relu, weight ``spo_gamma``), and the
   baselines a reviewer asks for: **RFT** (fine-tuning on the chosen responses alone,
   loss ``sft``), **RPO** (DPO + λ·NLL of the chosen, loss ``rpo``), **DPOP** and
   **SFT-mix** (DPO + λ·NLL of the SFT data, ``loss.sft_data_weight``), and
   **DPO+SPO(SFT)**: SPO whose lower level is the SFT objective on the SFT data (penalty
   solver, value ``inner_sft``).
   :func:`apply_method` writes a method into a trainer config; every method of a
   comparison gets the same start, pairs, order, seed, steps and optimiser
   (:func:`compare`).
2. **Measurements**: :func:`pair_shift` (change of the chosen / rejected log-probs of the
   training pairs against the start model, the violation fraction = share of pairs whose
   chosen token-mean log-prob fell below the start's, SPO's q_i > 0) and, per setting,
   per-item vectors (correct[problem], reward[problem]) so that statistics can pair them.
3. **Statistics**: :func:`paired_bootstrap` (95% intervals, resampling seeds and, within
   each seed, items -- the same draws for every method, so differences are paired).
4. **Pareto and reading**: :func:`pareto_front`, :func:`frontier_position` ("ahead of",
   "on" or "behind" the frontier of the baselines) and :func:`reading`, which writes the
   verdict from the numbers, whatever they show.

**The synthetic world** (``spo_jax.data.synthetic``, a from-scratch Llama on a CPU) has
two settings, built from one SFT model per whole-pipeline seed (:func:`run_world_seed`):

* ``correctness`` (the paper's GSM8K column): on-policy samples of training prompts, a
  correct answer chosen, an incorrect one rejected (``sampling.sample_pairs``);
* ``style`` (the paper's UltraFeedback -> GSM8K shape): the SFT data write each equation
  either forward (``52 - 7 = 45``) or result-first (``45 = 52 - 7``), at random; the
  preference is for the result-first style, an exactly computable reward
  (:func:`style_reward`: the share of a response's equations written result-first) that
  says nothing about correctness -- and writing the result before the operation is
  *harder* for a left-to-right model, so preference and ability pull apart, as
  helpfulness and reasoning can. Pairs come from on-policy samples of *other* training
  prompts than the correctness pairs (never the held-out problems): the sample with the
  highest reward is chosen, the one with the lowest rejected. Preference quality = the
  exact win rate of the method's greedy responses against the SFT model's on the
  held-out prompts (ties count half; :func:`win_rate`) and their mean reward; ability =
  greedy accuracy on the same held-out arithmetic problems.

The SFT model is trained until its held-out accuracy has levelled off (``sft_steps``, then on by
``sft_eval_every`` while the validation curve still rises, up to ``sft_max_steps``:
:func:`sft_until_levelled`; the curve is in the report), so that an extra NLL term cannot pass
for SPO's effect.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import jax
import ml_collections
import numpy as np
from flax import nnx

from spo_jax import evaluate, losses, models, sampling
from spo_jax import compile_cache
from spo_jax.compile_cache import CompileStats, enable_compile_cache
from spo_jax.config import get_default_config
from spo_jax.data import BatchIterator, prepare_dataset, synthetic
from spo_jax.train import train

logger = logging.getLogger("spo_jax.experiment")

# --------------------------------------------------------------------------- #
# Methods
# --------------------------------------------------------------------------- #

#: The paper's Table 2 losses: family -> (registered loss, default hparams). Defaults as in
#: experiments/paper.py (DPO beta 0.1; CPO lam 1; DPOP lam 50; R-DPO alpha 0.01; SimPO beta 2,
#: gamma 1; AlphaDPO + alpha 0.1).
BT_LOSSES: dict[str, tuple[str, dict]] = {
    "DPO": ("dpo", {"beta": 0.1}),
    "CPO": ("cpo", {"beta": 0.1, "lam": 1.0}),
    "DPOP": ("dpop", {"beta": 0.1, "lam": 50.0}),
    "R-DPO": ("rdpo", {"beta": 0.1, "alpha": 0.01}),
    "SimPO": ("simpo", {"beta": 2.0, "gamma": 1.0}),
    "AlphaDPO": ("alphadpo", {"beta": 2.0, "gamma": 1.0, "alpha": 0.1}),
}
#: The simple fixes SPO is compared with (DPOP is also one of the BT losses above).
BASELINES: dict[str, tuple[str, dict]] = {
    "RFT": ("sft", {}),                          # fine-tuning on the chosen responses alone
    "RPO": ("rpo", {"beta": 0.1, "lam": 1.0}),   # DPO + lam * token-mean NLL of the chosen
    "SFT-mix": ("dpo", {"beta": 0.1}),           # DPO + lam * token-mean NLL of the SFT data (SFT_MIX_LAMBDA)
}
#: Baseline families whose frontier decides the claim (item 6 of issue 14).
FRONTIER_BASELINES = ("RFT", "RPO", "DPOP", "SFT-mix")
SPO_GAMMA = 10.0  # the prototype's weight (docs/METHOD.md)
SFT_MIX_LAMBDA = 1.0  # SFT-mix's default weight λ of the SFT-data NLL (swept in SWEEP)
#: SPO with the SFT objective on the SFT data as its lower level: family -> (its loss, the SPO settings
#: beyond apply_method's penalty defaults). One inner SGD step keeps it cheap in the 2-core grid; with
#: epsilon 0, q_i > 0 for nearly every SFT sequence, so its direction is close to that of SFT-mix at
#: lambda = gamma (docs/METHOD.md).
SPO_SFT_FAMILIES: dict[str, tuple[str, dict]] = {
    "DPO+SPO(SFT)": ("DPO", {"value": "inner_sft", "inner_steps": 1, "inner_lr": 1e-2}),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One arm of a comparison: a family (``"DPO+SPO"``, ``"RPO"``, ...) at given hyperparameters.

    ``loss``/``hparams``: the registered loss (``spo_jax.losses``); ``spo_gamma`` > 0 wraps it in
    SPO's penalty solver (per-sample relu, epsilon 0) with that weight, its value ``"reference"``
    or, for the ``+SPO(SFT)`` families, ``"inner_sft"`` on the SFT data (``spo_extra``: the
    further ``spo.*`` settings); ``sft_data_weight`` > 0 adds λ·NLL of the SFT data (SFT-mix).
    ``label``: the family plus the hyperparameters that differ from the family's defaults.
    """

    family: str
    loss: str
    hparams: tuple[tuple[str, float], ...]
    spo_gamma: float = 0.0
    label: str = ""
    sft_data_weight: float = 0.0
    spo_extra: tuple[tuple[str, Any], ...] = ()

    @property
    def hp(self) -> dict:
        return dict(self.hparams)

    @property
    def spo(self) -> bool:
        return self.spo_gamma > 0

    @property
    def uses_sft_data(self) -> bool:
        """Whether the arm trains on the SFT data too (SFT-mix, the +SPO(SFT) families)."""
        return self.sft_data_weight > 0 or dict(self.spo_extra).get("value") == "inner_sft"

    def spec(self) -> dict:
        """The fields that define the arm (``arm.json``'s ``method``); the SFT-data fields only for
        the arms that read SFT data, so an arm recorded before those fields existed still matches."""
        spec = dataclasses.asdict(self)
        if not self.uses_sft_data:
            del spec["sft_data_weight"], spec["spo_extra"]
        return spec

    @property
    def base(self) -> str:
        """The family without its SPO suffix (``+SPO``, ``+SPO(SFT)``)."""
        return plain_family(self.family)


def is_spo_family(family: str) -> bool:
    """``<loss>+SPO`` or a ``+SPO(SFT)`` family."""
    return family.endswith("+SPO") or family in SPO_SFT_FAMILIES


def plain_family(family: str) -> str:
    """The loss alone of an SPO family (``"DPO+SPO(SFT)"`` -> ``"DPO"``); other families unchanged."""
    if family in SPO_SFT_FAMILIES:
        return SPO_SFT_FAMILIES[family][0]
    return family[:-4] if family.endswith("+SPO") else family


def families() -> list[str]:
    return [f for b in BT_LOSSES for f in (b, b + "+SPO")] + list(BASELINES) + list(SPO_SFT_FAMILIES)


def method(family: str, **overrides) -> Method:
    """``method("DPO+SPO", spo_gamma=30)``, ``method("RPO", lam=10)``, ``method("RFT")``,
    ``method("SFT-mix", lam=3)``, ``method("DPO+SPO(SFT)", spo_gamma=3)``.

    Overrides are loss hyperparameters, SFT-mix's ``lam`` (the SFT-data weight) or ``spo_gamma``
    (only for SPO families). Raises ValueError naming the family / hyperparameter and the accepted ones.
    """
    spo = is_spo_family(family)
    base = plain_family(family)
    table = {**BT_LOSSES, **BASELINES}
    if base not in table or (spo and base not in BT_LOSSES):
        raise ValueError(f"unknown method family {family!r}; choose from {families()}")
    loss, hp = table[base]
    hp = dict(hp)
    mix = base == "SFT-mix"
    sft_weight = SFT_MIX_LAMBDA if mix else 0.0
    gamma = SPO_GAMMA if spo else 0.0
    shown = []
    for k, v in overrides.items():
        if k == "spo_gamma":
            if not spo:
                raise ValueError(f"{family!r} has no SPO term; spo_gamma only applies to '<loss>+SPO' families")
            gamma = float(v)
        elif mix and k == "lam":
            sft_weight = float(v)
        elif k in hp:
            hp[k] = float(v)
        else:
            raise ValueError(f"{family!r} has no hyperparameter {k!r}; accepted: "
                             f"{sorted(hp) + (['lam'] if mix else []) + (['spo_gamma'] if spo else [])}")
        shown.append(f"{'γ' if k == 'spo_gamma' else 'λ' if k == 'lam' else 'β' if k == 'beta' else k}={v:g}")
    label = family + (" " + ",".join(shown) if shown else "")
    extra = tuple(sorted(SPO_SFT_FAMILIES[family][1].items())) if family in SPO_SFT_FAMILIES else ()
    return Method(family, loss, tuple(sorted(hp.items())), gamma, label, sft_weight, extra)


def apply_method(c, m: Method):
    """Write method ``m`` into a preference-stage trainer config ``c`` (in place; returns it):
    loss name and hyperparameters, no NLL term of the chosen, the SFT-data weight, SPO on/off,
    and the reference mode (``cached`` when the loss or SPO reads reference log-probs, else
    ``none``). Arms with ``m.uses_sft_data`` need the SFT data (``train(..., sft_data=)``:
    :func:`compare` passes it to those arms only)."""
    c.stage = "preference"
    c.loss.name = m.loss
    c.loss.hparams = ml_collections.ConfigDict(m.hp)
    c.loss.sft_weight = 0.0
    c.loss.sft_data_weight = float(m.sft_data_weight)
    c.spo.enabled = m.spo
    if m.spo:
        c.spo.solver = "penalty"
        c.spo.value = "reference"
        c.spo.gamma = float(m.spo_gamma)
        c.spo.epsilon = 0.0
        c.spo.per_sample = True
        c.spo.squared = False
        for k, v in m.spo_extra:
            c.spo[k] = v
    spo_reads_reference = m.spo and c.spo.value == "reference"
    c.reference.mode = "cached" if (losses.uses_reference(m.loss) or spo_reads_reference) else "none"
    return c


# --------------------------------------------------------------------------- #
# The style preference (setting b)
# --------------------------------------------------------------------------- #

_FORWARD = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)$")
_RESULT_FIRST = re.compile(r"^(\d+) = (\d+) ([-+*]) (\d+)$")


def restyle_answer(answer: str, rng: np.random.Generator, p_result_first: float) -> str:
    """Rewrite each forward equation ``a op b = c .`` of a synthetic answer as ``c = a op b .``
    with probability ``p_result_first`` (the final ``#### N`` is kept)."""
    body, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError(f"restyle_answer: {answer!r:.80} has no '#### N' final answer")
    out = []
    for step in (s.strip() for s in body.split(" .")):
        if not step:
            continue
        m = _FORWARD.match(step)
        if m and rng.random() < p_result_first:
            a, op, b, c = m.groups()
            step = f"{c} = {a} {op} {b}"
        out.append(step + " .")
    return " ".join(out + ["####" + final])


def style_reward(text: str) -> float:
    """The exact ground-truth reward of setting (b): the share of the response's equations
    written result-first (``c = a op b``); 0 for a response with no equation."""
    body = text.split("####")[0]
    n = first = 0
    for step in (s.strip() for s in body.split(".")):
        if _RESULT_FIRST.match(step):
            n += 1
            first += 1
        elif _FORWARD.match(step):
            n += 1
    return first / n if n else 0.0


def win_rate(reward: np.ndarray, reference_reward: np.ndarray) -> np.ndarray:
    """Per item: 1 if ``reward`` beats the reference's, 0.5 on a tie, 0 otherwise."""
    reward, reference_reward = np.asarray(reward, float), np.asarray(reference_reward, float)
    return np.where(reward > reference_reward, 1.0, np.where(reward == reference_reward, 0.5, 0.0))


def style_pairs(prompts: Sequence[str], samples: Sequence[Sequence[str]]) -> tuple[list[dict], dict]:
    """Setting (b)'s pairs: per prompt, the sample of highest :func:`style_reward` chosen and the
    lowest rejected (the first of each on ties); prompts whose samples all score the same give
    no pair. Responses get the completion template's leading space (as ``sample_pairs``)."""
    pairs = []
    rewards_all = []
    for q, (prompt, texts) in enumerate(zip(prompts, samples)):
        texts = [t for t in texts if t.strip()]
        rewards = [style_reward(t) for t in texts]
        rewards_all.extend(rewards)
        if len(texts) < 2 or max(rewards) == min(rewards):
            continue
        hi, lo = int(np.argmax(rewards)), int(np.argmin(rewards))
        pairs.append({"prompt": prompt, "chosen": _as_response(texts[hi]), "rejected": _as_response(texts[lo]),
                      "chosen_reward": rewards[hi], "rejected_reward": rewards[lo], "question_index": q})
    stats = {"num_questions": len(prompts), "num_pairs": len(pairs),
             "mean_sample_reward": float(np.mean(rewards_all)) if rewards_all else float("nan")}
    return pairs, stats


def _as_response(text: str) -> str:
    return text if text.startswith((" ", "\n")) else " " + text


# --------------------------------------------------------------------------- #
# Measurements
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------- #


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



# --------------------------------------------------------------------------- #
# Running methods from one start
# --------------------------------------------------------------------------- #


def compare(methods: Sequence[Method], *, make_config: Callable[[Method, str], Any], train_data,
            measure: Callable[[Method, Any, Any], dict], out_dir: str, eval_data=None,
            resume: bool = False, sft_data=None, keep_checkpoints: bool = True) -> dict[str, dict]:
    """Train every method from the same start and measure it.

    ``make_config(method, run_dir)`` returns the preference-stage trainer config (same start,
    seed, steps and optimiser for every method: only :func:`apply_method`'s fields may differ);
    ``measure(method, graphdef, params)`` returns the method's measurements; ``sft_data``: the
    SFT rows of every arm, batched beside the pairs for the arms that read them
    (``Method.uses_sft_data``; the others train exactly as without them). Returns
    ``{label: {**measurements, "seconds", "final_train_loss", "steps"}}`` in ``methods`` order.

    Each finished arm is written to ``<run_dir>/arm.json`` (atomically). With ``resume``, an arm
    whose ``arm.json`` exists is read back instead of trained (its method must match, else
    ValueError), and an arm a killed run left half-done is started again from scratch, so the arm's
    final checkpoint serves nothing here: ``keep_checkpoints=False`` deletes it once ``arm.json`` is
    written (a 135M model's parameters and AdamW moments are 1.6 GB per arm)."""
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"compare: duplicate method labels {labels}; give each arm its own hyperparameters")
    need = [m.label for m in methods if m.uses_sft_data]
    if need and sft_data is None:
        raise ValueError(f"compare: arms {need} train on SFT data; pass sft_data= (the SFT training rows)")
    out = {}
    for m in methods:
        t = time.perf_counter()
        run_dir = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_.=-]+", "_", m.label))
        done = os.path.join(run_dir, "arm.json")
        spec = m.spec()
        if resume and os.path.exists(done):
            rec = _read_json(done, ("method", "result"))
            if rec["method"] != json.loads(json.dumps(spec)):
                raise ValueError(f"{done} holds a different method ({rec['method']}) than {spec}; "
                                 "resume only with the same settings, or use a new --out")
            out[m.label] = rec["result"]
            logger.info("%s: read back from %s", m.label, done)
            continue
        if resume and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)  # half-done by a killed run: start the arm again
        res = train(make_config(m, run_dir), train_data=train_data, eval_data=eval_data,
                    sft_data=sft_data if m.uses_sft_data else None)
        params, graphdef = jax.device_get(res.state.params), res.graphdef
        hist = [h for h in res.history if h["split"] == "train"]
        checkpoints = os.path.join(res.run_dir, "checkpoints")
        # the measurements need only the parameters (on the host now): the trained state (parameters and
        # AdamW moments, 1.6 GB for SmolLM2-135M) goes first
        del res
        release_host_memory()
        r = dict(measure(m, graphdef, params))
        r.update(final_train_loss=float(hist[-1]["loss"]) if hist else float("nan"), steps=len(hist),
                 seconds=time.perf_counter() - t)
        out[m.label] = r
        _write_json(done, {"method": spec, "result": r})
        if not keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
        logger.info("%s: %s (%.0f s)", m.label, {k: round(v, 4) for k, v in r.items() if isinstance(v, float)},
                    r["seconds"])
        del params
        release_host_memory()
    return out


def release_host_memory() -> None:
    """Collect garbage and hand the heap's free memory back to the OS (glibc's ``malloc_trim``; a
    no-op elsewhere). glibc keeps what an arm freed, so without this a run of arms grows: three
    SmolLM2 arms in one process peaked at 5.0, 5.5, 7.1 GB with 3.2 -> 5.0 GB resident between them
    and no live arrays; with it at 5.2, 5.3, 5.4 GB, 0.9 GB between them (README, "Memory")."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------- #
# The synthetic world: settings, configs, one whole-pipeline seed
# --------------------------------------------------------------------------- #

SETTINGS = ("correctness", "style")
#: The SFT model counts as levelled off when its validation accuracy rose by less than this over the
#: last evaluation interval.
LEVEL_TOLERANCE = 0.03


def levelled_off(curve: Mapping[str, float]) -> bool:
    """Whether an SFT accuracy curve (``{step: accuracy}``) gained less than :data:`LEVEL_TOLERANCE`
    over its last interval (False with fewer than two points)."""
    points = [curve[k] for k in sorted(curve, key=int)]
    return len(points) >= 2 and points[-1] - points[-2] < LEVEL_TOLERANCE


def sft_until_levelled(s: "WorldSettings", curve: dict[int, float], run_sft: Callable[[int], dict[int, float]]) -> None:
    """Train SFT to ``s.sft_steps`` (when ``curve`` is empty), then on by ``s.sft_eval_every`` steps
    while the accuracy curve has not levelled off (:func:`levelled_off`), up to ``s.sft_max_steps``.
    ``run_sft(num_steps)`` trains (or continues) to that step and returns the curve's new points;
    ``curve`` ({step: accuracy}) is updated in place."""
    if not curve:
        curve.update(run_sft(s.sft_steps))
    while curve and s.sft_eval_every > 0 and not levelled_off(curve) \
            and max(curve) + s.sft_eval_every <= s.sft_max_steps:
        curve.update(run_sft(max(curve) + s.sft_eval_every))


@dataclasses.dataclass
class WorldSettings:
    """Sizes of one whole-pipeline seed on the synthetic world. ``grid()`` is the evidence grid,
    ``demo()`` the demo's representative subset, ``quick()`` the test size."""

    # task: 2-3 steps, values < 100, +n/-n/*2 (a ~200k-parameter model learns it in minutes on 2 cores)
    n_sft: int = 20000
    n_test: int = 1000
    n_val: int = 200
    n_pair_prompts: int = 600          # per setting (the two settings use disjoint training prompts)
    difficulty: dict = dataclasses.field(default_factory=lambda: dict(
        steps=(2, 3), start_range=(2, 20), operand_range=(1, 9), ops=("add", "sub", "mul2"), max_value=99))
    p_result_first: float = 0.5        # share of SFT equations written result-first (setting b's style)
    max_length: int = 64
    max_new_tokens: int = 40
    # model
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    # SFT (until held-out accuracy levels off: the curve is recorded every sft_eval_every steps and the
    # report says whether the last interval still gained more than LEVEL_TOLERANCE). Measured curves
    # (validation accuracy; seed 0): 0.545 at 1000 steps, 0.77 at 1200 (still rising); a 1500-step run
    # on another split reached 0.89 / 0.84 / 0.85 at 1200 / 1350 / 1500.
    sft_steps: int = 2000
    sft_max_steps: int = 4000          # past sft_steps, SFT goes on by sft_eval_every while the curve still rises
    sft_batch: int = 64
    sft_lr: float = 3e-3
    sft_eval_every: int = 250
    # sampling
    num_samples: int = 8
    temperature: float = 1.0
    gen_batch: int = 500
    # preference (same for every method)
    pref_steps: int = 120
    pref_batch: int = 16
    pref_lr: float = 1e-4
    # diagnostics on the correctness pairs
    n_mass_pairs: int = 128
    mass_samples: int = 4

    @classmethod
    def grid(cls) -> "WorldSettings":
        return cls()

    @classmethod
    def demo(cls) -> "WorldSettings":
        return cls(n_test=1000, n_pair_prompts=500)

    @classmethod
    def quick(cls) -> "WorldSettings":
        # one-step problems so that a tiny model makes both correct and incorrect samples in a few dozen steps
        return cls(n_sft=480, n_test=48, n_val=16, n_pair_prompts=96, hidden_size=32, num_layers=1, num_heads=2,
                   difficulty=dict(steps=(1, 1), start_range=(2, 40), operand_range=(1, 9), ops=("add", "sub"),
                                   max_value=60), max_length=48, max_new_tokens=16, intermediate_size=64,
                   sft_steps=150, sft_max_steps=150, sft_batch=32, sft_lr=1e-2, sft_eval_every=75, num_samples=4,
                   gen_batch=64,
                   pref_steps=10, pref_batch=8, pref_lr=1e-3, n_mass_pairs=8, mass_samples=2)


def _model_config(s: WorldSettings) -> dict:
    return dict(model_type="llama", vocab_size=len(synthetic.vocabulary()), hidden_size=s.hidden_size,
                intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
                max_position_embeddings=max(128, s.max_length + s.max_new_tokens), rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def in_process_arm(c):
    """Trainer settings of a run an experiment drives in-process and measures itself: no periodic
    checkpoints (nor background saves), no progress bar or TensorBoard, a metrics record every step."""
    c.checkpoint.every = 0
    c.checkpoint.async_save = False
    c.metrics.progress_bar = False
    c.metrics.tensorboard = False
    c.metrics.log_every = 1
    return c


def _base_config(s: WorldSettings, run_dir: str, seed: int):
    c = in_process_arm(get_default_config())
    c.run_dir = run_dir
    c.seed = int(seed)
    c.model.tokenizer = "synthetic"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.data.max_length = s.max_length
    c.data.min_prompt_length = 8
    c.data.length_bucket = 16
    c.optim.grad_clip = 1.0
    c.optim.weight_decay = 0.0
    c.optim.schedule = "constant"
    c.checkpoint.keep = 1
    c.checkpoint.resume = False
    c.metrics.peak_tflops = 1.0
    c.mesh.data = -1
    return c


def sft_config(s: WorldSettings, run_dir: str, seed: int):
    """SFT from scratch, exported to ``<run_dir>/hf_final``; greedy accuracy on the validation
    problems every ``sft_eval_every`` steps (the levelling-off curve)."""
    c = _base_config(s, run_dir, seed)
    c.stage = "sft"
    c.reference.mode = "none"
    c.model.config = ml_collections.ConfigDict(_model_config(s))
    c.data.batch_size = s.sft_batch
    c.data.eval_batch_size = s.sft_batch
    c.optim.learning_rate = s.sft_lr
    c.optim.warmup_steps = min(20, s.sft_steps)
    c.train.num_steps = s.sft_steps
    c.eval.every = s.sft_eval_every
    c.eval.num_batches = 1
    c.eval.generation = True
    c.eval.num_prompts = s.n_val
    c.eval.max_new_tokens = s.max_new_tokens
    c.eval.temperature = 0.0
    c.checkpoint.export_hf = True
    return c


def preference_config(s: WorldSettings, m: Method, run_dir: str, sft_path: str, seed: int):
    """The preference stage from the SFT export (also the cached reference); only the method differs
    (the arms that read SFT data get them from ``train(..., sft_data=)``, see :func:`compare`)."""
    c = _base_config(s, run_dir, seed)
    c.model.path = sft_path
    apply_method(c, m)
    c.data.batch_size = s.pref_batch
    c.data.eval_batch_size = s.pref_batch
    c.data.sft_batch_size = s.pref_batch  # SFT examples per step of the arms that read the SFT data
    c.data.shuffle = True
    c.optim.learning_rate = s.pref_lr
    c.optim.warmup_steps = 0
    c.train.num_steps = s.pref_steps
    c.eval.every = 0
    c.checkpoint.export_hf = False
    return c


def _dataset(rows):
    return datasets.Dataset.from_list(list(rows))


def _write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (a kill leaves the old file or the new one, never half)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, default=float)
    os.replace(tmp, path)


def _read_json(path: str, keys: Sequence[str] = ()):
    """A record written by ``_write_json``; ValueError naming the file when it is not JSON or lacks
    one of ``keys`` (what the caller reads from it)."""
    fix = "fix or delete it (a deleted arm.json, sft.json or pairs .stats.json is recomputed by --resume)"
    try:
        with open(path) as f:
            rec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from e
    missing = [k for k in keys if not isinstance(rec, dict) or k not in rec]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {missing} (it holds "
                         f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}); {fix}")
    return rec


def run_world_seed(s: WorldSettings, seed: int, arms: Mapping[str, Sequence[Method]], out_dir: str,
                   resume: bool = False) -> dict:
    """One whole-pipeline seed: task split -> SFT (levelled off) -> on-policy samples -> the pairs
    of each setting -> every arm of that setting from the same SFT model, pairs, order and seed
    -> measurements. ``arms[setting]`` lists the methods of each setting to run.

    Per arm: ``accuracy``, ``correct`` [n_test] (greedy, held-out), ``reward`` [n_test] (style
    reward of the same greedy responses), ``win`` [n_test] (against the SFT model's), the
    :func:`pair_shift` of the setting's own pairs (vectors as lists), plus for the correctness
    setting the probability-mass split of sampled answers on the pairs' prompts.

    With ``resume``, what an earlier (killed or smaller) run of the same seed finished in
    ``out_dir`` is read back instead of recomputed: the SFT model (``sft/hf_final`` +
    ``sft/sft.json``), each setting's pairs (``pairs_<setting>.jsonl`` + ``.stats.json``) and each finished arm
    (:func:`compare`); everything else is recomputed (deterministic)."""
    unknown = sorted(set(arms) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the settings are {list(SETTINGS)}")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    tok = synthetic.build_tokenizer(model_max_length=s.max_length)
    train_rows, held = synthetic.make_splits(s.n_sft, s.n_test + s.n_val, seed=seed, **s.difficulty)
    test_rows, val_rows = held[:s.n_test], held[s.n_test:]
    rng = np.random.default_rng([seed, 17])
    sft_rows = [{"question": r["question"], "answer": restyle_answer(r["answer"], rng, s.p_result_first)}
                for r in train_rows]
    prompt_rows = {"correctness": train_rows[:s.n_pair_prompts],
                   "style": train_rows[s.n_pair_prompts:2 * s.n_pair_prompts]}
    width = max(len(p) for p in sampling.encode_prompts(tok, sampling.render_prompts(tok, train_rows[:2000] + held)))
    gen = dict(max_new_tokens=s.max_new_tokens, batch_size=s.gen_batch, prompt_width=-(-width // 8) * 8)

    # ---- SFT
    t = time.perf_counter()
    sft_dir = os.path.join(out_dir, "sft")
    sft_record = os.path.join(sft_dir, "sft.json")
    sft_graphdef = sft_params = None
    if resume and os.path.exists(sft_record):
        rec = _read_json(sft_record, ("export_dir", "curve", "seconds"))
        sft_export, curve = rec["export_dir"], {int(k): v for k, v in rec["curve"].items()}
        timings["sft"] = rec["seconds"]
        logger.info("seed %d: SFT model read back from %s", seed, sft_export)
    else:
        if resume and os.path.isdir(sft_dir):
            shutil.rmtree(sft_dir)  # half-done by a killed run
        curve = {}
        timings["sft"] = 0.0

    def run_sft(num_steps: int) -> dict[int, float]:
        """Train (or continue) the SFT run to ``num_steps``; its new points of the accuracy curve."""
        nonlocal sft_graphdef, sft_params, sft_export
        t = time.perf_counter()
        c = sft_config(s, sft_dir, seed)
        c.train.num_steps = num_steps
        c.checkpoint.resume = bool(curve)  # continue from the last run's final checkpoint
        sft = train(c, train_data=_dataset(sft_rows), eval_data=_dataset(val_rows))
        sft_graphdef, sft_params, sft_export = sft.graphdef, jax.device_get(sft.state.params), sft.export_dir
        new = {int(h["step"]): float(h["gen/accuracy"]) for h in sft.history
               if h["split"] == "eval" and "gen/accuracy" in h and int(h["step"]) > max(curve, default=0)}
        timings["sft"] += time.perf_counter() - t
        _write_json(sft_record, {"export_dir": sft_export, "seconds": timings["sft"],
                                 "curve": {str(k): v for k, v in sorted({**curve, **new}.items())}})
        return new

    sft_until_levelled(s, curve, run_sft)
    if sft_graphdef is None:
        sft_graphdef, sft_params = nnx.split(models.from_pretrained(sft_export))
    sft_model = nnx.merge(sft_graphdef, sft_params)

    def greedy(model) -> tuple[np.ndarray, np.ndarray]:
        g = sampling.greedy_accuracy(model, tok, test_rows, score_fn=synthetic.score, **gen)
        return np.asarray(g["correct"], bool), np.asarray([style_reward(x) for x in g["texts"]])

    t = time.perf_counter()
    sft_correct, sft_reward = greedy(sft_model)
    timings["eval_sft"] = time.perf_counter() - t
    logger.info("seed %d SFT: held-out accuracy %.3f, style reward %.3f, curve %s", seed, sft_correct.mean(),
                sft_reward.mean(), curve)

    # ---- pairs
    t = time.perf_counter()
    key = jax.random.PRNGKey(1000 + seed)
    pairs: dict[str, list[dict]] = {}
    pair_stats: dict[str, dict] = {}
    for name in arms:
        saved = os.path.join(out_dir, f"pairs_{name}.stats.json")  # written after pairs_<setting>.jsonl
        if resume and os.path.exists(saved):
            with open(os.path.join(out_dir, f"pairs_{name}.jsonl")) as f:
                pairs[name] = [json.loads(line) for line in f]
            pair_stats[name] = _read_json(saved)
    if "correctness" in arms and "correctness" not in pairs:
        pairs["correctness"], pair_stats["correctness"] = sampling.sample_pairs(
            sft_model, tok, prompt_rows["correctness"], num_samples=s.num_samples, key=jax.random.fold_in(key, 0),
            temperature=s.temperature, score_fn=synthetic.score, seed=seed, **gen)
    if "style" in arms and "style" not in pairs:
        prompts, samples = sampling.sample_responses(
            sft_model, tok, prompt_rows["style"], num_samples=s.num_samples, key=jax.random.fold_in(key, 1),
            temperature=s.temperature, **gen)
        pairs["style"], pair_stats["style"] = style_pairs(prompts, samples)
    timings["sampling"] = time.perf_counter() - t
    for name, p in pairs.items():
        if len(p) < s.pref_batch:
            raise RuntimeError(f"seed {seed}, setting {name}: only {len(p)} pairs from {s.n_pair_prompts} prompts "
                               f"({pair_stats[name]}); fewer than one batch ({s.pref_batch}) -- change the SFT "
                               "steps, the task difficulty or n_pair_prompts.")
        with open(os.path.join(out_dir, f"pairs_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in p)
        _write_json(os.path.join(out_dir, f"pairs_{name}.stats.json"), pair_stats[name])

    # The SFT data of the arms that train on them (SFT-mix, +SPO(SFT)), the same for every arm: the first
    # pref_steps x pref_batch of the seed's SFT rows, one epoch of the SFT iterator (each row seen once;
    # tokenizing all 20000 rows for every such arm cost 10 s an arm on the 2-core machine).
    sft_ds = _dataset(sft_rows[:s.pref_steps * s.pref_batch])
    out: dict[str, Any] = {
        "seed": seed, "sft": {"accuracy": float(sft_correct.mean()), "reward": float(sft_reward.mean()),
                              "curve": {str(k): v for k, v in sorted(curve.items())},
                              "correct": sft_correct.astype(int).tolist(), "reward_items": sft_reward.tolist()},
        "pairs": pair_stats, "settings": {}}
    lp_kw = dict(max_length=s.max_length, pad_id=0, batch_size=64)
    for name, methods in arms.items():
        ds = _dataset([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs[name]])
        tok_pairs, _ = prepare_dataset(ds, tok, max_length=s.max_length, format="preference", min_prompt_length=8)
        start_lp = evaluate.pair_logps(sft_graphdef, sft_params, tok_pairs, **lp_kw)
        mass_pairs = pairs[name][:s.n_mass_pairs]
        extra: dict[str, Any] = {}
        if name == "correctness":
            extra["sft_mass_split"] = _mass(sft_model, tok, mass_pairs, s, gen)
            extra["gradient_diagnostics"] = _grad_diagnostics(sft_graphdef, sft_params, tok_pairs, s)

        def measure(m: Method, graphdef, params, name=name, start_lp=start_lp, tok_pairs=tok_pairs,
                    mass_pairs=mass_pairs) -> dict:
            model = nnx.merge(graphdef, params)
            correct, reward = greedy(model)
            shift = pair_shift(start_lp, evaluate.pair_logps(graphdef, params, tok_pairs, **lp_kw))
            r = {"accuracy": float(correct.mean()), "reward": float(reward.mean()),
                 "win_rate": float(win_rate(reward, sft_reward).mean()),
                 "correct": correct.astype(int).tolist(), "reward_items": reward.tolist(),
                 **{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in shift.items()}}
            if name == "correctness":
                r["mass_split"] = _mass(model, tok, mass_pairs, s, gen)
            return r

        t = time.perf_counter()
        runs = compare(methods, make_config=lambda m, d: preference_config(s, m, d, sft_export, seed),
                       train_data=ds, measure=measure, out_dir=os.path.join(out_dir, name), resume=resume,
                       sft_data=sft_ds if any(m.uses_sft_data for m in methods) else None)
        timings[f"methods_{name}"] = time.perf_counter() - t
        out["settings"][name] = {"runs": runs, **extra,
                                 "methods": {m.label: {"family": m.family, "loss": m.loss, "hparams": m.hp,
                                                       "spo_gamma": m.spo_gamma, **(
                                                           {"sft_data_weight": m.sft_data_weight,
                                                            "spo_extra": dict(m.spo_extra)}
                                                           if m.uses_sft_data else {})}
                                             for m in methods}}
    timings["total"] = time.perf_counter() - t0
    out["timings_s"] = timings
    return out


def _mass(model, tok, pairs, s: WorldSettings, gen) -> dict:
    m = evaluate.sampled_mass_split(model, tok, pairs, num_samples=s.mass_samples, key=jax.random.PRNGKey(77),
                                    temperature=s.temperature, **gen)
    return {k: m[k] for k in ("chosen", "rejected", "other")}


def _grad_diagnostics(graphdef, params, tok_pairs, s: WorldSettings) -> dict:
    """Per-pair gradient geometry at the SFT model on (up to) 16 pairs: the share where one DPO
    step lowers the chosen log-prob to first order (<g_w, g_l> > |g_w|^2)."""
    n = min(16, len(tok_pairs))
    it = BatchIterator(tok_pairs.select(range(n)), batch_size=n, max_length=s.max_length, packing=False,
                       length_bucket=16, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    g = evaluate.pair_gradient_stats(graphdef, params, next(iter(it)))
    return {"num_pairs": int(len(g["gw_gl"])), "mean_cos": float(np.mean(g["cos"])),
            "frac_dpo_lowers_chosen": float(np.mean(g["dpo_chosen_direction"] < 0))}


# --------------------------------------------------------------------------- #
# The grid: sweep on a validation seed, report on the others
# --------------------------------------------------------------------------- #

#: The hyperparameters swept on the validation seed (every other one stays at its default):
#: SPO's weight gamma for every SPO family ("+SPO", "+SPO(SFT)"), RPO's, SFT-mix's and DPOP's
#: lambda, DPO's beta.
SWEEP: dict[str, dict[str, tuple[float, ...]]] = {
    "+SPO": {"spo_gamma": (3.0, 10.0, 30.0)},
    "RPO": {"lam": (0.3, 1.0, 3.0, 10.0)},
    "SFT-mix": {"lam": (0.3, 1.0, 3.0, 10.0)},
    "DPOP": {"lam": (5.0, 50.0, 500.0)},
    "DPO": {"beta": (0.03, 0.1, 0.3)},
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
    pairs and arms are read back (:func:`run_world_seed`), the rest runs, and the results and
    report are written again from all of them."""
    out_dir = os.path.abspath(out_dir)
    grid_file = os.path.join(out_dir, "grid.json")
    if resume:
        if not os.path.exists(grid_file):
            raise FileNotFoundError(f"--resume: {grid_file} not found; resume a directory an earlier grid run wrote, "
                                    "or drop --resume to start one")
        stored = _read_json(grid_file, ("settings",))["settings"]
        if stored != json.loads(json.dumps(dataclasses.asdict(s))):
            diff = sorted(k for k in stored if stored[k] != json.loads(json.dumps(dataclasses.asdict(s))).get(k))
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
    os.makedirs(out_dir, exist_ok=True)
    if not resume:
        _write_json(grid_file, {"settings": dataclasses.asdict(s)})
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
        per_setting = bool(fixed) and set(fixed) <= set(SETTINGS)
        for k in settings:
            hp = (fixed or {}).get(k, {}) if per_setting else (fixed or {})
            chosen[k] = {f: method(f, **dict(hp.get(f if not is_spo_family(f) else "+SPO", {}))) for f in families_}
    per_seed = [run_world_seed(s, seed, {k: list(chosen[k].values()) for k in settings},
                               os.path.join(out_dir, f"seed{seed}"), resume=resume) for seed in report_seeds]
    result = {"settings": dataclasses.asdict(s), "families": list(families_), "report_seeds": list(report_seeds),
              "validation_seed": validation_seed, "sweep": {k: {a: list(v) for a, v in d.items()}
                                                            for k, d in SWEEP.items()} if validation else None,
              "chosen": {k: {f: m.label for f, m in c.items()} for k, c in chosen.items()},
              "criteria": {k: CRITERIA[k][0] for k in settings},
              "validation": validation, "per_seed": per_seed}
    result["summary"] = summarize(result, n_boot=n_boot)
    # this invocation's wall and CPU seconds (all threads), and the arms' own seconds summed over every
    # invocation (a resumed grid reads earlier arms back: their seconds are the time they took then)
    arm_s = sum(r["seconds"] for run in ([validation] if validation else []) + per_seed
                for st in run["settings"].values() for r in st["runs"].values())
    result["timings_s"] = {"total": time.perf_counter() - t0, "cpu": _cpu_seconds() - cpu0, "arms_all_runs": arm_s,
                           "sft_all_runs": sum(run["timings_s"]["sft"] for run in
                                               ([validation] if validation else []) + per_seed),
                           "load_start": load0, "load_end": os.getloadavg()[0], "resumed": bool(resume)}
    result["machine"] = _machine()
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, default=float)
    write_report(result, out_dir)
    return result


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


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads) so far."""
    t = os.times()
    return t.user + t.system


def _machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax_devices": str(jax.devices()),
            "load_avg_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def _ci(r: Mapping, nd: int = 3, diff: bool = False) -> str:
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
    s, summ = result["settings"], result["summary"]
    seeds = result["per_seed"]
    L = ["# SPO against the simple fixes on the synthetic world", ""]
    if result.get("validation_seed") is not None:
        L.append(f"Hyperparameters were swept on **seed {result['validation_seed']}** (its own task split, SFT, "
                 f"samples and pairs; criteria: " + "; ".join(f"{k}: {v}" for k, v in result["criteria"].items())
                 + f") and the chosen ones are **reported on seeds {result['report_seeds']}**, which chose nothing.")
    else:
        L.append(f"No sweep: every family ran at hyperparameters fixed before running; seeds "
                 f"{result['report_seeds']}.")
    L += ["", "Chosen arms: " + "; ".join(f"{k}: " + ", ".join(c.values()) for k, c in result["chosen"].items()) + ".",
          "", f"Every seed is a whole pipeline (task split -> SFT -> samples -> pairs -> preference order). "
          f"Held-out problems per seed: {s['n_test']}; pairs per setting from {s['n_pair_prompts']} training prompts "
          f"x {s['num_samples']} samples; preference training {s['pref_steps']} steps, batch {s['pref_batch']}, "
          f"AdamW lr {s['pref_lr']}, the same for every arm. Intervals: 95% paired bootstrap over seeds and items.",
          "", "SFT (held-out greedy accuracy on the validation problems during SFT, per seed): "
          + "; ".join(f"seed {r['seed']}: " + ", ".join(f"{k}: {v:.3f}" for k, v in r['sft']['curve'].items())
                      + (" -- levelled off" if levelled_off(r["sft"]["curve"]) else
                         f" -- **still rising** (gain >= {LEVEL_TOLERANCE} over the last interval: an extra NLL term "
                         "can raise accuracy here without any help from SPO)")
                      for r in seeds) + "."]
    for k, st in summ.items():
        acc = st["accuracy"]
        L += ["", f"## Setting {'(a) correctness pairs' if k == 'correctness' else '(b) off-task style preference'}", ""]
        if k == "correctness":
            def mass(get):
                m = [get(r) for r in seeds]
                return " / ".join(f"{np.mean([x[n] for x in m]):.2f}" for n in ("chosen", "rejected", "other"))
            L += ["| arm | held-out accuracy | Δ vs SFT | Δ log p chosen | Δ log p rejected | violation frac | "
                  "mass: chosen / rejected / other |", "|---|---|---|---|---|---|---|",
                  f"| SFT | {_ci(acc['SFT'])} | 0 | 0 | 0 | - | "
                  f"{mass(lambda r: r['settings']['correctness']['sft_mass_split'])} |"]
            for a in st["labels"]:
                L.append(f"| {a} | {_ci(acc[a])} | {_ci(acc[a], diff=True)} | {_ci(st['delta_chosen'][a], 2)} | "
                         f"{_ci(st['delta_rejected'][a], 2)} | {_ci(st['violation'][a], 2)} | "
                         f"{mass(lambda r, a=a: r['settings']['correctness']['runs'][a]['mass_split'])} |")
            g = [r["settings"]["correctness"]["gradient_diagnostics"] for r in seeds]
            L += ["", "Mass: share of answers sampled at the pairs' prompts equal to the pair's chosen answer / its "
                  "rejected answer / anything else. Gradient geometry at the SFT model (per-example gradients of "
                  f"{g[0]['num_pairs']} pairs): mean cos(g_w, g_l) "
                  + ", ".join(f"{x['mean_cos']:.3f}" for x in g) + "; share of pairs where one DPO step lowers the "
                  "chosen log-prob to first order (<g_w, g_l> > |g_w|^2): "
                  + ", ".join(f"{x['frac_dpo_lowers_chosen']:.2f}" for x in g) + " (per seed)."]
        else:
            L += ["| arm | win rate vs SFT | style reward | held-out accuracy | Δ acc vs SFT | Δ log p chosen | "
                  "violation frac |", "|---|---|---|---|---|---|---|",
                  f"| SFT | 0.500 | {_ci(st['reward']['SFT'])} | {_ci(acc['SFT'])} | 0 | 0 | - |"]
            for a in st["labels"]:
                L.append(f"| {a} | {_ci(st['win_rate'][a])} | {_ci(st['reward'][a])} | {_ci(acc[a])} | "
                         f"{_ci(acc[a], diff=True)} | {_ci(st['delta_chosen'][a], 2)} | {_ci(st['violation'][a], 2)} |")
            L += ["", "![Pareto](pareto_style.png)"]
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


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


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


if __name__ == "__main__":
    main()
