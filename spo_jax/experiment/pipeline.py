"""One whole-pipeline seed of the synthetic world (:func:`run_world_seed`): task split -> SFT until its
held-out accuracy levels off -> on-policy samples -> the pairs of each setting -> every arm of that
setting from the same SFT model, pairs, order and seed (:func:`~spo_jax.experiment.runs.compare`) ->
measurements (greedy accuracy and style reward on the held-out problems, the pair shift, and on the
correctness pairs the probability-mass split and the gradient geometry at the SFT model).

Everything a seed finishes is written to its directory and read back on resume: the SFT model
(``sft/hf_final`` + ``sft/sft.json``), each setting's pairs (``pairs_<setting>.jsonl`` + ``.stats.json``)
and each finished arm (``<setting>/<arm>/arm.json``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import jax
import numpy as np
from flax import nnx

from spo_jax import evaluate, models, sampling
from spo_jax.data import BatchIterator, prepare_dataset, synthetic
from spo_jax.experiment.methods import Method
from spo_jax.experiment.runs import compare, pairs_dataset, read_json, write_json
from spo_jax.experiment.stats import pair_shift
from spo_jax.experiment.style import restyle_answer, style_pairs, style_reward, win_rate
from spo_jax.experiment.world import (SETTINGS, WorldSettings, best_step, preference_config, sft_config,
                                     sft_until_levelled)
from spo_jax.train import train

logger = logging.getLogger("spo_jax.experiment")


@dataclasses.dataclass
class _Seed:
    """One seed's world: its task split, SFT rows (restyled), the prompts of each setting's pairs and the
    generation settings, with the directory its results go to and the seconds each stage took."""

    s: WorldSettings
    seed: int
    out_dir: str
    resume: bool
    tok: Any
    test_rows: list
    val_rows: list
    sft_rows: list
    prompt_rows: dict
    gen: dict
    timings: dict

    @classmethod
    def build(cls, s: WorldSettings, seed: int, out_dir: str, resume: bool) -> "_Seed":
        tok = synthetic.build_tokenizer(model_max_length=s.max_length)
        train_rows, held = synthetic.make_splits(s.n_sft, s.n_test + s.n_val, seed=seed, **s.difficulty)
        rng = np.random.default_rng([seed, 17])
        sft_rows = [{"question": r["question"], "answer": restyle_answer(r["answer"], rng, s.p_result_first)}
                    for r in train_rows]
        prompt_rows = {"correctness": train_rows[:s.n_pair_prompts],
                       "style": train_rows[s.n_pair_prompts:2 * s.n_pair_prompts]}
        width = max(len(p) for p in sampling.encode_prompts(tok, sampling.render_prompts(tok, train_rows[:2000]
                                                                                          + held)))
        gen = dict(max_new_tokens=s.max_new_tokens, batch_size=s.gen_batch, prompt_width=-(-width // 8) * 8)
        return cls(s, seed, out_dir, resume, tok, held[:s.n_test], held[s.n_test:], sft_rows, prompt_rows, gen, {})

    def greedy(self, model) -> tuple[np.ndarray, np.ndarray]:
        """Per held-out problem: whether the greedy answer is correct, and its style reward."""
        g = sampling.greedy_accuracy(model, self.tok, self.test_rows, score_fn=synthetic.score, **self.gen)
        return np.asarray(g["correct"], bool), np.asarray([style_reward(x) for x in g["texts"]])

    def mass(self, model, pairs) -> dict:
        m = evaluate.sampled_mass_split(model, self.tok, pairs, num_samples=self.s.mass_samples,
                                        key=jax.random.PRNGKey(77), temperature=self.s.temperature, **self.gen)
        return {k: m[k] for k in ("chosen", "rejected", "other")}


def run_world_seed(s: WorldSettings, seed: int, arms: Mapping[str, Sequence[Method]], out_dir: str,
                   resume: bool = False) -> dict:
    """One whole-pipeline seed: task split -> SFT (levelled off) -> on-policy samples -> the pairs
    of each setting -> every arm of that setting from the same SFT model, pairs, order and seed
    -> measurements. ``arms[setting]`` lists the methods of each setting to run.

    Per arm: ``accuracy``, ``correct`` [n_test] (greedy, held-out), ``reward`` [n_test] (style
    reward of the same greedy responses), ``win`` [n_test] (against the SFT model's), the
    :func:`~spo_jax.experiment.stats.pair_shift` of the setting's own pairs (vectors as lists), plus for
    the correctness setting the probability-mass split of sampled answers on the pairs' prompts.

    With ``resume``, what an earlier (killed or smaller) run of the same seed finished in
    ``out_dir`` is read back instead of recomputed: the SFT model (``sft/hf_final`` +
    ``sft/sft.json``), each setting's pairs (``pairs_<setting>.jsonl`` + ``.stats.json``) and each finished arm
    (:func:`~spo_jax.experiment.runs.compare`); everything else is recomputed (deterministic)."""
    unknown = sorted(set(arms) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the settings are {list(SETTINGS)}")
    t0 = time.perf_counter()
    w = _Seed.build(s, seed, out_dir, resume)
    sft_graphdef, sft_params, sft_export, curve, chosen = _sft(w)
    sft_model = nnx.merge(sft_graphdef, sft_params)
    t = time.perf_counter()
    sft_correct, sft_reward = w.greedy(sft_model)
    w.timings["eval_sft"] = time.perf_counter() - t
    logger.info("seed %d SFT (step %d): held-out accuracy %.3f, style reward %.3f, curve %s", seed, chosen,
                sft_correct.mean(), sft_reward.mean(), curve)
    pairs, pair_stats = _pairs(w, sft_model, arms)
    # The SFT data of the arms that train on them (SFT-mix, +SPO(SFT)), the same for every arm: the first
    # pref_steps x pref_batch of the seed's SFT rows, one epoch of the SFT iterator (each row seen once;
    # tokenizing all 20000 rows for every such arm cost 10 s an arm on the 2-core machine).
    sft_ds = _dataset(w.sft_rows[:s.pref_steps * s.pref_batch])
    out: dict[str, Any] = {
        "seed": seed, "sft": {"accuracy": float(sft_correct.mean()), "reward": float(sft_reward.mean()),
                              "curve": {str(k): v for k, v in sorted(curve.items())}, "chosen_step": chosen,
                              "correct": sft_correct.astype(int).tolist(), "reward_items": sft_reward.tolist()},
        "pairs": pair_stats, "settings": {}}
    for name, methods in arms.items():
        out["settings"][name] = _setting(w, name, methods, pairs[name], sft_model, sft_graphdef, sft_params,
                                         sft_export, sft_reward, sft_ds)
    w.timings["total"] = time.perf_counter() - t0
    out["timings_s"] = w.timings
    return out


def _sft(w: _Seed) -> tuple[Any, Any, str, dict[int, float], int]:
    """The seed's SFT model, trained until levelled off or read back (``sft/sft.json``): its graphdef,
    parameters, export directory, validation-accuracy curve ({step: accuracy}) and the step it is at, the
    curve's best (:func:`~spo_jax.experiment.world.best_step`)."""
    sft_dir = os.path.join(w.out_dir, "sft")
    sft_record = os.path.join(sft_dir, "sft.json")
    sft_graphdef = sft_params = sft_export = None
    if w.resume and os.path.exists(sft_record):
        rec = read_json(sft_record, ("export_dir", "curve", "seconds"))
        sft_export, curve = rec["export_dir"], {int(k): v for k, v in rec["curve"].items()}
        w.timings["sft"] = rec["seconds"]
        logger.info("seed %d: SFT model read back from %s", w.seed, sft_export)
    else:
        if w.resume and os.path.isdir(sft_dir):
            shutil.rmtree(sft_dir)  # half-done by a killed run
        curve = {}
        w.timings["sft"] = 0.0

    def run_sft(num_steps: int) -> dict[int, float]:
        """Train (or continue) the SFT run to ``num_steps``; its new points of the accuracy curve."""
        nonlocal sft_graphdef, sft_params, sft_export
        t = time.perf_counter()
        c = sft_config(w.s, sft_dir, w.seed)
        c.train.num_steps = num_steps
        c.checkpoint.resume = bool(curve)  # continue from the last run's final checkpoint
        sft = train(c, train_data=_dataset(w.sft_rows), eval_data=_dataset(w.val_rows))
        sft_graphdef, sft_params, sft_export = sft.graphdef, jax.device_get(sft.state.params), sft.export_dir
        new = {int(h["step"]): float(h["gen/accuracy"]) for h in sft.history
               if h["split"] == "eval" and "gen/accuracy" in h and int(h["step"]) > max(curve, default=0)}
        w.timings["sft"] += time.perf_counter() - t
        write_json(sft_record, {"export_dir": sft_export, "seconds": w.timings["sft"],
                                "curve": {str(k): v for k, v in sorted({**curve, **new}.items())}})
        return new

    sft_until_levelled(w.s, curve, run_sft)
    chosen = best_step(curve)
    if not (os.path.exists(sft_record) and read_json(sft_record).get("chosen_step") == chosen):
        t = time.perf_counter()
        if chosen != max(curve):  # the curve fell after its best point: export that point's checkpoint
            sft_graphdef, sft_params, sft_export = _restore_sft(w, sft_dir, chosen, curve)
        w.timings["sft"] += time.perf_counter() - t
        write_json(sft_record, {"export_dir": sft_export, "seconds": w.timings["sft"], "chosen_step": chosen,
                                "curve": {str(k): v for k, v in sorted(curve.items())}})
    if sft_graphdef is None:
        sft_graphdef, sft_params = nnx.split(models.from_pretrained(sft_export))
    return sft_graphdef, sft_params, sft_export, curve, chosen


def _restore_sft(w: _Seed, sft_dir: str, step: int, curve: Mapping[int, float]) -> tuple[Any, Any, str]:
    """Make the SFT run's checkpoint at ``step`` its final state and export it (``hf_final``): the later
    checkpoints are deleted and the run resumed to ``step``, which evaluates it again; that accuracy must be
    the curve's (the same parameters) -- RuntimeError otherwise."""
    ckpt = os.path.join(sft_dir, "checkpoints")
    if not os.path.isdir(os.path.join(ckpt, str(step))):
        raise ValueError(f"{ckpt} has no checkpoint at step {step}, the best point of the SFT curve "
                         f"{dict(sorted(curve.items()))}: it was written before SFT kept a checkpoint per point; "
                         f"delete {sft_dir} to train SFT again, or use a new --out")
    for name in os.listdir(ckpt):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(ckpt, name))
    c = sft_config(w.s, sft_dir, w.seed)
    c.train.num_steps = step
    c.checkpoint.resume = True
    sft = train(c, train_data=_dataset(w.sft_rows), eval_data=_dataset(w.val_rows))
    again = [float(h["gen/accuracy"]) for h in sft.history if h["split"] == "eval" and int(h["step"]) == step]
    if again != [curve[step]]:
        raise RuntimeError(f"seed {w.seed}: the SFT checkpoint of step {step} scores {again} on the validation "
                           f"problems, its curve point {curve[step]}: not the same parameters")
    logger.info("seed %d: SFT starts from step %d (validation accuracy %.3f, the curve's best; last %d: %.3f)",
                w.seed, step, curve[step], max(curve), curve[max(curve)])
    return sft.graphdef, jax.device_get(sft.state.params), sft.export_dir


