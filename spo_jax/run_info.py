"""A run directory that describes its run, written by process 0 before anything runs
(``spo_jax.train.train`` calls :func:`write` once the config is valid and the run directory
locked):

* ``config.json``: the resolved config of the training run (every field, as the checkpoints record
  it): written at a fresh start, and at a resume once its checkpoint accepted the config (a refused
  resume leaves it as it was); an evaluation (stage eval) never writes it.
  ``python -m spo_jax.train --config=<run_dir>/config.json`` reruns the run, or resumes it from
  its newest checkpoint (``spo_jax.configs.run``); relative paths in it are relative to ``cwd``.
* ``run_info.json``: ``{"invocations": [...]}``, one entry per start (a resume appends): the
  command line as typed (``command``), the one that reruns it (``rerun``), ``cwd``, ``started``
  (UTC), the ``versions`` of python / jax / jaxlib / flax / optax / orbax-checkpoint / transformers
  / spo_jax, the ``git`` commit of the checkout spo_jax was imported from (with ``dirty``: uncommitted
  changes; absent for an installed package), the ``devices`` and the ``data`` files (path, bytes,
  sha256; a directory file by file; a Hub id or an in-memory dataset named as such).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import subprocess
import sys

import jax

__all__ = ["CONFIG_NAME", "INFO_NAME", "write", "write_config", "describe", "versions", "git_commit", "file_digest"]

logger = logging.getLogger("spo_jax.run_info")

CONFIG_NAME = "config.json"
INFO_NAME = "run_info.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "spo_jax")
DATA_FIELDS = ("train", "eval", "sft")


def versions() -> dict:
    """Python's and each of :data:`PACKAGES`' installed version (None: not installed, e.g.
    spo_jax run from a checkout)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: str | None = None) -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``path`` (default: this package),
    None outside a checkout (an installed wheel) or without git."""
    path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def file_digest(path: str) -> dict:
    """``{"path", "bytes", "sha256"}`` of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": os.path.abspath(path), "bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _data_source(path: str, in_memory: bool) -> dict | list | None:
    if in_memory:
        return {"source": "in-memory dataset (train(..., <split>_data=...))"}
    if not path:
        return None
    if os.path.isfile(path):
        return file_digest(path)
    if os.path.isdir(path):
        return [file_digest(os.path.join(root, name)) for root, _, names in sorted(os.walk(path))
                for name in sorted(names)]
    return {"source": "Hugging Face Hub", "id": path}


def describe(config, *, in_memory: tuple[str, ...] = ()) -> dict:
    """This invocation's entry of ``run_info.json`` (see the module docstring). ``in_memory``: the
    splits given as datasets in Python rather than by path."""
    run_dir = os.path.abspath(os.path.expanduser(config.run_dir))
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is not None and main.name.startswith("spo_jax."):  # python -m spo_jax.train runs spo_jax.cli
        command = shlex.join(["python", "-m", main.name.replace("spo_jax.cli", "spo_jax.train"), *sys.argv[1:]])
    else:
        command = shlex.join(["python", *sys.argv]) + "  # spo_jax.train.train(config) called from Python"
    data = {}
    for split in DATA_FIELDS:
        source = _data_source(config.data[f"{split}_path"], split in in_memory)
        if source is not None:
            data[split] = source
    info = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "stage": config.stage,
        # an evaluation reruns as typed (config.json stays the training run's)
        "rerun": f"cd {shlex.quote(os.getcwd())} && " + (command if config.stage == "eval" else
                 f"python -m spo_jax.train --config={shlex.quote(os.path.join(run_dir, CONFIG_NAME))}"),
        "cwd": os.getcwd(),
        "versions": versions(),
        "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count(),
                    "kinds": sorted({d.device_kind for d in jax.devices()}), "processes": jax.process_count(),
                    "host": platform.node()},
        "data": data,
    }
    git = git_commit()
    if git is not None:
        info["git"] = git
    return info


def write(config, config_dict: dict, *, in_memory: tuple[str, ...] = (), config_file: bool = True) -> None:
    """Append this invocation to ``run_info.json`` in ``config.run_dir`` and, with ``config_file``,
    write ``config.json`` (``config_dict``: the resolved config). Process 0 only; the others return
    at once."""
    if jax.process_index() != 0:
        return
    run_dir = os.path.abspath(os.path.expanduser(config.run_dir))
    os.makedirs(run_dir, exist_ok=True)
    if config_file:
        write_config(run_dir, config_dict)
    info_path = os.path.join(run_dir, INFO_NAME)
    invocations = []
    try:
        with open(info_path, encoding="utf-8") as f:
            invocations = list(json.load(f)["invocations"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet (or unreadable: started afresh, the file is rewritten whole)
    entry = describe(config, in_memory=in_memory)
    _write_json(info_path, {"invocations": invocations + [entry]})
    logger.info("run described in %s and %s; rerun or resume: %s", os.path.join(run_dir, CONFIG_NAME),
                INFO_NAME, entry["rerun"])


def write_config(run_dir: str, config_dict: dict) -> None:
    """``<run_dir>/config.json``: the training run's resolved config (atomic)."""
    _write_json(os.path.join(run_dir, CONFIG_NAME), config_dict)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)
