"""Preference-training throughput and peak memory: spo_jax (DPO, SimPO, DPO+SPO) vs TRL's DPOTrainer.

DPO is measured with an online reference on both sides (a frozen copy whose forward runs in every
step) and with cached reference log-probs (computed once before training: spo_jax's
``reference.mode="cached"``, TRL's ``precompute_ref_log_probs=True``; the one-off pass is not timed).

    python benchmarks/throughput.py            # writes the "throughput" section of benchmarks/RESULTS.md

Every measurement is a fresh process (`benchmarks/trl_dpo.py`,
`benchmarks/spo_jax_train.py --variant ...`), so peak RSS is per process. The
variants alternate within a round and the order is reversed in the next round
(A B C D, D C B A, ...) so that load from other users of a shared machine falls
on all of them; the load average is recorded around each process. Same model
(common.LLAMA_CONFIG, fp32), same token ids, same batch (8 pairs) and lengths
(prompt 64 + response 64) on both sides; tokens = prompt+chosen + prompt+rejected.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import machine_info, run_json_subprocess, write_section  # noqa: E402

SIDES = ("trl", "dpo", "trl_cached", "dpo_cached", "simpo", "dpo_spo")
LABEL = {"trl": "TRL DPOTrainer (PyTorch) DPO", "dpo": "spo_jax DPO",
         "trl_cached": "TRL DPOTrainer DPO, precompute_ref_log_probs", "dpo_cached": "spo_jax DPO, cached reference",
         "simpo": "spo_jax SimPO", "dpo_spo": "spo_jax DPO+SPO (penalty/reference)"}


def run_side(side: str, a) -> dict:
    common = ["--pairs-per-step", str(a.pairs_per_step), "--prompt-len", str(a.prompt_len),
              "--response-len", str(a.response_len), "--steps", str(a.steps + a.warmup), "--warmup", str(a.warmup)]
    if side in ("trl", "trl_cached"):
        args = [os.path.join(HERE, "trl_dpo.py"), *common] + (["--precompute-ref"] if side == "trl_cached" else [])
    else:
        args = [os.path.join(HERE, "spo_jax_train.py"), "--variant", side, *common]
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    out = run_json_subprocess(args)
    out["wall_s"] = time.perf_counter() - t
    out["load"] = (load0, os.getloadavg()[0])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--write", default=os.path.join(HERE, "RESULTS.md"), help="RESULTS.md path ('' = print only)")
    p.add_argument("--save-runs", default="", help="also dump the raw per-process results to this JSON file")
    p.add_argument("--from-runs", default="", help="only rebuild the table from a --save-runs file")
    a = p.parse_args()
    if a.from_runs:
        with open(a.from_runs) as f:
            saved = json.load(f)
        table(saved["runs"], saved["total"], argparse.Namespace(**{**saved["args"], "write": a.write}))
        return
    sides = a.sides.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    t0 = time.perf_counter()
    for r in range(a.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            out = run_side(side, a)
            runs[side].append(out)
            print(f"round {r} {side}: median step {statistics.median(out['step_times']):.2f} s, "
                  f"peak RSS {out['peak_rss_mib']:.0f} MiB, load {out['load'][0]:.2f}->{out['load'][1]:.2f}",
                  flush=True)
    total = time.perf_counter() - t0
    if a.save_runs:
        with open(a.save_runs, "w") as f:
            json.dump(dict(runs=runs, total=total, args=vars(a)), f)
    table(runs, total, a)


def table(runs: dict, total: float, a) -> None:
    sides = list(runs)

    rows, summary, tok_per_step = [], {}, {}
    for side in sides:
        times = [t for o in runs[side] for t in o["step_times"]]
        tok = runs[side][0]["tokens_per_step"]
        med = statistics.median(times)
        rates = sorted(tok / t for t in times)
        peak = max(o["peak_rss_mib"] for o in runs[side])
        loads = [x for o in runs[side] for x in o["load"]]
        cpu = [t for o in runs[side] for t in o.get("cpu_times", [])]
        cpu_cell = f" {statistics.median(cpu):.2f} ({min(cpu):.2f}–{max(cpu):.2f}) |" if cpu else " n/a |"
        dev = [o.get("peak_device_mib") for o in runs[side] if o.get("peak_device_mib") is not None]
        dev_cell = f" {max(dev):.0f} |" if dev else " n/a |"
        summary[side] = dict(tok_s=tok / med, peak=peak, step=med, cpu=statistics.median(cpu) if cpu else None)
        tok_per_step[side] = tok
        rows.append(f"| {LABEL[side]} | {len(times)} | {med:.2f} ({min(times):.2f}–{max(times):.2f}) | "
                    f"{tok} | {tok / med:.0f} ({rates[0]:.0f}–{rates[-1]:.0f}) | {peak:.0f} | "
                    f"{min(loads):.2f}–{max(loads):.2f} |" + cpu_cell + dev_cell)
    spo = next(o for s in sides if not s.startswith("trl") for o in runs[s])
    trl = runs["trl"][0] if "trl" in runs else {}
    m = machine_info()
    lines = [
        "## Throughput and peak memory: spo_jax vs TRL DPOTrainer (`benchmarks/throughput.py`)",
        "",
        f"Command: `python benchmarks/throughput.py` ({a.rounds} rounds, order reversed each round; each cell a "
        f"fresh process: {a.warmup} warm-up step(s) dropped, then {a.steps} timed steps; {total:.0f} s in all). "
        f"Machine: {m['cpu']}, {m['cores']} cores, backend {spo.get('backend')} ({spo.get('device')}), "
        f"Python {m['python']}; jax {spo.get('jax')}, flax {spo.get('flax')}, optax {spo.get('optax')}"
        + (f"; torch {trl.get('torch')} ({trl.get('threads')} threads)" if trl else "") + ", trl "
        + _trl_version() + ". Model: common.LLAMA_CONFIG (4 layers, hidden 256, vocab 32000, "
        f"{spo.get('num_params', 0) / 1e6:.1f} M parameters), fp32; {a.pairs_per_step} pairs per step, prompt "
        f"{a.prompt_len} + response {a.response_len} tokens; DPO/SPO with a frozen online reference "
        "(a copy of the initial policy) on both sides, or with reference log-probs cached before training "
        "(the rows so marked; the one-off reference pass is not timed); SimPO has no reference. spo_jax: the "
        "trainer's jitted "
        "step (`make_train_step`, padded batch [16, 128]) timed dispatch -> block_until_ready; TRL: "
        "`DPOTrainer` step (on_step_begin -> on_step_end). Peak RSS: the process's high-water mark "
        "(runtime, model, optimizer state, reference, data; max over rounds). Load: 1-min load average "
        "before/after each process, min–max (the 2 cores were shared with other jobs).",
        "",
        "| variant | timed steps | step s, median (min–max) | tokens/step | tokens/s, median (min–max) | "
        "peak RSS MiB | load avg | CPU s/step (all threads), median (min–max) | peak accelerator MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if "trl" in summary and "dpo" in summary:
        speed = summary["dpo"]["tok_s"] / summary["trl"]["tok_s"]
        mem = summary["dpo"]["peak"] / summary["trl"]["peak"]
        lines += ["", f"spo_jax DPO / TRL DPO: **{speed:.2f}x** tokens/s (target >= 2x: "
                  f"{'met' if speed >= 2 else 'missed'}), peak RSS {mem:.2f}x (target <= 1x: "
                  f"{'met' if mem <= 1 else 'missed'})."]
        if summary["dpo"].get("cpu") and summary["trl"].get("cpu"):
            lines[-1] += (f" CPU seconds per step, TRL / spo_jax: "
                          f"{summary['trl']['cpu'] / summary['dpo']['cpu']:.2f}x (less sensitive to the "
                          "other jobs on the cores than wall time).")
        if "dpo_cached" in summary:
            c = summary["dpo_cached"]
            lines[-1] += (f" Cached reference: spo_jax {c['tok_s']:.0f} tokens/s by wall time (online-reference "
                          f"step / cached step: {summary['dpo']['step'] / c['step']:.2f}x by wall time, "
                          f"{summary['dpo']['cpu'] / c['cpu']:.2f}x by CPU seconds; separate processes, so "
                          "benchmarks/reference_cost.py interleaves the two)")
            if "trl_cached" in summary:
                lines[-1] += (f", {c['tok_s'] / summary['trl_cached']['tok_s']:.2f}x TRL with "
                              "precompute_ref_log_probs")
            if c.get("cpu"):
                cores = machine_info()["cores"]
                proj = tok_per_step["dpo_cached"] / (c["cpu"] / cores)
                lines[-1] += (f"; {c['cpu']:.2f} CPU s per step, i.e. {proj:.0f} tokens/s if its threads had "
                              f"the {cores} cores to themselves (the target: >= 1200 tokens/s on a quiet "
                              f"2-core machine: {'met' if proj >= 1200 else 'not met'} by this projection)")
            lines[-1] += "."
        if "dpo_spo" in summary:
            lines[-1] += (f" DPO+SPO (penalty) step / DPO step: "
                          f"{summary['dpo_spo']['step'] / summary['dpo']['step']:.2f}x.")
    body = "\n".join(lines)
    print(body)
    if a.write:
        write_section(a.write, "throughput", body)


def _trl_version() -> str:
    try:
        from importlib.metadata import version
        return version("trl")
    except Exception:  # noqa: BLE001
        return "not installed"


if __name__ == "__main__":
    main()
