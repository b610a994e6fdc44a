"""experiments/smollm2.py end to end at its smoke size: a tiny random Llama (transformers' PyTorch
class + ``save_pretrained``) with SmolLM2's tokenizer (from its GGUF file) and chat template, on
the real HH-RLHF and GSM8K files -- the experiment's code path in seconds (SmolLM2's 30 layers
alone take minutes to compile on a CPU).

A random model's samples are never correct, so part 2 trains on a pairs file written here from
the task's own solutions (chosen: the solution; rejected: the same with a
wrong result), through the script's ``--task-pairs`` path; two methods (DPO+SPO, and SFT-mix with its
SFT data), one step each per part.
The checks are on what the script reports: sizes of the per-item vectors, intervals around their
means, violation fractions that agree with the per-pair flags, the held-out preference accuracy
equal to the mean of its per-pair flags, and a DPO step's training margin gain.
"""

import json
import math
import os
import subprocess
import sys

from tests.helpers import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
try:
    import smollm2 as exp
finally:
    sys.path.pop(0)


def test_arithmetic_task_and_hh_split_are_disjoint_and_stated(shared_data_dir):
    train, test = exp.arithmetic_rows(50, 40, seed=0)
    assert {r["question"] for r in train}.isdisjoint(r["question"] for r in test)
    assert all(r["question"].endswith(exp.TASK_SUFFIX) and " ." not in r["question"] for r in train + test)
    # the probe's problems are the first ones of the experiment's held-out split
    assert exp.probe_rows("arith1", 10, str(shared_data_dir), seed=0) == test[:10]
    tr, ho = exp.hh_split(str(shared_data_dir), 30, 20, seed=0)
    assert len(tr) == 30 and len(ho) == 20 and {r["hh_index"] for r in tr}.isdisjoint(r["hh_index"] for r in ho)
    assert all(r["prompt"].rstrip().endswith("Assistant:") for r in tr + ho)


def test_smollm2_experiment_smoke(shared_data_dir, smollm2_gguf, tmp_path):
    import torch
    import transformers
    from spo_jax import models, sampling

    tok = models.load_tokenizer(smollm2_gguf)
    ckpt = tmp_path / "tiny"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(str(ckpt))
    tok.save_pretrained(str(ckpt))
    _, test = exp.arithmetic_rows(exp.SIZES["smoke"].task_train, 4, seed=0)
    prompts = sampling.render_prompts(tok, test, use_chat_template=True)
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for prompt, row in zip(prompts, test):
            body, answer = row["answer"].split("####")
            f.write(json.dumps({"prompt": prompt, "chosen": row["answer"],
                                "rejected": f"{body}#### {int(answer) + 1}"}) + "\n")
    out = tmp_path / "out"
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # one CPU device (the script refuses simulated ones)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "smollm2.py"), "--size", "smoke",
                           "--out", str(out), "--model", str(ckpt), "--data", str(shared_data_dir),
                           "--task-pairs", str(pairs), "--methods", "DPO+SPO,SFT-mix"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    size, stats = res["size"], res["statistics"]
    assert len(res["base"]["task_correct"]) == size["task_test"]
    for part in ("part1", "part2"):
        r = res[part]["DPO+SPO"]
        assert r["steps"] == 1 and len(r["task_correct"]) == size["task_test"]
        assert ("solution_nll" in r) == (part == "part1")  # part 2's ability measure is its task
        if part == "part1":
            assert math.isfinite(r["solution_nll"]) and r["solution_nll"] > 0
        for arm in ("start", "DPO+SPO"):
            ci = stats[part]["task_accuracy"][arm]
            assert ci["lo"] <= ci["mean"] <= ci["hi"]
        shifts = [r["train"]] + ([r["heldout"]] if part == "part1" else [])
        for sh in shifts:
            assert 0.0 <= sh["violation_frac"] <= 1.0
            assert math.isclose(sh["violation_frac"], sum(sh["violation"]) / len(sh["violation"]))
            # the violation flags are "chosen token-mean log-prob fell": all flags set -> the mean fell
            if sh["violation_frac"] == 1.0:
                assert sh["delta_chosen_token_mean"] < 0
            if sh["violation_frac"] == 0.0:
                assert sh["delta_chosen_token_mean"] >= 0
        # one DPO step from the reference raises the chosen log-prob relative to the rejected one
        assert r["train"]["delta_chosen"] - r["train"]["delta_rejected"] > 0
    p1 = res["part1"]["DPO+SPO"]
    assert len(p1["heldout_pref_correct"]) == res["hh_split"]["heldout_tokenized"] == len(p1["heldout"]["violation"])
    assert math.isclose(p1["heldout_pref_acc"], sum(p1["heldout_pref_correct"]) / len(p1["heldout_pref_correct"]))
    ci = stats["part1"]["heldout_pref_acc"]["DPO+SPO"]
    assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert [s["stage"] for s in res["stages"]][-4:] == ["part 1: DPO+SPO", "part 1: SFT-mix", "part 2: DPO+SPO",
                                                        "part 2: SFT-mix"]
    assert all(res[part]["SFT-mix"]["steps"] == 1 for part in ("part1", "part2"))
    assert all(s["peak_rss_gb"] >= s["rss_gb"] > 0 for s in res["stages"])
    for part in ("part1", "part2"):  # an arm's result is its arm.json; its final checkpoint is deleted
        assert (out / part / "DPO_SPO" / "arm.json").exists() and not (out / part / "DPO_SPO" / "checkpoints").exists()
    md = (out / "results.md").read_text()
    assert "| DPO+SPO |" in md and "Part 1, HH-RLHF" in md and "Part 2, on-policy" in md


