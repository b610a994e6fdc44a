"""The command line as a new user meets it: --help lists every config field, and each
expected failure is one line on stderr with a documented exit code (the traceback only
with SPO_JAX_DEBUG=1 / --debug)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from spo_jax import cli
from spo_jax import config as config_lib
from spo_jax.checkpoint import CheckpointRestoreError, CheckpointSaveError
from spo_jax.data import DataError
from spo_jax.models import ModelPathError
from spo_jax.metrics import DegenerateTrainingError, NonFiniteLossError
from spo_jax.validation import ConfigError
from tests.helpers import FORK_EACH
from tests.test_train import GPT2_16, ROOT, write_pairs

TINY = os.path.join(ROOT, "experiments", "tiny_test.py")


def run_cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spo_jax.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


# One interpreter imports what ``python -m spo_jax.train`` imports (jax, transformers, datasets, ...: ~4 s of
# CPU per process), then forks once per invocation; each child runs spo_jax.train as __main__ exactly as
# ``python -m`` does (spo_jax.train and spo_jax.cli are not left imported in the parent: they run fresh, and
# the CLI's absl flags are defined in the child only), with its stdout / stderr on files and its own exit
# status. The parent never starts a JAX backend, so the forks are safe.
_FORK_RUNNER = FORK_EACH + r"""
import json, runpy
import spo_jax, spo_jax.train
assert "spo_jax.cli" not in sys.modules and "absl.flags" in sys.modules
del sys.modules["spo_jax.train"], spo_jax.train
cases, out = json.loads(sys.argv[1]), sys.argv[2]


def child(i, case):
    args, env = case
    os.environ.update(env)
    sys.argv = [sys.argv[0], *args]
    runpy.run_module("spo_jax.train", run_name="__main__", alter_sys=True)


for i, code in enumerate(fork_each(cases, child, out)):
    with open(os.path.join(out, f"{i}.code"), "w") as f:
        f.write(str(code))
