"""The presets a run starts from, shipped with the package and named on the command line
without a path (``spo_jax.cli`` resolves the name before absl parses the flags)::

    python -m spo_jax.train --config=dpo --config.run_dir=runs/dpo --config.model.path=... \\
        --config.data.train_path=pairs.jsonl
    python -m spo_jax.train --config=paper:qwen2.5-0.5b,dpo,spo,gsm8k     # text after ":" -> get_config
    python -m spo_jax.train --config=runs/dpo/config.json                 # rerun / resume a run

Each preset is a module of this package with ``get_config(arg=None)`` (an ml_collections config
file); any field is still overridden with ``--config.<field>=<value>``. A ``.json`` file is a run
description written by a run (``spo_jax.run_info``), loaded by :mod:`spo_jax.configs.run`.
"""

from __future__ import annotations

import os

__all__ = ["PRESETS", "preset_path", "resolve", "describe", "recipe"]

#: name -> one line on what it is (the module ``spo_jax/configs/<name>.py``).
PRESETS = {
    "dpo": "DPO (beta 0.1), cached reference, cosine schedule, 10% warm-up, 1000 steps of 32 pairs, 1024 tokens",
    "spo": "the dpo preset wrapped in SPO (penalty solver, reference value, gamma 10)",
    "lora_dpo": "the dpo preset training LoRA adapters (rank 16, alpha 32, every projection) on a frozen base",
    "sft": "supervised fine-tuning (token NLL of the completions), no reference",
    "paper": "the SPO paper's grid: --config=paper:MODEL,LOSS,spo|nospo,DATASET[,STAGE][,MESH]",
    "tiny": "a 2-layer random Llama with a synthetic tokenizer: a smoke test of an install",
}


def recipe(config):
    """The dpo and sft presets' shared training recipe, set on ``config`` (returned): cosine schedule with a
    warm-up over 10% of the steps (the alignment-handbook / SimPO recipes' ``warmup_ratio`` 0.1, as the
    paper grid), following ``--config.train.num_steps``; 1000 steps of 32 examples of up to 1024 tokens."""
    config.optim.warmup_steps = config.train.get_ref("num_steps") // 10
    config.optim.schedule = "cosine"
    config.train.num_steps = 1000
    config.data.batch_size = 32
    config.data.max_length = 1024
    return config


_HERE = os.path.dirname(os.path.abspath(__file__))


def preset_path(name: str) -> str:
    """The file of preset ``name`` (a key of :data:`PRESETS`)."""
    return os.path.join(_HERE, f"{name}.py")


def describe() -> str:
    """One line per preset: what ``--help`` and a wrong ``--config`` print."""
    return "\n".join(f"  {name:9s} {what}" for name, what in PRESETS.items())


def resolve(value: str) -> str | None:
    """The ml_collections config-file argument for ``--config=<value>``: an existing file as
    given (a ``.json`` run description through :mod:`spo_jax.configs.run`), a preset name
    (``name`` or ``name:arg``) as its module's path; None when it is neither."""
    path, sep, arg = value.partition(":")
    if os.path.isfile(path):
        if path.endswith(".json"):
            return f"{preset_path('run')}:{os.path.abspath(path)}"
        return value
    if path in PRESETS:
        return preset_path(path) + sep + arg
    return None
