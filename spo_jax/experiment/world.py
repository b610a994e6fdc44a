"""The synthetic world's sizes and trainer configs: :class:`WorldSettings` (``grid()``, ``demo()``,
``quick()``), the configs of its SFT run and of a preference arm (:func:`sft_config`,
:func:`preference_config`, both from :func:`base_config`), its two settings (:data:`SETTINGS`) and when
the SFT model counts as levelled off (:func:`levelled_off`, :func:`sft_until_levelled`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import ml_collections

from spo_jax.data import synthetic
from spo_jax.experiment.methods import Method
from spo_jax.experiment.runs import experiment_config, preference_stage

SETTINGS = ("correctness", "style")
#: The SFT model counts as levelled off when its validation accuracy rose by less than this over the
#: last evaluation interval.
LEVEL_TOLERANCE = 0.03
#: How the SFT run ends and which of its checkpoints the arms start from (written into every report).
SFT_RULE = (f"SFT runs sft_steps, then on by sft_eval_every steps while the last interval of its validation curve "
            f"gained {LEVEL_TOLERANCE} or more (up to sft_max_steps); it has levelled off when the last interval "
            f"gained less than {LEVEL_TOLERANCE} (a fall included). The arms start from the curve's best point (the "
            "highest validation accuracy, ties to the later step), restored from its checkpoint")


def levelled_off(curve: Mapping[str, float]) -> bool:
    """Whether an SFT accuracy curve (``{step: accuracy}``) gained less than :data:`LEVEL_TOLERANCE`
    over its last interval (False with fewer than two points)."""
    points = [curve[k] for k in sorted(curve, key=int)]
    return len(points) >= 2 and points[-1] - points[-2] < LEVEL_TOLERANCE


def best_step(curve: Mapping[str, float]) -> int:
    """The step of the curve's highest validation accuracy (ties to the later step): the SFT start."""
    return int(max(curve, key=lambda k: (curve[k], int(k))))


def curve_words(curve: Mapping[str, float]) -> str:
    """What the SFT curve did over its last interval, in the report's words (:data:`SFT_RULE`)."""
    steps = sorted(curve, key=int)
    if len(steps) < 2:
        return "one point: too few to tell whether it levelled off"
    a, b = curve[steps[-2]], curve[steps[-1]]
    span = f"{a:.3f} -> {b:.3f} over the last {int(steps[-1]) - int(steps[-2])} steps"
    if b - a >= LEVEL_TOLERANCE:
        return (f"**still rising** ({span}, a gain of {LEVEL_TOLERANCE} or more: an extra NLL term can raise "
                "accuracy here without any help from SPO)")
    if b - a <= -LEVEL_TOLERANCE:
        return f"**fell** ({span})"
    return f"levelled off ({span}, less than {LEVEL_TOLERANCE} apart)"


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
        # one-step problems so that a tiny model makes both correct and incorrect samples in a few dozen steps;
        # one point of the SFT curve: its 16 validation problems are too few to choose a checkpoint on (a
        # 75-step point "best" by 1 problem left too few correctness pairs to train on)
        return cls(n_sft=480, n_test=48, n_val=16, n_pair_prompts=96, hidden_size=32, num_layers=1, num_heads=2,
                   difficulty=dict(steps=(1, 1), start_range=(2, 40), operand_range=(1, 9), ops=("add", "sub"),
                                   max_value=60), max_length=48, max_new_tokens=16, intermediate_size=64,
                   sft_steps=150, sft_max_steps=150, sft_batch=32, sft_lr=1e-2, sft_eval_every=150, num_samples=4,
                   gen_batch=64,
                   pref_steps=10, pref_batch=8, pref_lr=1e-3, n_mass_pairs=8, mass_samples=2)


def _model_config(s: WorldSettings) -> dict:
    return dict(model_type="llama", vocab_size=len(synthetic.vocabulary()), hidden_size=s.hidden_size,
                intermediate_size=s.intermediate_size, num_hidden_layers=s.num_layers,
                num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
                max_position_embeddings=max(128, s.max_length + s.max_new_tokens), rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def base_config(s: WorldSettings, run_dir: str, seed: int):
    """The trainer settings every run of the world shares (SFT and preference arms): those of every experiment
    (:func:`~spo_jax.experiment.runs.experiment_config`), the synthetic tokenizer, float32 parameters,
    clipping and no weight decay, one kept checkpoint, every device on the data axis."""
    c = experiment_config(run_dir, seed, max_length=s.max_length, min_prompt_length=8, length_bucket=16)
    c.model.tokenizer = "synthetic"
    c.model.param_dtype = "float32"
    c.optim.grad_clip = 1.0
    c.optim.weight_decay = 0.0
    c.checkpoint.keep = 1
    c.checkpoint.resume = False
    c.metrics.peak_tflops = 1.0
    c.mesh.data = -1
    return c


def sft_config(s: WorldSettings, run_dir: str, seed: int):
    """SFT from scratch, exported to ``<run_dir>/hf_final``; greedy accuracy on the validation
    problems every ``sft_eval_every`` steps (the levelling-off curve), with a checkpoint kept at each."""
    c = base_config(s, run_dir, seed)
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
    # a checkpoint at every point of the curve, all kept: the arms start from the best one (best_step)
    c.checkpoint.every = s.sft_eval_every
    c.checkpoint.keep = s.sft_max_steps // max(1, s.sft_eval_every) + 1
    return c


def preference_config(s: WorldSettings, m: Method, run_dir: str, sft_path: str, seed: int):
    """The preference stage from the SFT export (also the cached reference); only the method differs
    (the arms that read SFT data get them from ``train(..., sft_data=)``, see
    :func:`~spo_jax.experiment.runs.compare`)."""
    c = preference_stage(base_config(s, run_dir, seed), m, model_path=sft_path, batch_size=s.pref_batch,
                         learning_rate=s.pref_lr, num_steps=s.pref_steps)
    c.data.sft_batch_size = s.pref_batch  # SFT examples per step of the arms that read the SFT data
    c.data.shuffle = True
    c.eval.every = 0
    return c
