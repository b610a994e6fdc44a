"""End to end: ``python -m spo_jax.demo --quick`` writes a complete run directory."""

import json
import math
import os
import subprocess
import sys

import pytest

from spo_jax import demo


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "spo_jax.demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"report: {out / 'report.md'}" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    methods = list(demo.DemoSettings.quick().methods)
    assert set(methods) == set(demo.METHOD_SPECS) and list(res["methods"]) == methods

    def finite(x):
        return isinstance(x, (int, float)) and math.isfinite(x)

    assert 0.0 <= res["sft"]["accuracy"] <= 1.0
    assert res["pairs"]["num_pairs"] >= 4
    for m in methods:
        r = res["methods"][m]
        assert 0.0 <= r["accuracy"] <= 1.0, (m, r)
        for k in ("delta_chosen_logp", "delta_rejected_logp", "delta_chosen_token_mean", "violation_frac",
                  "frac_chosen_logp_down", "final_train_loss"):
            assert finite(r[k]), (m, k, r[k])
        assert 0.0 <= r["violation_frac"] <= 1.0
        assert abs(sum(r["mass_split"].values()) - 1.0) < 1e-9
        curve = res["curves"][m]["0"]
        assert "0" in curve and len(curve) >= 2 and all(finite(v["chosen"]) and finite(v["rejected"])
                                                        for v in curve.values())
        assert (out / f"logps_{m.replace('+', '_')}.png").stat().st_size > 1000
    assert (out / "logps_all.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "Wall time" in report and all(f"| {m} |" in report for m in methods)
    assert finite(res["timings_s"]["total"])
    # the pairs on disk are correct/incorrect per the task's scorer
    from spo_jax.data import synthetic
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for p in pairs[:20]:
        row = {"answer": f"#### {p['reference_answer']}"}
        assert synthetic.score(row, p["chosen"])["correct"] and not synthetic.score(row, p["rejected"])["correct"]


@pytest.mark.parametrize("earlier", ["sft/", "runs/", "report.md", "results.json"])
def test_demo_refuses_to_overwrite_an_earlier_run(tmp_path, earlier):
    if earlier.endswith("/"):
        (tmp_path / earlier).mkdir()
    else:
        (tmp_path / earlier).write_text("earlier results")
    with pytest.raises(FileExistsError, match=rf"{earlier.rstrip('/')}.*--out"):
        demo.run_demo(str(tmp_path), demo.DemoSettings.quick())
    if not earlier.endswith("/"):
        assert (tmp_path / earlier).read_text() == "earlier results"
    if earlier != "report.md":
        return
    proc = subprocess.run([sys.executable, "-m", "spo_jax.demo", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("python -m spo_jax.demo: error: ") and earlier.rstrip("/") in \
        proc.stderr
