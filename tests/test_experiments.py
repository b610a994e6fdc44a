"""spo_jax/configs/paper.py (``--config=paper:<arg>``): the SPO paper's grid of configs.

1. Every grid entry (``paper.grid()``: 3 models x 6 losses x {alone, +SPO} on GSM8K
   and UltraFeedback, plus the GSM8K SFT and evaluation stages; 114 entries) builds,
   and passes ``spo_jax.config.validate_config`` under each mesh preset on the device
   counts it is meant for (one 8-GPU host; TPU pod slices of 16/32/64 chips with 4/8/16
   hosts; 1 and 8 local devices), after its paths are pointed at files in tmp_path.
2. Two training steps with a tiny random checkpoint of the entry's family, written
   by transformers' PyTorch classes (``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` +
   ``save_pretrained``), for a subset of the grid. Running all 114 would take
   ~20 minutes on 2 CPU cores, and the entries differ only in values that
   validation already checks, so the subset is chosen to cover every code path the
   grid selects: every loss once (dpo, cpo, dpop, rdpo, simpo, alphadpo), both
   families with SPO on and off in each (qwen2: dpo+spo, rdpo+spo / cpo; llama:
   simpo+spo / dpop, alphadpo), both datasets (UltraFeedback's conversational rows
   through the chat template), all three GSM8K stages (sft with generation
   accuracy, preference, eval), reference modes cached and none, and the 8B entry's
   remat + gradient accumulation. Sizes, batch, steps and mesh are shrunk to fit
   CPU (mesh.data=-1 over CI's 8 simulated devices or 1).

Oracles: the grid's intended contents written out independently (the parse table
below), DPO's / DPO-Positive's closed form at the first step (policy = reference
-> loss = log 2, SPO penalty = 0), and the data layer's rendering of an
UltraFeedback row compared with the text written by hand.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from spo_jax import config as config_lib
from spo_jax import train
from spo_jax.configs import paper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAMES = ["Ben", "Tom", "Ana", "Mia"]


# --------------------------------------------------------------------------- #
# Parsing: the grid's intended contents
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("arg, want", [
    ("qwen2.5-0.5b,dpo,spo,gsm8k", dict(stage="preference", loss="dpo", spo=True, path_end="gsm8k/sft/hf_final",
                                       ref="cached", data_end="gsm8k/pairs.jsonl", fsdp=-1, data=1, coord="")),
    ("llama-3-8b,simpo,nospo,ultrafeedback,tpu", dict(stage="preference", loss="simpo", spo=False,
                                                      path="meta-llama/Meta-Llama-3-8B", ref="none",
                                                      data="HuggingFaceH4/ultrafeedback_binarized", fsdp=-1,
                                                      coord="auto", remat=True, accum=4)),
    ("llama-3-8b,simpo,spo,ultrafeedback", dict(stage="preference", loss="simpo", spo=True, ref="cached")),
    ("llama-3.2-1b,sft,nospo,gsm8k", dict(stage="sft", loss="sft", spo=False, path="meta-llama/Llama-3.2-1B",
                                         ref="none", data_end="gsm8k/train.jsonl")),
    ("qwen2.5-0.5b,cpo,spo,gsm8k,eval,local", dict(stage="eval", loss="sft", spo=False, ref="none",
                                                   path_end="gsm8k/cpo+spo/hf_final", data=-1, fsdp=1)),
])
def test_parse_sets_the_intended_fields(arg, want):
    c = paper.get_config(arg)
    assert c.stage == want["stage"]
    assert c.loss.name == want["loss"]
    assert c.spo.enabled is want["spo"]
    assert c.reference.mode == want["ref"]
    if "path" in want:
        assert c.model.path == want["path"]
    if "path_end" in want:
        assert c.model.path.endswith(want["path_end"])
    if "data" in want and isinstance(want["data"], str):
        assert c.data.train_path == want["data"]
    if "data_end" in want:
        assert c.data.train_path.endswith(want["data_end"])
    if isinstance(want.get("data"), int):
        assert c.mesh.data == want["data"]
    if "fsdp" in want:
        assert c.mesh.fsdp == want["fsdp"]
    if "coord" in want:
        assert c.distributed.coordinator_address == want["coord"]
    if "remat" in want:
        assert c.model.remat is want["remat"]
    if "accum" in want:
        assert c.optim.grad_accum_steps == want["accum"]
    if c.spo.enabled:
        assert (c.spo.solver, c.spo.value, c.spo.gamma) == ("penalty", "reference", 10.0)


def test_hyperparameters_follow_the_loss_table_and_reach_the_loss():
    want = {"dpo": {"beta": 0.1}, "cpo": {"beta": 0.1, "lam": 1.0}, "dpop": {"beta": 0.1, "lam": 50.0},
            "rdpo": {"beta": 0.1, "alpha": 0.01}, "simpo": {"beta": 2.0, "gamma": 1.0},
            "alphadpo": {"beta": 2.0, "gamma": 1.0, "alpha": 0.1}}
    assert set(paper.LOSSES) == set(want)
    for loss, hp in want.items():
        c = paper.get_config(f"llama-3.2-1b,{loss},nospo,gsm8k")
        assert dict(c.loss.hparams) == hp


def test_grid_size_and_order():
    entries = list(paper.grid())
    assert len(entries) == len(set(entries)) == 3 * (1 + 1 + 12 + 12 + 12)
    pref = list(paper.grid(stages=("preference",)))
    assert len(pref) == 72  # 3 models x 6 losses x {alone, +SPO} x 2 datasets
    # the pipeline order: a model's GSM8K SFT precedes its preference runs, which precede their evals
    first = entries[:26]
    assert first[0] == "qwen2.5-0.5b,sft,nospo,gsm8k,sft"
    assert first.index("qwen2.5-0.5b,dpo,spo,gsm8k,preference") < first.index("qwen2.5-0.5b,dpo,spo,gsm8k,eval")


def test_each_stage_reads_what_the_previous_stage_writes():
    """GSM8K: preference starts from the SFT run's export and trains on the pairs file next
    to it; eval scores the export of the run with the same model / loss / SPO setting."""
    for arg in paper.grid(stages=("preference", "eval")):
        p, c = paper.parse(arg), paper.get_config(arg)
        if p["dataset"] != "gsm8k":
            assert c.model.path == paper.MODELS[p["model"]]["hub"]
            continue
        if p["stage"] == "preference":
            sft = paper.get_config(f"{p['model']},sft,nospo,gsm8k")
            assert c.model.path == os.path.join(sft.run_dir, "hf_final") and sft.checkpoint.export_hf
            assert c.data.train_path == os.path.join(os.path.dirname(sft.run_dir), "pairs.jsonl")
        else:
            up = paper.get_config(arg.rsplit(",", 1)[0] + (",sft" if p["loss"] == "sft" else ",preference"))
            assert c.model.path == os.path.join(up.run_dir, "hf_final") and up.checkpoint.export_hf
            assert c.run_dir != up.run_dir


def test_cli_flags_parse_the_argument_and_overrides():
    """What ``python -m spo_jax.train --config=paper:<arg> --config.x=y`` does (the preset name resolved
    as spo_jax.cli does)."""
    from absl import flags
    from ml_collections import config_flags

    from spo_jax import configs
    argv = ["prog", "--config=" + configs.resolve("paper:llama-3-8b,simpo,spo,ultrafeedback,tpu"),
            "--config.model.path=/ckpt/sft", "--config.train.num_steps=20", "--config.spo.gamma=5"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    c = fv.config
    assert (c.model.path, c.loss.name, c.spo.enabled, c.spo.gamma) == ("/ckpt/sft", "simpo", True, 5.0)
    assert (c.train.num_steps, c.optim.warmup_steps) == (20, 2)
    assert (c.mesh.fsdp, c.distributed.coordinator_address) == (-1, "auto")


def test_warmup_follows_num_steps_override():
    c = paper.get_config("qwen2.5-0.5b,dpo,nospo,ultrafeedback")
    assert c.train.num_steps == math.ceil(61135 / 128)
    assert c.optim.warmup_steps == c.train.num_steps // 10
    c.train.num_steps = 2
    assert c.optim.warmup_steps == 0


@pytest.mark.parametrize("arg, field", [
    ("qwen2.5-0.5b,dpo,spo", "expected 4 to 6"),
    ("gpt2,dpo,spo,gsm8k", "model 'gpt2'"),
    ("qwen2.5-0.5b,kto,spo,gsm8k", "loss 'kto'"),
    ("qwen2.5-0.5b,dpo,yes,gsm8k", "field 3"),
    ("qwen2.5-0.5b,dpo,spo,hh", "dataset 'hh'"),
    ("qwen2.5-0.5b,dpo,spo,ultrafeedback,eval", "not part of the ultrafeedback pipeline"),
    ("qwen2.5-0.5b,dpo,spo,gsm8k,sft", "LOSS=sft"),
    ("qwen2.5-0.5b,sft,spo,gsm8k", "'nospo'"),
    ("qwen2.5-0.5b,dpo,spo,gsm8k,tpu,gpu", "neither a stage"),
])
def test_bad_arguments_name_the_field(arg, field):
    with pytest.raises(paper.GridError, match=field.replace("(", r"\(").replace(")", r"\)")):
        paper.get_config(arg)


def test_list_prints_the_grid(capsys):
    paper.main(["--list", "--stage", "preference", "--model", "llama-3-8b", "--mesh", "tpu"])
    lines = capsys.readouterr().out.split()
    assert len(lines) == 24 and all(x.startswith("llama-3-8b,") and x.endswith(",preference,tpu") for x in lines)


def test_paper_table2_is_whole_and_matches_the_readme():
    """PAPER_TABLE2 holds all 13 methods x 3 models x (WR, LC, GSM8K) of the paper's Table 2, and the
    README's copy of the table (parsed from its markdown) agrees cell by cell."""
    methods = {"sft"} | {loss + s for loss in paper.LOSSES for s in ("", "+spo")}
    assert set(paper.PAPER_TABLE2) == {(m, x) for m in paper.MODELS for x in methods}
    for cells in paper.PAPER_TABLE2.values():
        assert set(cells) == set(paper.PAPER_TABLE2_METRICS) and all(0 <= v <= 100 for v in cells.values())
    # spot checks written out from the paper (not from the dict)
    assert paper.PAPER_TABLE2[("qwen2.5-0.5b", "dpo")] == {"alpacaeval2_wr": 4.2, "alpacaeval2_lc": 4.6, "gsm8k": 35.2}
    assert paper.PAPER_TABLE2[("llama-3-8b", "alphadpo+spo")]["alpacaeval2_lc"] == 26.6
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    head = "| Method | Qwen-2.5-0.5B | LLaMA-3.2-1B | LLaMA-3-8B |"
    assert head in readme and "AlpacaEval 2" in readme and "length-controlled" in readme
    rows = readme[readme.index(head):].split("\n")[2:]
    rows = rows[:next(i for i, r in enumerate(rows) if not r.startswith("|"))]
    spelled = {"rdpo": "RDPO", "simpo": "SimPO", "alphadpo": "AlphaDPO"}
    name = {m: "+".join(spelled.get(p, p.upper()) for p in m.replace("+spo", "+SPO").split("+")) for m in methods}
    parsed = {}
    for r in rows:
        label, *cols = [c.strip() for c in r.strip("|").split("|")]
        for model, col in zip(paper.MODELS, cols):
            parsed[(label, model)] = tuple(float(v) for v in col.split("/"))
    assert len(parsed) == len(paper.PAPER_TABLE2)
    for (model, method), cells in paper.PAPER_TABLE2.items():
        assert parsed[(name[method], model)] == tuple(cells[k] for k in paper.PAPER_TABLE2_METRICS), (model, method)


