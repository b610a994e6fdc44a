"""Reliability faults with real processes and signals: two trainers on one run directory,
Ctrl-C before the first step / mid-run / during a save (and a second Ctrl-C).

Oracles: the exit code and the one line each process prints; the checkpoints and
metrics on disk (one record per step, as ``tests.test_faults.assert_continuous``
checks); a resumed run starting from the checkpoint the stopped one named.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from spo_jax import compile_cache, train
from spo_jax.checkpoint import Checkpointer
from spo_jax.runlock import LOCK_NAME, RunLock, RunLocked
from spo_jax.validation import ConfigError
from tests.test_faults import assert_continuous, train_records
from tests.test_train import ROOT, tiny_config, write_pairs, write_sft

TINY = os.path.join(ROOT, "experiments", "tiny_test.py")
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("reliability") / "pairs.jsonl")


@pytest.fixture(scope="module")
def cache_env():
    """The environment of the trainers this module starts: they and this process share the test session's
    fresh JAX compile cache (tests/conftest.py), so the same tiny programs compile once (this module's runs
    all use the constant schedule: one train step whatever num_steps); a program loaded from it computes
    what its compilation would (the tests compare exact numbers)."""
    path = compile_cache.resolve_cache_dir(None)
    assert path and path == os.environ["SPO_JAX_TEST_COMPILE_CACHE"], path
    return dict(ENV, SPO_JAX_COMPILE_CACHE=path)


def cli_args(run_dir, pairs, *overrides) -> list[str]:
    return [sys.executable, "-m", "spo_jax.train", f"--config={TINY}", f"--config.run_dir={run_dir}",
            f"--config.data.train_path={pairs}", *overrides]


def start(args, env=ENV) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError("timed out")


# --------------------------------------------------------------------------- #
# The run lock
# --------------------------------------------------------------------------- #


def test_run_lock_is_exclusive_names_its_holder_and_a_stale_one_is_taken_over(tmp_path, caplog):
    first = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunLocked, match=rf"pid {os.getpid()} on host {socket.gethostname()} \(started "):
        RunLock(str(tmp_path)).acquire()  # another open file description: refused even in one process
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    # a holder that died (SIGKILL) leaves its file, unlocked: the next run takes it over and says whose it was
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday"}))
    with caplog.at_level("WARNING", logger="spo_jax.runlock"):
        lock = RunLock(str(tmp_path)).acquire()
    assert "took over the stale lock of pid 999999 on host gone (started yesterday)" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


# One command, run four times on one run directory (each refusal or stop message says "rerun the same command"):
# Ctrl-C before the first step, Ctrl-C during a save, a second trainer while the third run trains, Ctrl-C mid-run.
# The num_steps is never reached: every run is stopped, and the shared compile cache serves the later runs the
# programs the first compiled (the same command compiles the same programs; with the constant schedule the
# in-process resume and the `trained` fixture below use the same train step).
CHAIN_STEPS = 100_000

EARLY_HOOK = """
import os, signal, sys
from spo_jax import cli, train
make_train_step = train.make_train_step
def interrupt_then_build(*args, **kwargs):  # Ctrl-C after start-up, before the train step is compiled
    os.kill(os.getpid(), signal.SIGINT)
    assert train.STOP_REQUESTED.wait(30)
    return make_train_step(*args, **kwargs)
train.make_train_step = interrupt_then_build
cli.main(sys.argv)
"""

SAVE_HOOK = """
import os, signal, sys
from spo_jax import checkpoint, cli, train
save = checkpoint.Checkpointer.save
def save_and_interrupt(self, step, *args, **kwargs):
    if step == 5:  # Ctrl-C while the step-5 checkpoint is being written
        os.kill(os.getpid(), signal.SIGINT)
        assert train.STOP_REQUESTED.wait(30)
    return save(self, step, *args, **kwargs)
