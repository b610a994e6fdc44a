"""Cost of each SPO solver relative to a plain DPO step (`benchmarks/solver_cost.py`).

    python benchmarks/solver_cost.py           # writes the "solver_cost" section of benchmarks/RESULTS.md

One process: the plain DPO step and every solver variant are compiled as the
trainer's jitted step (`make_train_step`) on one shared state (policy, AdamW
state, frozen online reference) and the same batches; then the variants are
timed interleaved (DPO, penalty, ..., implicit, DPO, penalty, ...), so load from
other processes falls on all of them alike. Each cell: the median (and min–max)
of the per-round ratio variant step / DPO step of the same round, and the
median step time; plus XLA's compiled FLOP count of the step (cost analysis),
which says how much of a slow-down is arithmetic the solver must do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import add_shape_args, machine_info, make_pairs, write_section  # noqa: E402
from spo_jax_train import Bench, make_config, versions  # noqa: E402

SOLVERS = ("penalty_reference", "penalty_inner_sft_k1", "penalty_inner_sft_k4", "barrier",
           "unrolled_k1", "unrolled_k4", "implicit")
LABEL = {"dpo": "DPO (no SPO)", "penalty_reference": "penalty / reference",
         "penalty_inner_sft_k1": "penalty / inner_sft K=1", "penalty_inner_sft_k4": "penalty / inner_sft K=4",
         "barrier": "barrier / reference", "unrolled_k1": "unrolled K=1", "unrolled_k4": "unrolled K=4",
         "implicit": "implicit (K=4, CG ≤ {cg})"}


def measure(variants, *, pairs: int, prompt_len: int, response_len: int, rounds: int, warmup: int = 1,
            model_config: dict | None = None, cg_iters: int = 20, flops: bool = True, log=print) -> dict:
    """Compile ``("dpo", *variants)`` on one shared state; time them interleaved.

    Returns {variant: {"times": [...], "ratios": [...], "flops": float|None}}."""
    rows = make_pairs(pairs * 4, prompt_len, response_len, seed=0)
    kw = dict(pairs=pairs, max_length=prompt_len + response_len, model_config=model_config,
              extra={"spo.cg_iters": cg_iters})
    bench = Bench(make_config("dpo", **kw), rows, num_batches=4)
    names = ["dpo", *variants]
    for v in variants:
        bench.add_variant(v, make_config(v, **kw))
    bench.steps["dpo"] = bench.steps["main"]
    out = {v: {"times": [], "ratios": [], "flops": None} for v in names}
    if flops:
        for v in names:
            out[v]["flops"] = bench.cost_analysis(v).get("flops")
    for v in names:  # compile + warm-up
        t = time.perf_counter()
        for _ in range(warmup):
            bench.step(v)
        log(f"warm-up {v}: {time.perf_counter() - t:.1f} s")
    for r in range(rounds):
        order = names if r % 2 == 0 else [names[0], *names[:0:-1]]
        this = {}
        for v in order:
            this[v] = bench.step(v)[0]
        for v in names:
            out[v]["times"].append(this[v])
            out[v]["ratios"].append(this[v] / this["dpo"])
        log(f"round {r}: " + ", ".join(f"{v} {this[v]:.2f}s" for v in names))
    out["_tokens"] = bench.tokens[0]
    out["_shape"] = bench.shapes[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    add_shape_args(p, pairs=4, prompt_len=32, response_len=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cg-iters", type=int, default=20)
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--write", default=os.path.join(HERE, "RESULTS.md"))
    a = p.parse_args()
    solvers = a.solvers.split(",")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = measure(solvers, pairs=a.pairs_per_step, prompt_len=a.prompt_len, response_len=a.response_len,
                  rounds=a.rounds, cg_iters=a.cg_iters, log=lambda s: print(s, flush=True))
    total, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    base_flops = res["dpo"]["flops"]
    rows = []
    for v in ["dpo", *solvers]:
        t, r, f = res[v]["times"], res[v]["ratios"], res[v]["flops"]
        fr = f"{f / base_flops:.2f}x" if f and base_flops else "n/a"
        rows.append(f"| {LABEL[v].format(cg=a.cg_iters)} | {statistics.median(t):.3f} ({min(t):.3f}–{max(t):.3f}) | "
                    f"**{statistics.median(r):.2f}x** ({min(r):.2f}–{max(r):.2f}) | "
                    f"{(f or 0) / 1e9:.1f} | {fr} |")
    m, v = machine_info(), versions()
    pen = statistics.median(res["penalty_reference"]["ratios"]) if "penalty_reference" in res else None
    body = "\n".join([
        "## Cost of each SPO solver relative to a DPO step (`benchmarks/solver_cost.py`)",
        "",
        f"Command: `python benchmarks/solver_cost.py` ({total:.0f} s). Machine: {m['cpu']}, {m['cores']} cores, "
        f"backend {v['backend']} ({v['device']}); jax {v['jax']}, flax {v['flax']}, optax {v['optax']}. "
        f"Model: common.LLAMA_CONFIG, fp32; {a.pairs_per_step} pairs per step, prompt {a.prompt_len} + response "
        f"{a.response_len} (padded batch {list(res['_shape'])}, {res['_tokens']} real tokens), frozen online reference, "
        "the trainer's jitted step including AdamW. SPO defaults otherwise (γ=10, SGD inner lr 1e-2, "
        "remat on for unrolled, μ=1 and CG tol 1e-4 for implicit). "
        f"{a.rounds} interleaved rounds after one warm-up step each; ratio = variant step / DPO step "
        f"of the same round. 1-min load average {load0:.2f} before, {load1:.2f} after (shared cores). "
        "XLA GFLOP: `compile().cost_analysis()['flops']` of the whole step; XLA counts the body of a loop "
        "(`lax.scan` / `while`: the inner steps, the CG iterations) once, not once per iteration, so for "
        "the K>1 and implicit rows it is a lower bound on the work (K=1 vs K=4 differ only by the loop's "
        "set-up).",
        "",
        "| solver | step s, median (min–max) | step / DPO step, median (min–max) | XLA GFLOP | FLOP / DPO FLOP |",
        "|---|---|---|---|---|",
        *rows,
        "",
        (f"Target: penalty/reference step <= 1.05x DPO step: {pen:.2f}x, "
         f"{'met' if pen <= 1.05 else 'missed'}." if pen is not None else ""),
    ])
    print(body)
    if a.write:
        write_section(a.write, "solver_cost", body)


if __name__ == "__main__":
    main()