# --------------------------------------------------------------------------- #
# Validation of every entry
# --------------------------------------------------------------------------- #


def _gsm8k_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        a, b = int(rng.integers(2, 30)), int(rng.integers(1, 9))
        yield a, b, {"question": f"{NAMES[i % 4]} has {a} apples . He gets {b} more . How many ?",
                     "answer": f"{a} + {b} = {a + b} . #### {a + b}"}


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _pair_rows(n, seed=0):
    rows = []
    for a, b, qa in _gsm8k_rows(n, seed):
        wrong = a + b + 1 + (a % 3)
        rows.append({"prompt": f"Question: {qa['question']}\nAnswer:", "chosen": " " + qa["answer"],
                     "rejected": f" {a} + {b} = {wrong} . #### {wrong}"})
    return rows


def _uf_rows(n, seed=0):
    """Rows in HuggingFaceH4/ultrafeedback_binarized's layout: prompt text, and chosen /
    rejected as whole conversations (the user turn, then the assistant's answer)."""
    rows = []
    for i, (a, b, qa) in enumerate(_gsm8k_rows(n, seed)):
        user = {"role": "user", "content": qa["question"]}
        rows.append({"prompt": qa["question"], "prompt_id": str(i),
                     "chosen": [user, {"role": "assistant", "content": qa["answer"]}],
                     "rejected": [user, {"role": "assistant", "content": f"{a} + {b} = {a * b} . #### {a * b}"}],
                     "messages": [user, {"role": "assistant", "content": qa["answer"]}],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """$SPO_JAX_DATA and $SPO_JAX_RUNS in tmp_path, with every file the grid reads."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    monkeypatch.setenv("SPO_JAX_DATA", str(data))
    monkeypatch.setenv("SPO_JAX_RUNS", str(runs))
    qa = [r for _, _, r in _gsm8k_rows(16)]
    _write_jsonl(data / "gsm8k" / "train.jsonl", qa)
    _write_jsonl(data / "gsm8k" / "test.jsonl", [r for _, _, r in _gsm8k_rows(8, seed=5)])
    uf = _write_jsonl(tmp_path / "uf.jsonl", _uf_rows(16))
    for model in paper.MODELS:
        _write_jsonl(runs / model / "gsm8k" / "pairs.jsonl", _pair_rows(16))
    return dict(data=data, runs=runs, uf=uf)


def _point_uf_at(c, uf):
    """The Hub dataset is unreachable in tests: the local file in its layout stands in."""
    if c.data.train_path == "HuggingFaceH4/ultrafeedback_binarized":
        c.data.train_path, c.data.train_split = uf, "train"
        c.data.eval_path, c.data.eval_split = uf, "train"


def _make_model_dirs(runs, target):
    """The hf_final directories the grid's preference / eval stages start from."""
    for arg in paper.grid(stages=("preference", "eval")):
        c = paper.get_config(arg)
        if c.model.path.startswith(str(runs)) and not os.path.exists(c.model.path):
            os.makedirs(os.path.dirname(c.model.path), exist_ok=True)
            os.symlink(target, c.model.path)


@pytest.mark.parametrize("mesh, devices_processes", [
    ("gpu", [(8, 1), (1, 1)]),
    ("tpu", [(16, 4), (32, 8), (64, 16)]),
    ("local", [(8, 1), (1, 1)]),
])
def test_every_grid_entry_validates(layout, tmp_path, mesh, devices_processes):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _make_model_dirs(layout["runs"], str(ckpt))
    entries = list(paper.grid())
    assert len(entries) == 114
    for arg in entries:
        c = paper.get_config(f"{arg},{mesh}")
        _point_uf_at(c, layout["uf"])
        for n, procs in devices_processes:
            try:
                config_lib.validate_config(c, num_devices=n, process_count=procs)
            except config_lib.ConfigError as e:
                raise AssertionError(f"{arg},{mesh} on {n} devices / {procs} processes: {e}") from None


def test_default_data_root_is_the_shared_gsm8k(monkeypatch):
    """Without $SPO_JAX_DATA the data root is ../shared/data next to the repository."""
    monkeypatch.delenv("SPO_JAX_DATA", raising=False)
    c = paper.get_config("qwen2.5-0.5b,sft,nospo,gsm8k")
    assert c.data.train_path == os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "gsm8k", "train.jsonl"))
    assert c.data.eval_path.endswith(os.path.join("gsm8k", "test.jsonl"))


