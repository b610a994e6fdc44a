"""The package as a user installs it: a wheel built from this checkout carries the presets, and
``python -m spo_jax.train --config=<preset>`` works from an empty directory with only the wheel's
files on the path (no checkout: the README's commands name no file of it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from spo_jax import configs
from tests.test_train import ROOT, write_pairs


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    """The wheel of this checkout (built from a copy, so no build/ or egg-info lands in the
    checkout), unzipped: what ``pip install --no-deps <wheel>`` puts in site-packages."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "spo_jax"), src / "spo_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("spo_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        site = tmp_path_factory.mktemp("site")
        z.extractall(site)
    for preset in (*configs.PRESETS, "run"):
        assert f"spo_jax/configs/{preset}.py" in names, sorted(n for n in names if "configs" in n)
    return site


def _cli(site, cwd, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "spo_jax.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def test_presets_run_from_the_wheel_in_an_empty_directory(wheel_dir, tmp_path):
    cwd = tmp_path / "empty"
    cwd.mkdir()
    proc = _cli(wheel_dir, cwd, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(f"  {name} " in proc.stdout for name in configs.PRESETS)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    proc = _cli(wheel_dir, cwd, "--config=tiny", "--config.run_dir=run", f"--config.data.train_path={pairs}",
                "--config.train.num_steps=2", "--config.checkpoint.every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["run_dir"] == str(cwd / "run") and out["last_train"]["step"] == 2
    proc = _cli(wheel_dir, cwd, "--config=experiments/default.py")  # a checkout's path means nothing here
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "usage error: --config=experiments/default.py is neither a file nor a preset; presets: dpo,")
