"""Training a list of methods from one start and measuring each (:func:`compare`): the same start, pairs,
order, seed, steps and optimiser for every arm, one ``arm.json`` record per finished arm (read back on
resume), and the host memory an arm freed handed back before the next (:func:`release_host_memory`).
Also the trainer settings every experiment's runs share (:func:`experiment_config`, :func:`preference_stage`,
:func:`in_process_arm`), the pairs as a dataset (:func:`pairs_dataset`) and the atomic JSON records
(:func:`write_json`, :func:`read_json`).
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import jax

from spo_jax.config import get_default_config
from spo_jax.experiment.methods import Method, apply_method
from spo_jax.train import train

logger = logging.getLogger("spo_jax.experiment")


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
            rec = read_json(done, ("method", "result"))
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
        write_json(done, {"method": spec, "result": r})
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


def experiment_config(run_dir: str, seed: int, *, max_length: int, min_prompt_length: int, length_bucket: int):
    """The trainer settings every run of an experiment shares (the synthetic world's SFT and arms, SmolLM2's
    arms): an in-process arm (:func:`in_process_arm`), float32 compute, the data lengths, a constant learning
    rate. Each experiment adds its own (:func:`spo_jax.experiment.world.base_config`, ``experiments/smollm2.py``)."""
    c = in_process_arm(get_default_config())
    c.run_dir = run_dir
    c.seed = int(seed)
    c.model.dtype = "float32"
    c.data.max_length = max_length
    c.data.min_prompt_length = min_prompt_length
    c.data.length_bucket = length_bucket
    c.optim.schedule = "constant"
    return c


def preference_stage(c, m: Method, *, model_path: str, batch_size: int, learning_rate: float, num_steps: int):
    """Make ``c`` (in place; returns it) the preference stage of arm ``m`` from ``model_path`` (also the cached
    reference): the method (:func:`~spo_jax.experiment.methods.apply_method`), the batch, the learning rate
    without warm-up, the steps, and no HF export (the arm is measured in-process)."""
    c.model.path = model_path
    apply_method(c, m)
    c.data.batch_size = batch_size
    c.data.eval_batch_size = batch_size
    c.optim.learning_rate = learning_rate
    c.optim.warmup_steps = 0
    c.train.num_steps = num_steps
    c.checkpoint.export_hf = False
    return c


def pairs_dataset(pairs: Sequence[Mapping]) -> datasets.Dataset:
    """Preference rows (``prompt``, ``chosen``, ``rejected``; other keys dropped) as a dataset to train on."""
    return datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])


def in_process_arm(c):
    """Trainer settings of a run an experiment drives in-process and measures itself: no periodic
    checkpoints (nor background saves), no progress bar or TensorBoard, a metrics record every step."""
    c.checkpoint.every = 0
    c.checkpoint.async_save = False
    c.metrics.progress_bar = False
    c.metrics.tensorboard = False
    c.metrics.log_every = 1
    return c


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (a kill leaves the old file or the new one, never half)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, default=float)
    os.replace(tmp, path)


def read_json(path: str, keys: Sequence[str] = ()):
    """A record written by :func:`write_json`; ValueError naming the file when it is not JSON or lacks
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