def test_sft_stage_reads_the_real_gsm8k(shared_data_dir, monkeypatch):
    """With the real data folder ($SPO_JAX_DATA, as CI provides it) the SFT stage validates."""
    monkeypatch.setenv("SPO_JAX_DATA", str(shared_data_dir))
    c = paper.get_config("qwen2.5-0.5b,sft,nospo,gsm8k")
    assert c.data.train_path == str(shared_data_dir / "gsm8k" / "train.jsonl")
    with open(c.data.train_path) as f:
        assert set(json.loads(f.readline())) == {"question", "answer"}
    config_lib.validate_config(c, num_devices=8, process_count=1)


def test_missing_sft_checkpoint_is_a_clear_error(layout):
    c = paper.get_config("qwen2.5-0.5b,dpo,spo,gsm8k")
    with pytest.raises(config_lib.ConfigError, match=r"model\.path.*no such file"):
        config_lib.validate_config(c, num_devices=1, process_count=1)


def test_ultrafeedback_rows_render_the_user_turn_once():
    """H4's layout repeats the user turn inside chosen/rejected; the grid's format must
    take the prompt from the shared leading messages, not prepend the prompt again."""
    import datasets
    from spo_jax.data import loading, synthetic
    tok = synthetic.build_tokenizer()
    c = paper.get_config("qwen2.5-0.5b,dpo,nospo,ultrafeedback")
    row = _uf_rows(1)[0]
    ds, _ = loading.standardize(datasets.Dataset.from_list([row]), format=c.data.format, tokenizer=tok,
                                use_chat_template=c.data.use_chat_template)
    got = ds[0]
    assert got["prompt"] == f"<s>Question: {row['prompt']}\nAnswer:"
    assert got["chosen"] == f" {row['chosen'][1]['content']}</s>"
    assert got["rejected"] == f" {row['rejected'][1]['content']}</s>"