checkpoint.Checkpointer.save = save_and_interrupt
cli.main(sys.argv)
"""


def test_ctrl_c_before_the_first_step_during_a_save_and_mid_run_and_a_second_trainer(pairs, tmp_path, cache_env):
    """Ctrl-C (SIGINT) before the first step: exit 130, nothing trained; the same command again, Ctrl-C during
    the step-5 save: the save completes, a checkpoint after the next step, exit 130; again, and while it trains
    a second trainer on the run directory exits 2 naming the first (pid, host, start time) and writes nothing;
    then Ctrl-C mid-run: acknowledged at once, a checkpoint after the current step, exit 130; a last rerun
    resumes from it with one metrics record per step."""
    run_dir = tmp_path / "run"
    args = cli_args(run_dir, pairs, f"--config.train.num_steps={CHAIN_STEPS}", "--config.checkpoint.every=5",
                    "--config.checkpoint.async_save=True", "--config.optim.schedule=constant")
    ckpts = Checkpointer(str(run_dir / "checkpoints"))
    jsonl = run_dir / "metrics.jsonl"

    early = subprocess.run([sys.executable, "-c", EARLY_HOOK, *args[3:]], cwd=ROOT, env=cache_env,
                           capture_output=True, text=True, timeout=300)
    assert early.returncode == 130, early.stderr[-3000:]
    assert "SIGINT received: stopping after the current step" in early.stderr
    assert early.stderr.strip().splitlines()[-1] == ("stopped by SIGINT before the first step of this run; nothing "
                                                     "was trained; rerun the same command to start")
    assert ckpts.all_steps() == [] and not (jsonl.exists() and jsonl.read_text().strip())
    assert not (run_dir / LOCK_NAME).exists()

    saving = subprocess.run([sys.executable, "-c", SAVE_HOOK, *args[3:]], cwd=ROOT, env=cache_env,
                            capture_output=True, text=True, timeout=300)
    assert saving.returncode == 130, saving.stderr[-3000:]
    assert ckpts.all_steps() == [5, 6]  # the interrupted save is complete, and one more after the next step
    assert saving.stderr.strip().splitlines()[-1] == ("stopped by SIGINT after step 6 with a checkpoint there; "
                                                      "rerun the same command to resume")
    assert sorted(train_records(jsonl)) == list(range(1, 7)) and not (run_dir / LOCK_NAME).exists()

    first = start(args, env=cache_env)
    try:
        wait_for(lambda: (run_dir / LOCK_NAME).exists(), first)
        second = subprocess.run(cli_args(run_dir, pairs, "--config.optim.schedule=constant"), cwd=ROOT, env=cache_env, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"config error: config.run_dir='{run_dir}' is in use by another run: pid {first.pid} "
                               f"on host {socket.gethostname()} (started "), last
        assert "Traceback" not in second.stderr
        wait_for(lambda: len(jsonl.read_text().splitlines()) >= 9, first)  # resumed at 6: three more steps
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, err[-3000:]
    assert "SIGINT received: stopping after the current step" in err
    stopped = ckpts.latest_step()
    assert 9 <= stopped < CHAIN_STEPS
    assert err.strip().splitlines()[-1] == (f"stopped by SIGINT after step {stopped} with a checkpoint there; "
                                            "rerun the same command to resume")
    assert max(train_records(jsonl)) == stopped and not (run_dir / LOCK_NAME).exists()
    resumed = train.train(tiny_config(run_dir, pairs, train__num_steps=stopped + 2, optim__schedule="constant"))
    assert resumed.start_step == stopped
    assert_continuous(run_dir, stopped + 2)


def test_ctrl_c_during_a_compile_is_acknowledged_at_once_and_a_second_quits():
    # inside a long XLA compile (where Python runs no signal handler) the request is acknowledged at once,
    # and a second Ctrl-C quits at once
    proc = start([sys.executable, "-c", LONG_COMPILE])
    try:
        assert proc.stdout.readline().strip() == "compiling"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        ack = proc.stderr.readline()
        assert proc.poll() is None  # still compiling
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ack.startswith("SIGINT received: stopping after the current step")
    assert proc.returncode == 130 and "second Ctrl-C: quitting now" in err and "compiled" not in out


def test_sighup_stops_like_sigterm_with_exit_129():
    # a closed terminal or SSH session (SIGHUP) used to kill a run without a checkpoint: it now sets the same
    # stop request as Ctrl-C / SIGTERM (a checkpoint after the current step, the CLI's exit path) with 129
    proc = start([sys.executable, "-c", HANGUP])
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert err.startswith("SIGHUP received: stopping after the current step"), err
    assert proc.returncode == 0 and out.split() == ["stop", "requested", "129"], (out, err)


HANGUP = """
from spo_jax import cli, train
cli.install_stop_handlers()
print("ready", flush=True)
assert train.STOP_REQUESTED.wait(30)
print("stop requested", cli.EXIT_CODES[cli.STOP_EXIT[cli.STOPPED_BY[0]]], flush=True)
"""


LONG_COMPILE = """
import jax, jax.numpy as jnp
from spo_jax import cli
cli.install_stop_handlers()
def f(x):
    for i in range(1000):
        x = jnp.sin(x) * (i % 7 + 1) + jnp.cos(x[::-1])
    return x
