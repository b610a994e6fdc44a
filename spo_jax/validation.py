"""``ConfigError`` and the field checks every module's ``validate_config`` uses.

Each module validates the config fields it reads (``inputs``: model.*, data.*;
``reference``: reference.*; ``objectives``: loss.*, spo.*, logprobs.*);
``spo_jax.config.validate_config`` assembles them with the run-level sections.
Every message names the field, the value and the fix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, NoReturn

from spo_jax.models.paths import DATA_SUFFIXES, MODEL_SUFFIXES, looks_like_path

__all__ = ["ConfigError", "fail", "is_int", "is_num", "check_bool", "check_int", "check_choice", "check_source"]


class ConfigError(ValueError):
    """A configuration mistake; the message names the field, the value and the fix."""


def fail(field: str, value: Any, why: str) -> NoReturn:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(config, field: str):
    node = config
    for key in field.split("."):
        node = node[key]
    return node


def check_bool(config, *fields: str) -> None:
    """Each dotted ``field`` of ``config`` is True or False."""
    for field in fields:
        v = _get(config, field)
        if not isinstance(v, bool):
            fail(field, v, "must be True or False")


def check_int(config, fields: Sequence[str], lo: int, why: str = "") -> None:
    """Each dotted ``field`` is an int >= ``lo``."""
    for field in fields:
        v = _get(config, field)
        if not is_int(v) or v < lo:
            fail(field, v, f"must be an int >= {lo}{why}")


def check_choice(config, field: str, choices: Sequence[str]) -> None:
    v = _get(config, field)
    if v not in choices:
        fail(field, v, f"must be one of {tuple(choices)}")


#: What ``train.validate_for_run`` puts in a path field when ``train(..., train_data=/eval_data=/sft_data=)``
#: passes the data in memory: no path to check.
IN_MEMORY = "<in-memory"


def check_source(field: str, value: str) -> None:
    """A path that looks local (``spo_jax.models.looks_like_path``, with model and data file suffixes) must
    exist; Hub ids like ``org/name`` are left to the loader."""
    if not isinstance(value, str):
        fail(field, value, "must be a string (a path or a Hub id)")
    if value.startswith(IN_MEMORY) or os.path.exists(os.path.expanduser(value)):
        return
    if looks_like_path(value, MODEL_SUFFIXES + DATA_SUFFIXES):
        fail(field, value, "no such file or directory; fix the path (Hub ids look like 'org/name')")