# --------------------------------------------------------------------------- #
# Two steps with a tiny checkpoint of the same family
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> directory with a tiny random HF checkpoint (PyTorch, save_pretrained) and
    the synthetic task's tokenizer."""
    import torch
    import transformers
    from spo_jax.data import synthetic
    tok = synthetic.build_tokenizer(model_max_length=64)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kinds = {
        # Qwen2.5-0.5B: q/k/v biases, tied embeddings
        "qwen2": (transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6),
                  transformers.Qwen2ForCausalLM),
        # Llama-3: rope theta 5e5, untied (8B) embeddings
        "llama": (transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=5e5),
                  transformers.LlamaForCausalLM),
    }
    out = {}
    for family, (cfg, cls) in kinds.items():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        cls(cfg).save_pretrained(str(d))
        tok.save_pretrained(str(d))
        out[family] = str(d)
    return out


def _shrink(c, ckpt):
    """CPU sizes: T <= 48, 8 pairs (or SFT rows) per micro-batch, 2 steps, data-parallel mesh."""
    c.model.path = ckpt
    c.model.tokenizer = ""
    c.data.max_length = 48
    c.data.min_prompt_length = 8
    c.data.length_bucket = 48  # one padded length: one compile per step function
    c.data.batch_size = 8 * c.optim.grad_accum_steps
    c.data.eval_batch_size = 8
    c.train.num_steps = 2
    c.logprobs.seq_chunk = 16
    c.logprobs.vocab_chunk = 48  # 128 = 48 + 48 + 32: chunking with a ragged last chunk
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.distributed.coordinator_address = ""
    c.checkpoint.every = 0
    c.checkpoint.async_save = False
    c.checkpoint.export_hf = False
    c.eval.num_prompts = 4
    c.eval.max_new_tokens = 8
    c.metrics.tensorboard = False
    c.metrics.progress_bar = False
    c.metrics.peak_tflops = 1.0