lowered = jax.jit(f).lower(jnp.ones(64))
print("compiling", flush=True)
lowered.compile()  # XLA, seconds, without returning to Python
print("compiled", flush=True)
"""


# --------------------------------------------------------------------------- #
# Records read back
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("content, want", [
    ('{"method": {}}', r"lacks the key\(s\) \['result'\] \(it holds \['method'\]\)"),
    ('[1, 2]', r"lacks the key\(s\) \['method', 'result'\] \(it holds list\)"),
    ('{"method": ', "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON")])
def test_a_damaged_arm_record_is_named_with_the_fix(tmp_path, content, want):
    from spo_jax import experiment
    arm = tmp_path / "DPO" / "arm.json"
    arm.parent.mkdir()
    arm.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=rf"{arm} {want}.*recomputed by --resume"):
        experiment.compare([experiment.method("DPO")], make_config=None, train_data=None, measure=None,
                           out_dir=str(tmp_path), resume=True)


def test_a_grid_record_without_its_settings_is_one_line_exit_2(tmp_path, capsys):
    from spo_jax import experiment
    (tmp_path / "grid.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        experiment.main(["--out", str(tmp_path), "--resume", "--quick", "--compile-cache", "off"])
    assert e.value.code == 2
    assert f"{tmp_path / 'grid.json'} lacks the key(s) ['settings']" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Evaluating a trained run; refusals whose advice is followed
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    """A 10-step run with checkpoints at 5 and 10 and a final evaluation on the training pairs."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = train.train(tiny_config(run_dir, pairs, data__eval_path=pairs, optim__schedule="constant"))
    return run_dir, result.final_eval


def eval_config(run_dir, pairs, **overrides):
    return tiny_config(run_dir, "", stage="eval", data__eval_path=pairs, optim__schedule="constant", **overrides)


def test_stage_eval_on_a_run_restores_its_latest_or_a_named_checkpoint(trained, pairs):
    run_dir, final = trained
    assert final["loss"] < 0.69  # trained: not the initial model's ln 2
    config_json = (run_dir / "config.json").read_text()
    latest = train.train(eval_config(run_dir, pairs))
    assert latest.start_step == 10 and latest.final_eval == final  # the same parameters, the same numbers
    at5 = train.train(eval_config(run_dir, pairs, checkpoint__restore_step=5))
    assert at5.start_step == 5 and final["loss"] < at5.final_eval["loss"] < 0.69
    with pytest.raises(ConfigError, match=r"restore_step=7: .* its steps are \[5, 10\] \(0 = the latest\)"):
        train.train(eval_config(run_dir, pairs, checkpoint__restore_step=7))
    with pytest.raises(ConfigError, match="config.checkpoint.restore_step=5: names a checkpoint to evaluate"):
        train.train(tiny_config(run_dir, pairs, checkpoint__restore_step=5))
    # an evaluation is recorded in run_info.json; config.json stays the training run's (it reruns the run)
    assert (run_dir / "config.json").read_text() == config_json
    invocations = json.loads((run_dir / "run_info.json").read_text())["invocations"]
    assert invocations[0]["stage"] == "preference" and invocations[-1]["stage"] == "eval"
    assert "--config.stage=eval" in invocations[-1]["rerun"] or "called from Python" in invocations[-1]["rerun"]