"""


def run_cli_batch(cases, out_dir, *, cwd=ROOT, env=None, timeout=600) -> list[subprocess.CompletedProcess]:
    """``python -m spo_jax.train <args>`` for each ``(args, extra_env)`` in ``cases``, one after another, each
    its own (forked) process; ``env``: the whole environment of the batch (default: this one's, CPU)."""
    import json
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu") if env is None else env
    proc = subprocess.run([sys.executable, "-c", _FORK_RUNNER, json.dumps([[list(a), dict(e or {})] for a, e in cases]),
                           str(out_dir)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = lambda i, name: open(os.path.join(out_dir, f"{i}.{name}")).read()  # noqa: E731
    return [subprocess.CompletedProcess(["python", "-m", "spo_jax.train", *a], int(read(i, "code")), read(i, "out"),
                                        read(i, "err")) for i, (a, _) in enumerate(cases)]


def test_every_config_field_has_one_description():
    fields = [name for name, _ in config_lib.config_fields()]
    help_ = config_lib.field_help()
    assert sorted(help_) == sorted(fields)
    assert all(len(help_[f]) > 5 for f in fields)


def test_expected_failures_are_classified_with_exit_codes():
    cases = [(ConfigError("x"), 2), (DataError("x"), 3), (ModelPathError("x"), 4), (CheckpointRestoreError("x"), 5),
             (CheckpointSaveError("x"), 5), (DegenerateTrainingError("x"), 6), (NonFiniteLossError("x"), 6),
             (OSError(errno.ENOSPC, "No space left on device", "/run/metrics.jsonl"), 7),
             (PermissionError(errno.EACCES, "Permission denied", "/run"), 7), (KeyboardInterrupt(), 130)]
    assert cli.EXIT_CODES["terminated"] == 143
    for exc, code in cases:
        assert cli.EXIT_CODES[cli.classify(exc)] == code, exc
    assert cli.classify(ValueError("a bug")) is None and cli.classify(OSError(errno.EIO, "io")) is None


def test_a_model_transformers_cannot_load_is_a_model_error(tmp_path):
    import ml_collections
    import transformers

    missing = str(tmp_path / "missing")
    with pytest.raises(OSError) as err:  # transformers' error for a name it cannot fetch (as for a Hub id offline)
        transformers.PretrainedConfig.get_config_dict(missing)
    assert err.value.errno is None and cli.classify(err.value) == "model"
    c = ml_collections.ConfigDict({"model": {"path": missing, "tokenizer": ""}})
    msg = cli.failure_message("model", err.value, c)
    assert msg.startswith(f"cannot load model.path={missing!r}") and "a Hub id needs network access" in msg


@pytest.fixture(scope="module")
def bad_json(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    good = write_pairs(d / "pairs.jsonl", n=4)
    lines = open(good).read().splitlines()
    lines.insert(2, '{"prompt": "x", "chosen": "a" "rejected": "b"}')
    (d / "bad.jsonl").write_text("\n".join(lines) + "\n")
    # data.max_length past a GPT-2's learned positions (test_config_mistakes_before_anything_heavy)
    (d / "gpt2.py").write_text("import ml_collections\nfrom experiments.tiny_test import get_config as tiny\n\n"
                               "def get_config():\n    c = tiny()\n"
                               f"    c.model.config = ml_collections.ConfigDict({GPT2_16!r})\n    return c\n")
    return d


def _bad_data_args(d):
    return [f"--config={TINY}", f"--config.run_dir={d / 'run'}", f"--config.data.train_path={d / 'bad.jsonl'}"]


def _base_args(d):
    return [f"--config={TINY}", f"--config.run_dir={d / 'run'}", f"--config.data.train_path={d / 'pairs.jsonl'}"]


@pytest.fixture(scope="module")
def cli_runs(bad_json):
    """Every CLI invocation of the tests below, run in one batch (run_cli_batch: a process each)."""
    base = _base_args(bad_json)
    cases = {
        "help": (["--help"], None),
        "bad_data": (_bad_data_args(bad_json), None),
        "bad_data_debug": (_bad_data_args(bad_json), {"SPO_JAX_DEBUG": "1"}),
        "loss": ([*base, "--config.loss.name=dpoo"], None),
        "field": ([*base, "--config.optim.learnig_rate=1e-3"], None),
        "type": ([*base, "--config.train.num_steps=ten"], None),
        "gpt2": ([f"--config={bad_json / 'gpt2.py'}", *base[1:]], None),
        "no_file": (["--config=experiments/nope.py"], None),
    }
    return dict(zip(cases, run_cli_batch(list(cases.values()), bad_json / "batch")))


def _one_line(proc, code: int, prefix: str) -> str:
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix), proc.stderr[-3000:]
    return last


def test_bad_data_file_is_one_line_and_exit_3_traceback_only_on_request(cli_runs):
    proc = cli_runs["bad_data"]
    last = _one_line(proc, 3, "data error: ")
    assert last.endswith("bad.jsonl:3: not valid JSON: Expecting ',' delimiter (column 31); each line must be one "
                         "JSON object.")
    assert "pyarrow" not in proc.stderr  # datasets' own report of the same error is not repeated
    debug = cli_runs["bad_data_debug"]
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DataError" in debug.stderr


def test_config_mistakes_before_anything_heavy(cli_runs):
    # an unknown loss name: the intended config error listing the losses (issue 18 item 8)
    last = _one_line(cli_runs["loss"], 2, "config error: ")
    assert "unknown loss 'dpoo'; known losses: " in last and "simpo" in last
    # a typo in a field name, a value of the wrong type, a config file that does not exist
    last = _one_line(cli_runs["field"], 2, "config error: ")
    assert "no config field 'learnig_rate'" in last and "did you mean learning_rate?" in last
    _one_line(cli_runs["type"], 2, "Pass --helpshort")
    # data.max_length past a GPT-2's learned positions (bad_json's gpt2.py): refused before the model is built
    last = _one_line(cli_runs["gpt2"], 2, "config error: config.data.max_length=32")
    assert "max_position_embeddings=16" in last and "lower data.max_length to <= 16" in last
    last = _one_line(cli_runs["no_file"], 2, "usage error: --config=experiments/nope.py is "
                     "neither a file nor a preset; presets: dpo, spo, lora_dpo, sft, paper, tiny")


def test_help_prints_every_field_with_default_and_description(cli_runs):
    proc = cli_runs["help"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    help_ = config_lib.field_help()
    for name, default in config_lib.config_fields():
        line = f"  {name} = {default!r}\n      {help_[name]}\n"
        assert line in out, name
    assert "Exit codes: 0 done; 1 unexpected error" in out
