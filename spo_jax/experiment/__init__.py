"""The experiment pipeline: start model -> pairs -> every method from the same start -> measurements -> report.

One pipeline, used by the demo (``python -m spo_jax.demo``), by the evidence grid
(``python -m spo_jax.experiment``) and by ``experiments/smollm2.py``. One module per concern:

* :mod:`~spo_jax.experiment.methods` -- the arms: the paper's Table-2 losses, each alone or ``+SPO``, and
  the baselines (RFT, RPO, DPOP, SFT-mix, DPO+SPO(SFT)); :func:`method`, :func:`apply_method`.
* :mod:`~spo_jax.experiment.style` -- the synthetic world's style setting (b): its exact reward, pairs
  and win rate.
* :mod:`~spo_jax.experiment.world` -- the synthetic world's sizes (:class:`WorldSettings`), its trainer
  configs, and when the SFT model counts as levelled off.
* :mod:`~spo_jax.experiment.runs` -- training methods from one start and measuring each (:func:`compare`),
  with the ``arm.json`` records read back on resume.
* :mod:`~spo_jax.experiment.stats` -- the pair shift, the paired bootstrap, the Pareto frontier and the
  plain-words reading.
* :mod:`~spo_jax.experiment.pipeline` -- one whole-pipeline seed of the synthetic world
  (:func:`run_world_seed`).
* :mod:`~spo_jax.experiment.grid` -- the sweep on a validation seed and the report seeds (:func:`run_grid`).
* :mod:`~spo_jax.experiment.report` -- ``report.md`` and the Pareto figure.
* :mod:`~spo_jax.experiment.cli` -- the grid's command line and the part the demo shares.

**The synthetic world** (``spo_jax.data.synthetic``, a from-scratch Llama on a CPU) has two settings,
built from one SFT model per whole-pipeline seed:

* ``correctness`` (the paper's GSM8K column): on-policy samples of training prompts, a correct answer
  chosen, an incorrect one rejected (``sampling.sample_pairs``);
* ``style`` (the paper's UltraFeedback -> GSM8K shape): the SFT data write each equation either forward
  or result-first, at random; the preference is for the result-first style, an exactly computable reward
  that says nothing about correctness. Pairs come from on-policy samples of *other* training prompts than
  the correctness pairs (never the held-out problems). Preference quality = the exact win rate of the
  method's greedy responses against the SFT model's on the held-out prompts (ties count half) and their
  mean reward; ability = greedy accuracy on the same held-out arithmetic problems.

The SFT model is trained until its held-out accuracy has levelled off (:func:`sft_until_levelled`; the
curve is in the report), so that an extra NLL term cannot pass for SPO's effect.

The names below are re-exported so that ``from spo_jax import experiment`` reaches every public piece.
"""

from spo_jax.experiment.methods import (BASELINES, BT_LOSSES, FRONTIER_BASELINES, SFT_MIX_LAMBDA, SPO_GAMMA,
                                        SPO_SFT_FAMILIES, Method, apply_method, families, is_spo_family, method,
                                        plain_family)
from spo_jax.experiment.style import restyle_answer, style_pairs, style_reward, win_rate
from spo_jax.experiment.stats import (diff_interval, dominates, frontier_position, pair_shift, paired_bootstrap,
                                      pareto_front, reading)
from spo_jax.experiment.runs import (compare, experiment_config, in_process_arm, pairs_dataset, preference_stage,
                                     read_json, release_host_memory, write_json)
from spo_jax.experiment.world import (LEVEL_TOLERANCE, SETTINGS, SFT_RULE, WorldSettings, base_config, best_step,
                                      curve_words, levelled_off, preference_config, sft_config, sft_until_levelled)
from spo_jax.experiment.pipeline import run_world_seed
from spo_jax.experiment.report import ci, pareto_figure, summarize, write_report
from spo_jax.experiment.grid import CRITERIA, SWEEP, choose, run_grid, sweep_arms
from spo_jax.experiment.cli import QUIET_LOGGERS, main, run_command

__all__ = [
    "BASELINES", "BT_LOSSES", "FRONTIER_BASELINES", "SFT_MIX_LAMBDA", "SPO_GAMMA", "SPO_SFT_FAMILIES", "Method",
    "apply_method", "families", "is_spo_family", "method", "plain_family",
    "restyle_answer", "style_pairs", "style_reward", "win_rate",
    "diff_interval", "dominates", "frontier_position", "pair_shift", "paired_bootstrap", "pareto_front", "reading",
    "compare", "experiment_config", "in_process_arm", "pairs_dataset", "preference_stage", "read_json",
    "release_host_memory", "write_json",
    "LEVEL_TOLERANCE", "SETTINGS", "SFT_RULE", "WorldSettings", "base_config", "best_step", "curve_words",
    "levelled_off", "preference_config",
    "sft_config", "sft_until_levelled",
    "run_world_seed", "ci", "pareto_figure", "summarize", "write_report",
    "CRITERIA", "SWEEP", "choose", "run_grid", "sweep_arms",
    "QUIET_LOGGERS", "main", "run_command",
]