def test_stage_eval_of_a_missing_run_refuses_and_its_advice_evaluates_the_model_saying_so(pairs, tmp_path, caplog):
    typo = tmp_path / "no_such_run"
    with pytest.raises(ConfigError, match=r"stage eval evaluates a training run's latest checkpoint, and .* does not "
                                          r"exist; point run_dir at a training run, or set checkpoint.resume=False"):
        train.train(eval_config(typo, pairs))
    assert not typo.exists()  # nothing written
    with caplog.at_level("WARNING", logger="spo_jax.train"):
        untrained = train.train(eval_config(typo, pairs, checkpoint__resume=False))
    assert "is also its own reference" in caplog.text
    assert untrained.final_eval["loss"] == pytest.approx(np.log(2), abs=1e-6)  # DPO at policy = reference


def test_resume_refusal_names_the_changed_fields_and_its_advice_leads_to_a_working_run(trained, pairs, tmp_path):
    import shutil
    run_dir = tmp_path / "run"  # a copy: this test continues the run
    shutil.copytree(trained[0], run_dir)
    with pytest.raises(ConfigError) as e:
        train.train(tiny_config(run_dir, pairs, data__batch_size=8, loss__name="ipo", optim__schedule="constant"))
    msg = str(e.value)
    assert "other settings: data.batch_size: 4 -> 8; loss.name: 'dpo' -> 'ipo'." in msg, msg
    assert json.loads((run_dir / "config.json").read_text())["data"]["batch_size"] == 4  # a refused resume: as it was
    assert "train.num_steps" in msg and "new run_dir" in msg and "data.eval_path" not in msg
    assert "checkpoint.resume=False" not in msg  # (that advice was refused in turn: a circle)
    fresh = train.train(tiny_config(tmp_path / "new", pairs, data__batch_size=8, loss__name="ipo", train__num_steps=2))
    assert fresh.start_step == 0 and len(fresh.history) == 2
    # a changed stage: the advice is to evaluate the run, which works (previous test)
    with pytest.raises(ConfigError, match=r"stage: 'preference' -> 'sft'.*to evaluate this run, add --config.stage=eval"):
        train.train(tiny_config(run_dir, write_sft(tmp_path / "sft.jsonl"), stage="sft", optim__schedule="constant",
                                reference__mode="none", data__batch_size=8))  # 8: splits over 8 devices too
    # checkpoint.resume=False on a run with checkpoints: its advice (resume=True, the same settings) continues it
    with pytest.raises(ConfigError, match="set checkpoint.resume=True to continue"):
        train.train(tiny_config(run_dir, pairs, data__eval_path=pairs, optim__schedule="constant",
                                checkpoint__resume=False))
    more = train.train(tiny_config(run_dir, pairs, data__eval_path=pairs, optim__schedule="constant",
                                   train__num_steps=11))
    assert more.start_step == 10 and more.history[0]["step"] == 11
    assert json.loads((run_dir / "config.json").read_text())["train"]["num_steps"] == 11  # the accepted resume's


