"""``spo_jax.plan``: the run's programs compiled for other devices, no weights, no data.

The oracle for the numbers is XLA itself (the compiled program's ``memory_analysis`` and HLO); the
scaling tests fail on the code before the weights were gathered where used (the MLP activations and the
logits were all-gathered over the batch for the weight gradients: per-device temporaries 1632 -> 921 MiB
from 2 to 8 devices on a 2-layer Qwen-shaped model, now 1273 -> 431; on this file's tiny model with that
code reverted: 2804640 -> 1664416 bytes, ratio 0.59, the test fails).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import jax
import pytest

from spo_jax import config as config_lib
from spo_jax import plan
from tests.test_sharding import ROOT, run_with_8_devices

# the smallest model where the properties hold with margin (compiles dominate this file's time)
TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
PAIRS, LENGTH = 8, 24  # 16 sequences of 24 tokens: no weight or mask has leading dimensions (16, 24)


def tiny_config(**overrides):
    c = config_lib.get_default_config()
    c.model.config = dict(TINY)
    c.model.tokenizer = "synthetic"
    c.model.dtype = "float32"
    c.run_dir = "/tmp/unused"
    c.data.train_path = "pairs.jsonl"  # planning never reads it
    c.data.batch_size = PAIRS
    c.data.max_length = LENGTH
    c.reference.mode = "cached"
    c.mesh.data, c.mesh.fsdp = 1, -1
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return plan.planning_config(c, dict(TINY))


def _global_batch_arrays(hlo: str) -> list[str]:
    """Shapes in a partitioned program whose leading dims are the *global* batch (sequences x length)."""
    return sorted(set(re.findall(rf"\w+\[{2 * PAIRS},{LENGTH}(?:,\d+)*\]", hlo)))


def check_cpu_scaling():
    c = tiny_config()
    small = plan.plan(c, jax.devices()[:2], programs=("train_step",))
    large = plan.plan(c, jax.devices()[:8], programs=("train_step",))
    t2, t8 = small["programs"]["train_step"]["temp_bytes"], large["programs"]["train_step"]["temp_bytes"]
    assert t8 <= 0.5 * t2, (t2, t8)
    # nothing activation-sized is gathered whole over the batch (the shapes are per device after partitioning)
    assert _global_batch_arrays(large["executables"]["train_step"].as_text()) == []


def test_per_device_temporaries_fall_from_2_to_8_cpu_devices():
    run_with_8_devices(__name__, "check_cpu_scaling")


def test_search_on_the_cpu():
    c = tiny_config()
    rows = plan.search(c, jax.devices()[:1], limit=2, log=lambda s: None)
    assert len(rows) == 2 and all(r["fits"] for r in rows)
    # no remat first (fewest micro-batches, no remat), then remat: it saves memory, and costs FLOPs
    plain, remat = sorted(rows, key=lambda r: r["flags"]["model.remat"])
    assert remat["flags"]["model.remat"] and remat["temp_bytes"] < plain["temp_bytes"]
    assert rows[0] is plain  # faster (fewer FLOPs) and fits
    assert "--config.mesh.fsdp=1" in plan.flags_text(rows[0]["flags"])


_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.skipif(not _LIBTPU, reason="libtpu not installed (pip install libtpu): no TPU compiler")
def test_tpu_compile_matches_xla_and_scales():
    c = tiny_config(**{"model.dtype": "bfloat16"})
    small = plan.plan(c, plan.topology_devices("v5e:2x2"), programs=("train_step",))
    devices = plan.topology_devices("v5e:4x4")
    large = plan.plan(c, devices, programs=("train_step",))
    r = large["programs"]["train_step"]
    assert r["fits"] and r["capacity_bytes"] == 16 * plan.GiB and r["flops"] > 0 and r["estimated_step_s"] > 0
    # a model this small has fixed-size TPU temporaries; the parameters and optimiser state fall with the
    # chips, and nothing is gathered over the batch
    assert r["argument_bytes"] <= 0.5 * small["programs"]["train_step"]["argument_bytes"]
    assert _global_batch_arrays(large["executables"]["train_step"].as_text()) == []
    # the report is the compiled program's own memory analysis
    mem = large["executables"]["train_step"].memory_analysis()
    assert (r["argument_bytes"], r["temp_bytes"], r["output_bytes"]) == (
        mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes)


def test_bad_topology_is_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from tests.test_plan import tiny_config\n\ndef get_config():\n    return tiny_config()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "spo_jax.plan", f"--config={cfg}", "--topology=v9z:4"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "v5e:4x4" in errors[0] and "Traceback" not in proc.stderr


def test_trainer_preflight_stops_in_seconds_with_flags_that_fit(tmp_path, monkeypatch):
    from spo_jax import train
    from tests.test_train import tiny_config as train_config
    from tests.test_train import write_pairs

    # a batch that more micro-batches can still split over every device (CI runs with 8 CPU devices)
    # (one layer: half of each of the step's compiles, the search's included)
    c = train_config(tmp_path / "run", write_pairs(tmp_path / "pairs.jsonl"), data__batch_size=2 * jax.device_count(),
                     model__config__num_hidden_layers=1)
    assert plan.preflight(c) is None  # a tiny model, far below the host's memory: not compiled
    need = plan.plan(plan.planning_config(c, dict(c.model.config)), jax.devices(),
                     programs=("train_step",))["programs"]["train_step"]["peak_bytes"]
    # a host whose free memory is a little under what the step needs: refused before any data work, with
    # flags that fit in that memory (remat or more micro-batches need less)
    monkeypatch.setattr(plan, "host_free_bytes", lambda: int(0.95 * need) * jax.device_count())
    monkeypatch.setattr(train, "_Loop", None)  # reaching the loop would be a failure of the pre-flight
    with pytest.raises(config_lib.ConfigError, match=r"needs .* per device .* flags that fit: --config\."):
        train.train(c)
    c.preflight = "warn"
    assert plan.preflight(c)["programs"]["train_step"]["fits"] is False  # logged, not raised


def test_a_compile_refused_for_hbm_is_a_result_not_a_traceback():
    # libtpu 0.0.52's message for a 2-layer, hidden-1024 model at 256 pairs x 2048 tokens on v5e:2x2
    text = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory required for "
            "HLO temporaries (25.10G) exceeds available HBM (15.75G). HLO module: jit_traced.")

    class Refused:
        def lower(self, *args):
            raise RuntimeError(text)

    exe, r = plan.compile_program(Refused(), (), 16 * plan.GiB)
    assert exe is None and r["fits"] is False
    assert r["temp_bytes"] == int(25.10 * plan.GiB) and r["compiler_limit_bytes"] == int(15.75 * plan.GiB)
    assert "temporaries 25.10 GiB of 15.75 GiB" in plan.format_report(
        {"devices": 4, "topology": "v5e:2x2", "mesh": {}, "capacity_source": "", "programs": {"train_step": r}})


def test_sampling_programs_are_the_largest_that_generate_runs(monkeypatch, tmp_path):
    """With ``eval.generation`` the plan compiles the sampling programs; the oracle: the shapes of the prefill
    and of the largest decode chunk that ``models.generate`` itself runs on prompts of ``data.max_length``
    tokens with ``eval.max_new_tokens`` (the cache grows past its first bucket: 24 + 48 -> 96 slots)."""
    import numpy as np
    from flax import nnx

    from spo_jax import models
    from spo_jax.models import generation as gen

    B, new = 4, 48
    c = tiny_config(**{"eval.generation": True, "data.eval_batch_size": B, "eval.num_prompts": 8,
                       "eval.max_new_tokens": new})
    c.data.eval_path = str(tmp_path / "eval.jsonl")  # planning never reads it (the config check wants a file)
    (tmp_path / "eval.jsonl").write_text("{}\n")
    rep = plan.plan(c, jax.devices()[:1], programs=("sampling",))
    assert set(rep["programs"]) == {"sample_prefill", "sample_decode"}
    assert all(r["fits"] and r["argument_bytes"] > 0 for r in rep["programs"].values())
    policy, state, *_ = plan.abstract_state(c, plan.make_mesh(c, jax.devices()[:1]))
    planned = plan.sampling_programs(c, policy, state)

    calls = {"prefill": [], "decode": []}
    prefill, decode = gen._prefill_jit, gen._decode_jit

    def record(name, fn):
        def wrapped(*args):
            calls[name].append(jax.tree.map(lambda x: getattr(x, "shape", x), args[2:]))
            return fn(*args)
        return wrapped

    monkeypatch.setattr(gen, "_prefill_jit", record("prefill", prefill))
    monkeypatch.setattr(gen, "_decode_jit", record("decode", decode))
    model = models.create_model(models.ModelConfig.from_hf(dict(TINY)), rngs=nnx.Rngs(0))
    ids = np.arange(B * LENGTH).reshape(B, LENGTH) % (TINY["vocab_size"] - 1) + 1
    toks, _ = models.generate(model, ids, np.ones_like(ids), max_new_tokens=new, eos_id=())
    assert toks.shape == (B, new)
    shape = lambda args: jax.tree.map(lambda x: getattr(x, "shape", x), args)  # noqa: E731
    assert calls["prefill"] == [shape(planned["sample_prefill"][1][2:])]
    largest = max(calls["decode"], key=lambda a: a[0][0][0][-1])  # by the cache's slots
    want = shape(planned["sample_decode"][1][2:])
    assert largest[0] == want[0] and largest[0][0][0] == (B, 2, 8, 96)  # the cache: [rows, KV, hd, slots]
    assert [a for a in largest[1:7]] == [w for w in want[1:7]]  # mask, logits, positions, done, key, rows
