"""spo_jax.compile_cache: where the cache goes, 'off', and a second identical process compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from spo_jax import compile_cache
from tests.helpers import FORK_EACH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resolve_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve_cache_dir() == str(tmp_path / "xdg" / "spo_jax" / "jax_cache")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve_cache_dir("") == str(tmp_path / "home" / ".cache" / "spo_jax" / "jax_cache")
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir(None) == str(tmp_path / "env")
    # an explicit setting wins over the environment; relative paths and ~ are resolved
    assert compile_cache.resolve_cache_dir("~/cc") == str(tmp_path / "home" / "cc")
    monkeypatch.chdir(tmp_path)
    assert compile_cache.resolve_cache_dir("rel") == str(tmp_path / "rel")
    for off in ("off", "OFF", "none", "false", "0"):
        assert compile_cache.resolve_cache_dir(off) is None
    monkeypatch.setenv(compile_cache.ENV_VAR, "off")
    assert compile_cache.resolve_cache_dir() is None
    assert compile_cache.resolve_cache_dir(str(tmp_path / "x")) == str(tmp_path / "x")


def test_unwritable_dir_names_the_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"cannot create the directory .*file/cache.*'off'"):
        compile_cache.enable_compile_cache(str(blocker / "cache"))


# A fresh process: the cache set up as the entry points do, then a small jitted train-like step
# (forward, grad, update) on two shapes; prints its CompileStats as JSON.
_CHILD = """
import json, sys
from spo_jax.compile_cache import CompileStats, enable_compile_cache
import jax, jax.numpy as jnp
enable_compile_cache(sys.argv[1])
def loss(w, x):
    return jnp.mean(jnp.tanh(x @ w) ** 2)
step = jax.jit(lambda w, x: w - 0.1 * jax.grad(loss)(w, x))
with CompileStats() as s:
    w = jnp.ones((8, 8))
    for n in (4, 6):
        w = step(w, jnp.ones((n, 8)))
    float(w.sum())
print(json.dumps(dict(programs=s.programs, compiled=s.compiled, hits=s.cache_hits, writes=s.cache_writes)))
"""


# One interpreter imports jax (no backend started, nothing compiled), then runs _CHILD in a forked process per
# setting, one after another: each a process of its own, with JAX's in-memory caches empty.
_FORKS = FORK_EACH + """
import jax, jax.numpy, spo_jax.compile_cache
child_code = compile(sys.argv[1], "<child>", "exec")
settings = sys.argv[2:]


def child(i, setting):
    sys.argv = ["-c", setting]
    exec(child_code, {"__name__": "__main__"})


for setting, code in zip(settings, fork_each(settings, child)):
    if code:
        sys.exit(f"the process with setting {setting} failed")
"""


def _children(*settings: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(compile_cache.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", _FORKS, _CHILD, *settings], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(settings), out.stdout
    return lines


def test_second_identical_process_compiles_nothing(tmp_path):
    cache = str(tmp_path / "cache")
    first, second, off = _children(cache, cache, "off")
    assert first["programs"] >= 2 and first["compiled"] == first["programs"] and first["writes"] >= 2
    assert second["programs"] == first["programs"]
    assert second["compiled"] == 0 and second["hits"] == second["programs"] and second["writes"] == 0
    assert off["compiled"] == off["programs"] and off["hits"] == off["writes"] == 0
    # small programs are cached too (no thresholds); the second process and 'off' wrote nothing there
    assert len(os.listdir(cache)) == first["writes"]


def test_cli_second_identical_run_compiles_nothing(tmp_path):
    """The training CLI with config.compile_cache: the second run (same config, a fresh run directory)
    loads every XLA program from the cache and ends with the same loss."""
    from tests.test_train import write_pairs
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    cache = tmp_path / "cache"

    def args(run: str, setting: str) -> list[str]:
        return [f"--config={os.path.join(ROOT, 'experiments', 'tiny_test.py')}", f"--config.run_dir={tmp_path / run}",
                f"--config.data.train_path={pairs}", "--config.train.num_steps=2", "--config.checkpoint.every=0",
                "--config.model.config.num_hidden_layers=1", f"--config.compile_cache={setting}"]  # (1 layer: half
        # the compile)

    # three processes, one after another (forked from one interpreter that has imported the libraries and
    # started no JAX backend: tests.test_cli.run_cli_batch); the last: a cache directory that cannot be made
    from tests.test_cli import run_cli_batch
    runs = run_cli_batch([(args("a", str(cache)), None), (args("b", str(cache)), None),
                          (args("c", f"{pairs}/cache"), None)], tmp_path / "batch")
    for out in runs[:2]:
        assert out.returncode == 0, out.stderr[-3000:]
    first, second = (json.loads(out.stdout.strip().splitlines()[-1]) for out in runs[:2])
    assert first["compile"]["cache_dir"] == str(cache) and first["compile"]["compiled"] > 0
    assert second["compile"]["programs"] == first["compile"]["programs"]
    assert second["compile"]["compiled"] == 0 and second["compile"]["cache_hits"] == second["compile"]["programs"]
    assert second["last_train"]["loss"] == first["last_train"]["loss"]
    bad = runs[2]
    assert bad.returncode != 0 and "config.compile_cache=" in bad.stderr and "'off'" in bad.stderr