# --------------------------------------------------------------------------- #
# Wrong-typed data fields
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("format, row, key, kind", [
    ("preference", {"prompt": "p", "chosen": {"text": "a", "score": 1}, "rejected": "b"}, "chosen", "dict"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": ["b", "c"]}, "rejected", "list"),
    ("preference", {"prompt": {"q": 1}, "chosen": "a", "rejected": "b"}, "prompt", "dict"),
    ("implicit_preference", {"chosen": ["a"], "rejected": "b"}, "chosen", "list"),
    ("prompt_completion", {"prompt": "p", "completion": {"text": "a"}}, "completion", "dict"),
    ("question_answer", {"question": "q", "answer": [{"role": "assistant", "content": "4"}]}, "answer", "list"),
])
def test_a_structured_value_where_text_is_expected_is_a_data_error_naming_file_line_and_key(
        tmp_path, format, row, key, kind):
    from spo_jax.data.loading import DataError, load_rows, standardize
    path = tmp_path / "rows.jsonl"
    good = {k: ("x" if not isinstance(v, str) else v) for k, v in row.items()}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    want = rf"{path}:2: '{key}' is a {kind} \(.*\), not text; format '{format}' takes a string here.*accepted by the " \
           r"formats \['preference', 'implicit_preference', 'prompt_completion', 'messages'\]"
    with pytest.raises(DataError, match=want):
        standardize(load_rows(str(path)), format=format, source=str(path))
    # the conversational form (a list of messages) stays accepted where the format takes it
    if format != "question_answer":
        msgs = dict(good, **{key: [{"role": "user" if key == "prompt" else "assistant", "content": "x"}]})
        assert "x" in standardized(msgs, format)[key if format != "implicit_preference" else "chosen"]


def standardized(row, format) -> dict:
    import datasets
    from spo_jax.data.loading import standardize
    from spo_jax.data.synthetic import build_tokenizer
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    ds, _ = standardize(datasets.Dataset.from_list([row]), format=format, tokenizer=tok)
    return ds[0]


# --------------------------------------------------------------------------- #
# Model files: damaged, unsupported, non-finite; data that does not fit the model
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from flax import nnx

    from spo_jax import models
    from tests.test_train import tiny_test
    path = tmp_path_factory.mktemp("model") / "good"
    models.save_pretrained(models.create_model(models.ModelConfig.from_hf(dict(tiny_test.TINY_LLAMA)),
                                               rngs=nnx.Rngs(0)), str(path))
    return path


def _damage(path, how):
    from safetensors.numpy import load_file, save_file
    weights, config = path / "model.safetensors", path / "config.json"
    if how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return rf"{weights} cannot be read \(SafetensorError: .*\): the file is damaged or incomplete"
    if how == "nan_weight":
        t = load_file(str(weights))
        t["model.layers.1.self_attn.q_proj.weight"][2, 3] = np.inf
        save_file(t, str(weights), metadata={"format": "pt"})
        return r"weight model.layers.1.self_attn.q_proj.weight holds 1 non-finite value\(s\)"
    if how == "no_config":
        config.unlink()
        return r"no config.json"
    if how == "truncated_config":
        config.write_text(config.read_text()[:20])
        return rf"{config} is not valid JSON"
    cfg = json.loads(config.read_text())
    if how == "phi_without_model_type":
        cfg.pop("model_type")
        cfg["architectures"] = ["PhiForCausalLM"]
        want = r"the model config has no model_type, and its architectures \['PhiForCausalLM'\] name no supported family"
    elif how in ("mixtral", "gemma"):
        cfg["model_type"] = how
        want = rf"unsupported model_type '{how}'; supported: llama, mistral, qwen2, qwen3, gpt2"
    config.write_text(json.dumps(cfg))
    return rf"{config}: {want}"


DAMAGES = ("truncated_weights", "nan_weight", "no_config", "truncated_config", "phi_without_model_type", "mixtral",
           "gemma")


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_or_unsupported_model_directory_is_a_model_error_naming_the_file(saved_model, tmp_path, how):
    import shutil

    from spo_jax import models
    path = tmp_path / how
    shutil.copytree(saved_model, path)
    want = _damage(path, how)
    with pytest.raises(models.ModelError, match=want):
        models.from_pretrained(str(path))


def test_a_config_without_model_type_loads_by_its_architecture(saved_model, tmp_path):
    import shutil

    from spo_jax import models
    shutil.copytree(saved_model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg.pop("model_type") == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert models.from_pretrained(str(tmp_path / "m")).config.model_type == "llama"


def test_cli_truncated_model_file_exits_4_in_one_line(saved_model, pairs, tmp_path):
    import shutil
    path = tmp_path / "model"
    shutil.copytree(saved_model, path)
    _damage(path, "truncated_weights")
    args = [sys.executable, "-m", "spo_jax.train", "--config=dpo", f"--config.run_dir={tmp_path / 'run'}",
            f"--config.data.train_path={pairs}", f"--config.model.path={path}", "--config.model.tokenizer=synthetic",
            "--config.data.max_length=32", "--config.data.min_prompt_length=4", "--config.data.batch_size=4"]
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"model error: {path}/model.safetensors cannot be read")
    assert "Traceback" not in proc.stderr


def test_token_ids_beyond_the_models_vocabulary_are_refused_naming_both_numbers(pairs, tmp_path):
    small = tiny_config(tmp_path / "run", pairs)
    small.model.config.vocab_size = 40  # the synthetic tokenizer's ids go past 40
    with pytest.raises(ConfigError, match=r"config.model.tokenizer='synthetic': data.train_path tokenizes to id \d+ "
                                          r"\(column \w+_ids\) but the model's vocab_size is 40"):
        train.train(small)


def test_a_truncated_reference_cache_is_recomputed_with_a_warning_naming_it(trained, pairs, caplog):
    run_dir, final = trained
    [cache] = (run_dir / "ref_cache").glob("*.npz")  # train and eval are the same pairs: one table
    whole = np.load(cache)["logps"]
    cache.write_bytes(cache.read_bytes()[:100])
    with caplog.at_level("WARNING", logger="spo_jax.reference"):
        again = train.train(eval_config(run_dir, pairs))
    assert f"the cache file {cache} is damaged (BadZipFile" in caplog.text
    assert again.final_eval == final  # the recomputed reference gives the same numbers
    np.testing.assert_array_equal(np.load(cache)["logps"], whole)  # rewritten whole


def test_a_lora_adapter_for_another_model_shape_is_a_model_error(tmp_path):
    from flax import nnx

    from spo_jax import models
    from spo_jax.models import lora
    from tests.test_train import tiny_test

    def tiny(**kw):
        return models.create_model(models.ModelConfig.from_hf(dict(tiny_test.TINY_LLAMA, **kw)), rngs=nnx.Rngs(0))

    wide = tiny(hidden_size=64, intermediate_size=128)
    lora.apply_lora(wide, lora.LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    lora.save_peft_adapter(wide, str(tmp_path / "adapter"))
    with pytest.raises(models.ModelError, match=r"adapter_model.safetensors: .* has lora_A \(4, 64\), lora_B .*; "
                                                r"expected \(4, 32\)"):
        lora.load_peft_adapter(tiny(), str(tmp_path / "adapter"))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(models.ModelError, match=rf"{weights} cannot be read"):
        lora.load_peft_adapter(tiny(), str(tmp_path / "adapter"))


# --------------------------------------------------------------------------- #
# Weak spots: tiny data, an eval file that keeps nothing, the JAX environment
# --------------------------------------------------------------------------- #


def test_an_eval_file_whose_rows_are_all_dropped_is_named_and_tiny_data_is_warned(pairs, tmp_path, caplog):
    from spo_jax.data import DataError
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Ben has 3 apples .", "chosen": " 3", "rejected": " 3"}) + "\n")
    one = tmp_path / "one.jsonl"
    one.write_text(open(pairs).readline())
    with caplog.at_level("WARNING", logger="spo_jax.train"), pytest.raises(DataError, match=rf"^{same}: no row survived"):
        train.train(tiny_config(tmp_path / "run", one, data__eval_path=str(same)))
    assert "data.train_path has 1 usable row(s), fewer than data.batch_size=4" in caplog.text


def test_a_jax_platform_this_machine_lacks_is_one_line_exit_2(pairs, tmp_path):
    proc = subprocess.run(cli_args(tmp_path / "run", pairs), cwd=ROOT, env=dict(ENV, JAX_PLATFORMS="nosuchplatform"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "config error: JAX cannot start a backend with the environment {'JAX_PLATFORMS': 'nosuchplatform'}")


def test_damaged_bytes_in_metrics_jsonl_are_dropped_on_resume_not_a_traceback(tmp_path):
    from spo_jax.metrics import trim_jsonl
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "split": "train", "loss": 0.5}) + "\n" for s in (1, 2, 3)]
    path.write_bytes(good[0].encode() + b"\xff\xfe\x00garbage\n" + good[1].encode() + good[2].encode()[:9])
    assert trim_jsonl(str(path), 2) == 2  # the damaged line and the torn last one
    assert path.read_text() == good[0] + good[1]


def test_a_run_dir_that_is_a_file_and_a_restore_step_without_resume_are_config_errors(pairs, tmp_path):
    from spo_jax import config as config_lib
    with pytest.raises(ConfigError, match=r"config.run_dir='.*pairs.jsonl': is a file, not a directory"):
        config_lib.validate_config(tiny_config(pairs, pairs))
    with pytest.raises(ConfigError, match=r"restore_step=3: .*checkpoint.resume=False restores none"):
        config_lib.validate_config(tiny_config(tmp_path, "", stage="eval", data__eval_path=pairs,
                                               checkpoint__restore_step=3, checkpoint__resume=False))
