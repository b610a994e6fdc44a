"""A researcher's first run with the presets (issue 30): the LoRA preset's defaults train, a run
whose loss does not move says why, every train-step program is compiled before the first step."""

from __future__ import annotations

import json
import logging

import ml_collections
import numpy as np

from spo_jax import optim, train
from spo_jax.configs import lora_dpo, tiny
from tests.test_train import write_pairs


def _tiny_lora(tmp_path, *, long_prompts=True, **overrides):
    """The lora_dpo preset as given (learning rate, warm-up, schedule, rank, alpha, dtypes, cached
    reference) with the tiny preset's model and data sizes. ``long_prompts``: a quarter of the
    prompts longer, so that batches come in 2+ lengths."""
    c = lora_dpo.get_config()
    t = tiny.get_config()
    c.model.config = ml_collections.ConfigDict(t.model.config.to_dict())
    c.model.tokenizer = t.model.tokenizer
    for k in ("max_length", "min_prompt_length", "length_bucket", "batch_size"):
        c.data[k] = t.data[k]
    c.run_dir = str(tmp_path / "run")
    rows = [json.loads(line) for line in open(write_pairs(tmp_path / "short.jsonl", n=16))]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps({**r, "prompt": r["prompt"] + " He gets 1 more ." * 3 * (i % 4 == 0 and long_prompts)})
                     + "\n"
                     for i, r in enumerate(rows))
    c.data.train_path = str(tmp_path / "pairs.jsonl")
    c.train.num_steps = 20
    c.checkpoint.export_hf = False
    c.metrics.progress_bar = c.metrics.tensorboard = False
    c.metrics.peak_tflops = 1.0
    for k, v in overrides.items():
        section, field = k.split(".")
        c[section][field] = v
    return c


def test_lora_preset_defaults_move_the_loss_and_every_step_program_is_compiled_ahead(tmp_path, caplog,
                                                                                   monkeypatch):
    made = []
    real = train.make_train_step
    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    c = _tiny_lora(tmp_path, **{"data.length_bucket": 16, "data.max_length": 64})  # 2 batch lengths
    assert c.optim.learning_rate == 0 and optim.learning_rate(c) == 1e-4  # LoRA's default, not 5e-7
    with caplog.at_level(logging.INFO, logger="spo_jax"):
        result = train.train(c)
    losses = [h["loss"] for h in result.history if h["split"] == "train"]
    assert len(losses) == 20 and abs(losses[0] - np.log(2)) < 1e-4  # the policy is the reference at step 1
    # (to fp32 rounding: on 8 devices the step and the reference pass sum in other orders, 1.7e-5 seen)
    assert np.mean(losses[-5:]) < losses[0] - 1e-3, losses  # at 5e-7 it moves < 1e-3 (the next test)
    text = [r.getMessage() for r in caplog.records]
    (plan,) = [m for m in text if "the train step compiles for" in m]
    shapes = int(plan.split("compiles for ")[1].split()[0])
    assert shapes >= 2, plan
    assert sum(m.startswith("compiled the train step for") for m in text) == shapes
    assert made[0]._cache_size() == 0  # no step compiled in the loop: every one ran a program compiled ahead
    assert not [m for m in text if "has not moved" in m]


def test_a_run_whose_loss_does_not_move_warns_with_the_cause(tmp_path, caplog):
    # full fine-tuning's rate; one batch length (one step program): the warning needs no more
    c = _tiny_lora(tmp_path, long_prompts=False, **{"optim.learning_rate": 5e-7, "train.num_steps": 10})
    with caplog.at_level(logging.WARNING, logger="spo_jax"):
        train.train(c)
    (warning,) = [r.getMessage() for r in caplog.records if "has not moved" in r.getMessage()]
    assert "the loss has not moved over the first 10 steps" in warning and "peak learning rate 5e-07" in warning
    assert "LoRA adapters need a rate ~10-100x full fine-tuning's (default 0.0001)" in warning