def _pairs(w: _Seed, sft_model, arms: Mapping[str, Sequence[Method]]) -> tuple[dict[str, list[dict]], dict]:
    """Each setting's pairs from on-policy samples of its own training prompts (read back on resume), written
    to ``pairs_<setting>.jsonl`` and ``.stats.json``; RuntimeError if a setting has fewer than one batch."""
    s, t = w.s, time.perf_counter()
    key = jax.random.PRNGKey(1000 + w.seed)
    pairs: dict[str, list[dict]] = {}
    pair_stats: dict[str, dict] = {}
    for name in arms:
        saved = os.path.join(w.out_dir, f"pairs_{name}.stats.json")  # written after pairs_<setting>.jsonl
        if w.resume and os.path.exists(saved):
            with open(os.path.join(w.out_dir, f"pairs_{name}.jsonl")) as f:
                pairs[name] = [json.loads(line) for line in f]
            pair_stats[name] = read_json(saved)
    if "correctness" in arms and "correctness" not in pairs:
        pairs["correctness"], pair_stats["correctness"] = sampling.sample_pairs(
            sft_model, w.tok, w.prompt_rows["correctness"], num_samples=s.num_samples,
            key=jax.random.fold_in(key, 0), temperature=s.temperature, score_fn=synthetic.score, seed=w.seed, **w.gen)
    if "style" in arms and "style" not in pairs:
        prompts, samples = sampling.sample_responses(
            sft_model, w.tok, w.prompt_rows["style"], num_samples=s.num_samples, key=jax.random.fold_in(key, 1),
            temperature=s.temperature, **w.gen)
        pairs["style"], pair_stats["style"] = style_pairs(prompts, samples)
    w.timings["sampling"] = time.perf_counter() - t
    for name, p in pairs.items():
        if len(p) < s.pref_batch:
            raise RuntimeError(f"seed {w.seed}, setting {name}: only {len(p)} pairs from {s.n_pair_prompts} prompts "
                               f"({pair_stats[name]}); fewer than one batch ({s.pref_batch}) -- change the SFT "
                               "steps, the task difficulty or n_pair_prompts.")
        with open(os.path.join(w.out_dir, f"pairs_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in p)
        write_json(os.path.join(w.out_dir, f"pairs_{name}.stats.json"), pair_stats[name])
    return pairs, pair_stats


def _setting(w: _Seed, name: str, methods: Sequence[Method], pairs: list[dict], sft_model, sft_graphdef,
             sft_params, sft_export: str, sft_reward: np.ndarray, sft_ds) -> dict:
    """Every arm of one setting from the SFT model on the setting's pairs, measured: ``{"runs", "methods"}``
    plus, for the correctness setting, the SFT model's mass split and the gradient geometry."""
    s = w.s
    ds = pairs_dataset(pairs)
    tok_pairs, _ = prepare_dataset(ds, w.tok, max_length=s.max_length, format="preference", min_prompt_length=8)
    lp_kw = dict(max_length=s.max_length, pad_id=0, batch_size=64)
    start_lp = evaluate.pair_logps(sft_graphdef, sft_params, tok_pairs, **lp_kw)
    mass_pairs = pairs[:s.n_mass_pairs]
    extra: dict[str, Any] = {}
    if name == "correctness":
        extra["sft_mass_split"] = w.mass(sft_model, mass_pairs)
        extra["gradient_diagnostics"] = _grad_diagnostics(sft_graphdef, sft_params, tok_pairs, s)

    def measure(m: Method, graphdef, params) -> dict:
        model = nnx.merge(graphdef, params)
        correct, reward = w.greedy(model)
        shift = pair_shift(start_lp, evaluate.pair_logps(graphdef, params, tok_pairs, **lp_kw))
        r = {"accuracy": float(correct.mean()), "reward": float(reward.mean()),
             "win_rate": float(win_rate(reward, sft_reward).mean()),
             "correct": correct.astype(int).tolist(), "reward_items": reward.tolist(),
             **{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in shift.items()}}
        if name == "correctness":
            r["mass_split"] = w.mass(model, mass_pairs)
        return r

    t = time.perf_counter()
    runs = compare(methods, make_config=lambda m, d: preference_config(s, m, d, sft_export, w.seed),
                   train_data=ds, measure=measure, out_dir=os.path.join(w.out_dir, name), resume=w.resume,
                   sft_data=sft_ds if any(m.uses_sft_data for m in methods) else None)
    w.timings[f"methods_{name}"] = time.perf_counter() - t
    return {"runs": runs, **extra, "methods": {m.label: _method_record(m) for m in methods}}


def _method_record(m: Method) -> dict:
    """What results.json records of an arm's method (the SFT-data fields only for the arms that read them)."""
    return {"family": m.family, "loss": m.loss, "hparams": m.hp, "spo_gamma": m.spo_gamma,
            **({"sft_data_weight": m.sft_data_weight, "spo_extra": dict(m.spo_extra)} if m.uses_sft_data else {})}


def _dataset(rows):
    return datasets.Dataset.from_list(list(rows))


def _grad_diagnostics(graphdef, params, tok_pairs, s: WorldSettings) -> dict:
    """Per-pair gradient geometry at the SFT model on (up to) 16 pairs: the share where one DPO
    step lowers the chosen log-prob to first order (<g_w, g_l> > |g_w|^2)."""
    n = min(16, len(tok_pairs))
    it = BatchIterator(tok_pairs.select(range(n)), batch_size=n, max_length=s.max_length, packing=False,
                       length_bucket=16, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    g = evaluate.pair_gradient_stats(graphdef, params, next(iter(it)))
    return {"num_pairs": int(len(g["gw_gl"])), "mean_cos": float(np.mean(g["cos"])),
            "frac_dpo_lowers_chosen": float(np.mean(g["dpo_chosen_direction"] < 0))}
