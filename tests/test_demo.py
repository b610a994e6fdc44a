"""End to end: ``python -m spo_jax.demo --quick`` runs the experiment pipeline in both settings and
shows the effect's sign, which is deterministic on CPU.

The quick world is tiny (a 1-layer width-32 model, one-step problems, 10 preference steps at a
high learning rate), so it does not measure accuracy; it is large enough to show the mechanism on
the correctness pairs: DPO pushes the chosen log-prob of more pairs below the SFT model's (a higher
violation fraction) and raises the chosen log-prob less than DPO+SPO does.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from spo_jax import demo, experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["DPO", "DPO+SPO", "RPO"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run([sys.executable, "-m", "spo_jax.demo", "--quick", "--seed", "0", "--out", str(out),
                           "--families", *FAMILIES],
                          capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"report: {out / 'report.md'}" in proc.stdout
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_a_complete_run(quick_run):
    out, res = quick_run
    labels = ["DPO", "DPO+SPO γ=30", "RPO λ=10"]  # at the demo's fixed weights
    assert res["report_seeds"] == [0] and res["validation_seed"] is None
    (run,) = res["per_seed"]
    n = experiment.WorldSettings.quick().n_test
    assert len(run["sft"]["correct"]) == n and run["sft"]["curve"]
    for k in experiment.SETTINGS:
        assert list(run["settings"][k]["runs"]) == labels
        assert run["pairs"][k]["num_pairs"] >= experiment.WorldSettings.quick().pref_batch
        for a, r in run["settings"][k]["runs"].items():
            assert len(r["correct"]) == len(r["reward_items"]) == n, (k, a)
            assert len(r["delta_chosen"]) == len(r["violation"]) and 0 <= r["violation_frac"] <= 1
            assert all(math.isfinite(r[x]) for x in ("delta_chosen_logp", "delta_rejected_logp", "final_train_loss"))
        summ = res["summary"][k]
        assert set(summ["accuracy"]) == {"SFT", *labels} and summ["reading"]
    assert abs(sum(run["settings"]["correctness"]["runs"]["DPO"]["mass_split"].values()) - 1) < 1e-9
    report = (out / "report.md").read_text()
    assert all(f"| {a} |" in report for a in labels) and "**Reading**" in report and "Wall time" in report
    assert (out / "pareto_style.png").stat().st_size > 5000
    # the pairs on disk: correct vs incorrect (a), higher vs lower style reward (b)
    from spo_jax.data import synthetic
    for p in [json.loads(x) for x in (out / "seed0" / "pairs_correctness.jsonl").read_text().splitlines()][:20]:
        row = {"answer": f"#### {p['reference_answer']}"}
        assert synthetic.score(row, p["chosen"])["correct"] and not synthetic.score(row, p["rejected"])["correct"]
    for p in [json.loads(x) for x in (out / "seed0" / "pairs_style.jsonl").read_text().splitlines()][:20]:
        assert experiment.style_reward(p["chosen"]) > experiment.style_reward(p["rejected"])


def test_quick_demo_shows_the_sign(quick_run):
    """DPO's violation fraction is above DPO+SPO's and its chosen log-prob change below (correctness pairs)."""
    _, res = quick_run
    runs = res["per_seed"][0]["settings"]["correctness"]["runs"]
    dpo, spo = runs["DPO"], runs["DPO+SPO γ=30"]
    assert dpo["violation_frac"] > spo["violation_frac"], (dpo["violation_frac"], spo["violation_frac"])
    assert dpo["delta_chosen_logp"] < spo["delta_chosen_logp"], (dpo["delta_chosen_logp"], spo["delta_chosen_logp"])


@pytest.mark.parametrize("earlier", ["seed0/", "report.md", "results.json"])
def test_demo_refuses_to_overwrite_an_earlier_run(tmp_path, earlier):
    if earlier.endswith("/"):
        (tmp_path / earlier).mkdir()
    else:
        (tmp_path / earlier).write_text("earlier results")
    with pytest.raises(FileExistsError, match=rf"{earlier.rstrip('/')}.*--out"):
        demo.run_demo(str(tmp_path), experiment.WorldSettings.quick())
    if not earlier.endswith("/"):
        assert (tmp_path / earlier).read_text() == "earlier results"
    if earlier != "report.md":
        return
    proc = subprocess.run([sys.executable, "-m", "spo_jax.demo", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m spo_jax.demo: error: ") and "report.md" in \
        proc.stderr


def test_demo_names_an_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown method family 'XPO'"):
        demo.run_demo(str(tmp_path / "new"), experiment.WorldSettings.quick(), families=("DPO", "XPO"))
    assert not (tmp_path / "new").exists()


def test_grid_resume_reads_back_finished_work_and_runs_only_new_arms(quick_run, tmp_path, monkeypatch):
    """A killed or extended grid continues with --resume: the SFT model, the pairs and every finished
    arm are read back (the resumed SFT model reproduces its held-out answers exactly), only new arms
    train, and a half-done arm left by a kill is started again."""
    import shutil

    src, res = quick_run
    out = tmp_path / "grid"
    shutil.copytree(src, out)
    half_done = out / "seed0" / "style" / "RFT"  # what a kill in the middle of training RFT leaves
    half_done.mkdir(parents=True)
    (half_done / "metrics.jsonl").write_text('{"step": 1}\n')
    trained = []
    real_train = experiment.runs.train
    for stage in (experiment.pipeline, experiment.runs):  # the SFT run and the arms
        monkeypatch.setattr(stage, "train", lambda c, **kw: trained.append(c.run_dir) or real_train(c, **kw))
    s = experiment.WorldSettings.quick()
    again = experiment.run_grid(s, str(out), families_=[*FAMILIES, "RFT"], report_seeds=[0], fixed=demo.FIXED,
                                settings=["style"], resume=True)  # one setting: half the cost
    assert [os.path.relpath(d, out) for d in trained] == ["seed0/style/RFT"]
    new, old = again["per_seed"][0], res["per_seed"][0]
    assert new["sft"] == old["sft"] and new["pairs"]["style"] == old["pairs"]["style"]
    for k in ["style"]:
        for label, r in old["settings"][k]["runs"].items():
            assert new["settings"][k]["runs"][label] == r, (k, label)
        assert "RFT" in new["settings"][k]["runs"] and "RFT" in again["summary"][k]["accuracy"]
    assert again["timings_s"]["resumed"] and "RFT" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="other world settings.*n_test"):
        experiment.run_grid(dataclasses.replace(s, n_test=s.n_test + 1), str(out), families_=list(FAMILIES),
                            report_seeds=[0], fixed=demo.FIXED, resume=True)
    with pytest.raises(FileNotFoundError, match="grid.json not found"):
        experiment.run_grid(s, str(tmp_path / "nothing"), families_=list(FAMILIES), report_seeds=[0], resume=True)


def test_sft_starts_from_the_best_point_of_its_curve(tmp_path, monkeypatch):
    """When the curve's best point is not its last, the arms start from that point's checkpoint: the SFT model
    handed to the arms and its export (what they load) equal a fresh SFT run stopped at that step, and
    sft.json records the step. The first point is made the "best" here, whatever the curve."""
    import jax
    import numpy as np
    from flax import nnx

    from spo_jax import models
    from spo_jax.experiment import pipeline

    s = dataclasses.replace(experiment.WorldSettings.quick(), n_sft=64, n_val=4, sft_steps=40, sft_max_steps=40,
                            sft_eval_every=20)
    monkeypatch.setattr(pipeline, "best_step", min)
    w = pipeline._Seed.build(s, 0, str(tmp_path / "seed0"), resume=False)
    _, params, export, curve, chosen = pipeline._sft(w)
    assert sorted(curve) == [20, 40] and chosen == 20
    assert json.loads((tmp_path / "seed0" / "sft" / "sft.json").read_text())["chosen_step"] == 20
    c = experiment.sft_config(s, str(tmp_path / "fresh"), 0)
    c.train.num_steps = 20
    fresh = pipeline.train(c, train_data=pipeline._dataset(w.sft_rows), eval_data=pipeline._dataset(w.val_rows))
    want = jax.tree.leaves(jax.device_get(fresh.state.params))
    for got in (params, nnx.split(models.from_pretrained(export))[1]):
        got = jax.tree.leaves(got)
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