RUNS = [
    "qwen2.5-0.5b,sft,nospo,gsm8k",
    "qwen2.5-0.5b,dpo,spo,gsm8k",
    "qwen2.5-0.5b,rdpo,spo,gsm8k",
    "qwen2.5-0.5b,cpo,nospo,ultrafeedback",
    "llama-3.2-1b,dpop,nospo,gsm8k",
    "llama-3.2-1b,alphadpo,nospo,ultrafeedback",
    "llama-3-8b,simpo,spo,ultrafeedback",
    "llama-3.2-1b,sft,nospo,gsm8k,eval",
]


def test_runs_cover_every_loss_family_and_spo_setting():
    parsed = [paper.parse(a) for a in RUNS]
    assert {p["loss"] for p in parsed} == set(paper.LOSSES) | {"sft"}
    combos = {(paper.MODELS[p["model"]]["family"], p["spo"]) for p in parsed if p["stage"] == "preference"}
    assert combos == {("qwen2", True), ("qwen2", False), ("llama", True), ("llama", False)}
    assert {p["stage"] for p in parsed} == {"sft", "preference", "eval"}
    assert {p["dataset"] for p in parsed} == set(paper.DATASETS)


@pytest.mark.parametrize("arg", RUNS)
def test_two_steps_with_a_tiny_checkpoint_of_the_family(arg, layout, checkpoints, tmp_path):
    p = paper.parse(arg)
    family = paper.MODELS[p["model"]]["family"]
    ckpt = checkpoints[family]
    with open(os.path.join(ckpt, "config.json")) as f:
        assert json.load(f)["model_type"] == family
    c = paper.get_config(arg)
    _point_uf_at(c, layout["uf"])
    _shrink(c, ckpt)
    assert c.optim.warmup_steps == 0
    result = train.train(c)

    if p["stage"] in ("eval", "sft") and c.eval.generation:
        # GSM8K accuracy of greedy answers: 4 prompts; the decoded answers are kept for inspection
        ev = result.final_eval
        assert ev["gen/num_prompts"] == 4 and 0.0 <= ev["gen/accuracy"] <= 1.0
    if p["stage"] == "eval":
        ev = result.final_eval
        assert ev["num_seqs"] == 8 and np.isfinite(ev["loss"])
        return
    steps = [h for h in result.history if h["split"] == "train"]
    assert [h["step"] for h in steps] == [1, 2]
    for h in steps:
        assert np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0
    if p["loss"] in ("dpo", "dpop"):
        # policy = reference at the first step: Δ = 0 -> −log σ(0) = log 2 (DPOP's penalty and
        # SPO's relu(q) are 0 there too)
        assert abs(steps[0]["loss"] - math.log(2.0)) < 5e-3, steps[0]["loss"]
    if p["spo"]:
        assert "spo/penalty" in steps[0] and abs(steps[0]["spo/penalty"]) < 5e-3
    if p["stage"] == "sft":
        assert result.final_eval["num_seqs"] == 8 and np.isfinite(result.final_eval["loss"])


def test_default_experiment_runs_two_steps_through_the_cli(checkpoints, tmp_path):
    """The ``dpo`` preset (the README's training command, ``--config=dpo``) with a tiny Llama checkpoint."""
    import subprocess

    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _pair_rows(16))
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "spo_jax.train", "--config=dpo",
            f"--config.run_dir={run_dir}", f"--config.model.path={checkpoints['llama']}",
            f"--config.data.train_path={pairs}", "--config.train.num_steps=2", "--config.data.batch_size=8",
            "--config.data.max_length=48", "--config.data.min_prompt_length=8", "--config.model.dtype=float32",
            "--config.spo.enabled=True", "--config.spo.gamma=10", "--config.optim.warmup_steps=0",
            "--config.metrics.progress_bar=False", "--config.checkpoint.async_save=False"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f if '"train"' in line]
    assert [s["step"] for s in steps] == [1, 2]
    # DPO at the reference: loss log 2; the SPO penalty is 0 there
    assert abs(steps[0]["loss"] - math.log(2.0)) < 5e-3 and abs(steps[0]["spo/penalty"]) < 5e-3
    assert os.path.isfile(run_dir / "hf_final" / "config.json")  # the exported policy