def test_statistics_and_report_on_small_stored_results():
    """``statistics`` / ``report`` on hand-made per-item vectors: intervals around the means, paired
    differences to the start equal to the differences of the means, a reading that places every
    +SPO arm, one table row per arm."""
    import numpy as np

    rng = np.random.default_rng(0)
    arms = exp.METHODS
    n_task, n_pref = 30, 12

    def shift(n):
        v = rng.integers(0, 2, n)
        return {"delta_chosen": float(rng.normal()), "delta_rejected": float(rng.normal()),
                "delta_chosen_token_mean": 0.0, "violation_frac": float(v.mean()), "violation": v.tolist()}

    res = {"size": exp.dataclasses.asdict(exp.SIZES["cpu"]), "size_name": "cpu", "seed": 0, "total_s": 60.0,
           "hh_split": {"train": 64, "heldout": n_pref, "rule": "stated", "file": exp.HH_FILE},
           "task_pairs": {"num_pairs": 40, "sample_accuracy": 0.2},
           "base": {"task_correct": rng.integers(0, 2, n_task).tolist(), "solution_nll": 1.5,
                    "heldout_pref_acc_len": 0.5},
           "stages": [{"stage": "load", "wall_s": 1.0, "cpu_s": 1.0, "rss_gb": 1.0, "peak_rss_gb": 1.2}]}
    res["part1"] = {a: {"task_correct": rng.integers(0, 2, n_task).tolist(), "solution_nll": 1.4, "steps": 8,
                        "train": shift(8), "heldout": shift(n_pref), "heldout_pref_acc_len": 0.5,
                        "heldout_pref_correct": rng.integers(0, 2, n_pref).tolist()} for a in arms}
    res["part2"] = {a: {"task_correct": rng.integers(0, 2, n_task).tolist(), "solution_nll": 1.4, "steps": 5,
                        "train": shift(8)} for a in arms}
    stats = exp.statistics(res, n_boot=300)
    json.dumps(stats)  # no bootstrap draws or arrays left in what results.json stores
    for part in ("part1", "part2"):
        for a, r in stats[part]["task_accuracy"].items():
            items = res["base"]["task_correct"] if a == "start" else res[part][a]["task_correct"]
            assert math.isclose(r["mean"], sum(items) / n_task) and r["lo"] <= r["mean"] <= r["hi"]
            assert math.isclose(r["diff"], r["mean"] - stats[part]["task_accuracy"]["start"]["mean"])
            assert r["diff_lo"] <= r["diff"] <= r["diff_hi"]
    for a, r in stats["part1"]["heldout_pref_acc"].items():
        assert math.isclose(r["mean"], sum(res["part1"][a]["heldout_pref_correct"]) / n_pref)
    for spo in exp.SPO_FAMILIES:
        assert f"{spo} (" in stats["part1"]["reading"] and f"{spo} minus" in stats["part2"]["reading"]
    res["statistics"] = stats
    md = exp.report(res)
    assert all(md.count(f"| {a} |") == 2 for a in arms)  # one row in each part's table
    # --parts 2: no part 1 results, no HH split, no NLL; the report says so and has part 2's table only
    only2 = {k: v for k, v in res.items() if k not in ("part1", "hh_split", "statistics")}
    only2.update(parts=[2], part1={}, base={k: v for k, v in res["base"].items() if k == "task_correct"})
    only2["statistics"] = exp.statistics(only2, n_boot=300)
    assert set(only2["statistics"]) == {"part2"}
    md2 = exp.report(only2)
    assert "part 2 alone" in md2 and "Part 1" not in md2 and "NLL" not in md2
    assert all(md2.count(f"| {a} |") == 1 for a in arms)


def test_run_record_guards_fresh_and_resumed_runs(tmp_path):
    """``<out>/run.json``: a fresh run refuses an --out holding an earlier run's arms; --resume
    continues only with the same settings, naming the settings that differ."""
    import pytest

    settings = {"size": exp.dataclasses.asdict(exp.SIZES["smoke"]), "seed": 0, "model": "m", "task_pairs_file": None}
    exp._check_run_record(str(tmp_path), settings, resume=False)
    assert json.loads((tmp_path / "run.json").read_text())["seed"] == 0
    (tmp_path / "part1").mkdir()
    with pytest.raises(SystemExit, match="pass --resume"):
        exp._check_run_record(str(tmp_path), settings, resume=False)
    exp._check_run_record(str(tmp_path), settings, resume=True)  # same settings: continues
    with pytest.raises(SystemExit, match="seed differ"):
        exp._check_run_record(str(tmp_path), {**settings, "seed": 1}, resume=True)
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(SystemExit, match="not valid JSON"):
        exp._check_run_record(str(tmp_path), settings, resume=True)
