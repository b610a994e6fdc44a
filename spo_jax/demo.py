"""The main job: does a Bradley-Terry loss lose the SFT ability, does SPO keep it, and does SPO do
better than the simple fixes?

::

    python -m spo_jax.demo [--quick] [--out DIR] [--seed 3] [--families DPO DPO+SPO ...] [--compile-cache DIR|off]

A representative subset of the evidence grid (``python -m spo_jax.experiment``; both run the
one pipeline of :mod:`spo_jax.experiment`), on the synthetic multi-step arithmetic world, one
whole-pipeline seed:

1. **SFT** a small Llama decoder from scratch until its held-out accuracy has levelled off
   (the curve and the rule are in the report; the arms start from the curve's best point, restored
   from its checkpoint), on solutions whose equations are written forward (``52 - 7 = 45``) or
   result-first (``45 = 52 - 7``) at random.
2. **Pairs**, two settings from on-policy samples of disjoint training prompts: (a)
   *correctness* (a correct answer chosen, an incorrect one rejected: the paper's GSM8K
   column) and (b) *off-task style* (the result-first style preferred, an exact reward that
   says nothing about correctness: the paper's UltraFeedback -> GSM8K shape).
3. From the **same SFT checkpoint**, same pairs, order, seed, steps and optimiser: DPO and
   DPO+SPO, and the baselines RPO (DPO + λ·NLL of the chosen), SFT-mix (DPO + λ·NLL of the SFT
   data), DPOP and RFT (fine-tuning on the chosen responses alone), at the weights the grid chose
   on its validation seed (:data:`FIXED`).
4. **Measurements** with 95% bootstrap intervals over the held-out problems: greedy accuracy
   on ``n_test`` held-out problems, change of the chosen / rejected log-probs of the training
   pairs, the violation fraction (SPO's q_i > 0), for (b) the exact win rate against the SFT
   model, a Pareto figure, and a reading that says whether SPO is ahead of, on or behind the
   frontier of the baselines.

Writes ``<out>/report.md``, ``results.json``, ``pareto_style.png`` and the runs' directories.
The full grid (all six Table-2 losses +/- SPO, hyperparameters swept on a validation seed,
reported on other seeds) is ``python -m spo_jax.experiment``.

Record (2026-12-07, ``python -m spo_jax.demo``, seed 3, 2 CPU cores, quiet machine, compile cache partly
warm): 685 s wall (SFT 366 s). SFT 0.886 held-out accuracy (1000 problems). (a) DPO 0.824, DPO+SPO
0.947, RPO 0.967, SFT-mix 0.981, DPOP 0.957, RFT 0.970. (b) win rate / accuracy: DPO 0.923 / 0.480,
DPO+SPO 0.868 / 0.877, RPO 0.887 / 0.862, SFT-mix 0.842 / 0.956, DPOP 0.862 / 0.878, RFT 0.874 / 0.875
-- SPO prevents the collapse; in (a) it is behind the simple fixes, in (b) on their frontier (README).
"""

from __future__ import annotations

import argparse
import os
import time

from spo_jax import compile_cache, experiment

__all__ = ["run_demo", "main", "FAMILIES", "FIXED"]

#: The demo's arms: the BT loss alone and with SPO, and the four baselines that decide the claim.
FAMILIES = ("DPO", "DPO+SPO", "RPO", "DPOP", "SFT-mix", "RFT")
#: The weights the evidence grid chose on its validation seed (``python -m spo_jax.experiment``,
#: seed 0 of ``WorldSettings.grid()``, 2026-11-30; README), per setting; DPO at its default β 0.1
#: (the β inside DPO+SPO). The demo's default seed (3) is none of the grid's seeds (0 chose, 1 and
#: 2 measured), so nothing here is selected on the runs it reports.
FIXED = {
    "correctness": {"+SPO": {"spo_gamma": 30.0}, "RPO": {"lam": 10.0}, "DPOP": {"lam": 500.0},
                    "SFT-mix": {"lam": 10.0}},
    "style": {"+SPO": {"spo_gamma": 30.0}, "RPO": {"lam": 10.0}, "DPOP": {"lam": 50.0}, "SFT-mix": {"lam": 3.0}},
}


def run_demo(out_dir: str, settings: experiment.WorldSettings | None = None, *, seed: int = 3,
             families: tuple[str, ...] = FAMILIES) -> dict:
    """Run the demo into ``out_dir``; returns the results dict (also written to results.json)."""
    return experiment.run_grid(settings or experiment.WorldSettings.demo(), out_dir, families_=families,
                               report_seeds=[seed], fixed=FIXED)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m spo_jax.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny version for tests (default: off, the demo's size)")
    p.add_argument("--out", default="", help="run directory (default: ./runs/demo-<timestamp>)")
    p.add_argument("--seed", type=int, default=3,
                   help="whole-pipeline seed: task split, SFT initialisation and order, samples, preference order "
                        "(default 3: none of the evidence grid's seeds, so the demo's fixed weights were not chosen "
                        "on it)")
    p.add_argument("--families", nargs="+", default=None,
                   help=f"subset of {experiment.families()} (default: {' '.join(FAMILIES)})")
    compile_cache.add_flag(p)
    args = p.parse_args(argv)
    s = experiment.WorldSettings.quick() if args.quick else experiment.WorldSettings.demo()
    out = args.out or os.path.join("runs", "demo-" + time.strftime("%Y%m%d-%H%M%S"))  # runs/ is git-ignored
    experiment.run_command(p, args, out, lambda: run_demo(out, s, seed=args.seed,
                                                          families=tuple(args.families or FAMILIES)),
                           expected=(FileExistsError, ValueError),  # bad --out / --families
                           quiet=experiment.QUIET_LOGGERS + ("spo_jax.data",))


if __name__ == "__main__":
    main()
