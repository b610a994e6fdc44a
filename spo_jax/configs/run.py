"""A run's own description as a config: ``--config=<run_dir>/config.json`` (``spo_jax.cli``
routes a ``.json`` file here) reruns the run, or resumes it from its newest checkpoint.

The file is the resolved config a run wrote before it started (``spo_jax.run_info``); its
values are laid over ``get_default_config()``, so the result is locked and typed as every
preset's, and ``--config.<field>=`` still overrides. Relative paths in it are relative to the
directory the run was started from (``run_info.json``'s ``cwd``; its ``rerun`` is the command).
"""

from __future__ import annotations

import json

import ml_collections

from spo_jax.config import get_default_config
from spo_jax.validation import ConfigError

__all__ = ["FREE_DICTS", "get_config"]

#: Fields whose value is a dict of free keys (the loss's hyperparameters, an inline HF config).
FREE_DICTS = ("loss.hparams", "model.config")


def get_config(path: str) -> ml_collections.ConfigDict:
    with open(path, encoding="utf-8") as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config={path}: not a run description ({e})") from None
    config = get_default_config()
    _overlay(config, saved, "", path)
    return config


def _overlay(node: ml_collections.ConfigDict, saved: dict, prefix: str, path: str) -> None:
    for key, value in saved.items():
        name = prefix + key
        if key not in node:
            raise ConfigError(f"--config={path}: config.{name} is not a field of this spo_jax version "
                              "(written by another version?); remove it from the file")
        if name in FREE_DICTS:
            node[key] = None if value is None else ml_collections.ConfigDict(value)
            if name == "loss.hparams":
                node[key].unlock()
        elif isinstance(node[key], ml_collections.ConfigDict):
            _overlay(node[key], value, name + ".", path)
        else:
            node[key] = value
