"""Model names: a local path (directory or file) or a Hugging Face Hub id, told apart before any download."""

from __future__ import annotations

import contextlib
import os
import re

__all__ = ["MODEL_SUFFIXES", "DATA_SUFFIXES", "ModelPathError", "looks_like_path", "local_or_hub"]

# What the Hub accepts as a repo id: "name" or "org/name", word characters, "-" and "." (not at the ends).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/)?[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")
MODEL_SUFFIXES = (".gguf", ".safetensors", ".json", ".bin", ".pt", ".pth")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".gz")


class ModelError(ValueError):
    """A model, tokenizer or adapter that cannot be used (damaged or unsupported files, non-finite weights,
    weights that do not fit): the message names the file and the problem (the CLI's exit 4)."""


class ModelPathError(ModelError):
    """A model or tokenizer name that is a local path (not a Hub id) names nothing on disk."""


def looks_like_path(name: str, suffixes: tuple[str, ...] = MODEL_SUFFIXES) -> bool:
    """True for names that can only mean a local path: starting with ``.``, ``/`` or ``~``, holding a
    backslash or more than one ``/``, ending in one of ``suffixes`` (file types that are no Hub id: by
    default weights / config files; ``DATA_SUFFIXES`` for data files), not a valid Hub id, or ``dir/name``
    where ``dir`` is an existing local directory. ``org/name`` otherwise is a Hub id."""
    name = str(name)
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if name.lower().endswith(suffixes) or not _HUB_ID.match(name):
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])


def local_or_hub(name: str) -> tuple[str, bool]:
    """``(name, is_local)``: an existing local path (``~`` expanded), or a Hub id left to the caller.

    Raises ``ModelPathError`` ("no such directory or file: <name>") for a path-like name that does not
    exist, instead of letting it reach the Hub as an id (which fails with a network or validation error).
    """
    name = str(name)
    expanded = os.path.expanduser(name)
    if os.path.exists(expanded):
        return expanded, True
    if looks_like_path(name):
        where = os.path.abspath(expanded)
        raise ModelPathError(f"no such directory or file: {name}" + (f" (looked at {where})" if where != name else "")
                             + "; fix the path, or give a Hugging Face Hub id like 'org/name'")
    return name, False


@contextlib.contextmanager
def damaged_file(file: str):
    """A file that cannot be read as what it should be (truncated, not safetensors) is a ``ModelError``
    naming it; a missing one is the file system's error."""
    try:
        yield
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise ModelError(f"{file} cannot be read ({type(e).__name__}: {e}): the file is damaged or incomplete "
                         "(e.g. an interrupted download or copy); download or export it again") from e
