"""experiments/smollm2_gsm8k.py end to end at its smoke size: real SmolLM2 (GGUF), real GSM8K.

Sampling at 8 new tokens finds no correct answer, so the preference step trains on a
pairs file written here from GSM8K's own train solutions (chosen: the reference
solution; rejected: the same solution with a wrong final number), through the
script's ``--pairs`` path; one method (DPO+SPO) keeps the test short.
"""

import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smollm2_gsm8k_pipeline_smoke(shared_data_dir, smollm2_gguf, tmp_path):
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    try:
        import smollm2_gsm8k as exp
    finally:
        sys.path.pop(0)
    from spo_jax import models, sampling
    from spo_jax.data import gsm8k

    rows = exp.read_jsonl(str(shared_data_dir / "gsm8k" / "train.jsonl"), 2)
    tok = models.load_tokenizer(smollm2_gguf)
    prompts = sampling.render_prompts(tok, rows, use_chat_template=True)
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        for prompt, row in zip(prompts, rows):
            body, answer = row["answer"].split("####")
            wrong = f"{body}#### {int(answer.strip()) + 1}"
            assert gsm8k.is_correct(row["answer"], row["answer"]) and not gsm8k.is_correct(wrong, row["answer"])
            f.write(json.dumps({"prompt": prompt, "chosen": row["answer"], "rejected": wrong}) + "\n")

    out = tmp_path / "out"
    # a subprocess on one CPU device (see test_real_data.one_device_env), through the script's CLI
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "smollm2_gsm8k.py"), "--size", "smoke",
                           "--out", str(out), "--model", smollm2_gguf, "--data", str(shared_data_dir),
                           "--pairs", str(pairs), "--methods", "DPO+SPO"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"DPO+SPO"}
    r = res["methods"]["DPO+SPO"]
    assert r["steps"] == 1 and 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= res["base"]["accuracy"] <= 1.0
    assert math.isfinite(r["delta_logps_chosen"]) and math.isfinite(r["delta_logps_rejected"])
    # one DPO step from the reference moves the chosen log-prob up relative to the rejected one
    assert r["delta_logps_chosen"] - r["delta_logps_rejected"] > 0
    assert 0.0 <= r["violation_frac"] <= 1.0
    assert "| DPO+SPO |" in (out / "results.md").read_text()
