"""MFU of spo_jax's DPO train step against the machine's measured matmul peak (`benchmarks/mfu.py`).

    python benchmarks/mfu.py                   # writes the "mfu" section of benchmarks/RESULTS.md

Peak: ``spo_jax.metrics.measure_peak_flops`` (a timed square matmul, best of 5)
at the library's default size for the backend and at twice that size, the
best of the two; measured in every round, interleaved with the train steps, so
both see the same load. Model FLOPs per step, three ways:

* trainer: (6·N + 2·N_ref)·tokens, N = all parameters (what ``spo_jax.metrics.mfu``
  and the trainer's ``mfu`` metric use; counts the embedding table, which costs no
  matmul, so it overstates the work of a small-vocab-heavy model),
* matmul: the same with N = parameters minus the input embedding table, and the
  unembedding's D·V counted at the response tokens only (the step computes
  log-probs only where ``loss_mask`` is 1: Contract 1's ``score_index``),
* XLA: ``compile().cost_analysis()['flops']`` of the whole step (attention,
  the log-prob chunk recomputation, the optimizer included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import LLAMA_CONFIG, add_shape_args, machine_info, make_pairs, write_section  # noqa: E402
from spo_jax_train import Bench, make_config, versions  # noqa: E402


def peak_flops(dtype: str) -> tuple[float, int]:
    from spo_jax.metrics import measure_peak_flops
    base = 512 if jax.devices()[0].platform == "cpu" else 4096
    best = max((measure_peak_flops(dtype, size=n), n) for n in (base, 2 * base))
    return best


def measure(*, pairs: int, prompt_len: int, response_len: int, rounds: int, dtype: str = "float32",
            model_config: dict | None = None, log=print) -> dict:
    mc = dict(model_config or LLAMA_CONFIG)
    rows = make_pairs(pairs * 2, prompt_len, response_len, seed=0)
    bench = Bench(make_config("dpo", pairs=pairs, max_length=prompt_len + response_len, dtype=dtype,
                              model_config=mc), rows, num_batches=2)
    xla = bench.cost_analysis().get("flops")
    bench.step()  # compile + warm-up
    peak_flops(dtype)
    n = bench.num_params
    n_matmul = n - mc["vocab_size"] * mc["hidden_size"]
    times, peaks, tokens = [], [], bench.tokens[0]
    for r in range(rounds):
        pk, size = peak_flops(dtype)
        dt, _ = bench.step()
        times.append(dt)
        peaks.append(pk)
        log(f"round {r}: step {dt:.2f} s, peak {pk / 1e9:.1f} GFLOP/s (n={size})")
    unembed, scored = mc["vocab_size"] * mc["hidden_size"], bench.scored[0]
    flops = {"trainer": (6 * n + 2 * n) * tokens, "xla": xla,
             "matmul": (6 + 2) * ((n_matmul - unembed) * tokens + unembed * scored)}
    mfus = {k: [f / t / p for t, p in zip(times, peaks)] if f else [] for k, f in flops.items()}
    return dict(times=times, peaks=peaks, flops=flops, mfu=mfus, tokens=tokens, scored=scored, num_params=n,
                num_params_matmul=n_matmul)


def main() -> None:
    p = argparse.ArgumentParser()
    add_shape_args(p)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--write", default=os.path.join(HERE, "RESULTS.md"))
    a = p.parse_args()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = measure(pairs=a.pairs_per_step, prompt_len=a.prompt_len, response_len=a.response_len,
                  rounds=a.rounds, dtype=a.dtype, log=lambda s: print(s, flush=True))
    total, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    t, pk = res["times"], res["peaks"]
    rows = []
    for k, label in (("trainer", "trainer formula (6N+2N_ref)·tokens, N all params"),
                     ("matmul", "(6N+2N_ref)·tokens, N without the embedding table"),
                     ("xla", "XLA cost analysis of the step")):
        f, mm = res["flops"][k], res["mfu"][k]
        if not f:
            rows.append(f"| {label} | n/a | n/a | n/a |")
            continue
        achieved = [f / x for x in t]
        rows.append(f"| {label} | {f / 1e9:.1f} | {statistics.median(achieved) / 1e9:.1f} "
                    f"({min(achieved) / 1e9:.1f}–{max(achieved) / 1e9:.1f}) | "
                    f"**{statistics.median(mm):.1%}** ({min(mm):.1%}–{max(mm):.1%}) |")
    m, v = machine_info(), versions()
    body = "\n".join([
        "## MFU of the DPO train step (`benchmarks/mfu.py`)",
        "",
        f"Command: `python benchmarks/mfu.py` ({total:.0f} s). Machine: {m['cpu']}, {m['cores']} cores, backend "
        f"{v['backend']} ({v['device']}); jax {v['jax']}. Model: common.LLAMA_CONFIG ({res['num_params'] / 1e6:.1f} M "
        f"parameters, {res['num_params_matmul'] / 1e6:.1f} M without the embedding table), {a.dtype}; DPO with a "
        f"frozen online reference, {a.pairs_per_step} pairs of prompt {a.prompt_len} + response {a.response_len} "
        f"({res['tokens']} tokens per step). Peak: `measure_peak_flops` (square {a.dtype} matmul), median "
        f"{statistics.median(pk) / 1e9:.1f} GFLOP/s ({min(pk) / 1e9:.1f}–{max(pk) / 1e9:.1f}) over {a.rounds} "
        f"rounds interleaved with the steps; step {statistics.median(t):.2f} s ({min(t):.2f}–{max(t):.2f}). "
        f"MFU per round = model FLOPs / step time / that round's peak. 1-min load average {load0:.2f} before, "
        f"{load1:.2f} after (shared cores).",
        "",
        "| model FLOPs counted as | GFLOP per step | achieved GFLOP/s, median (min–max) | MFU, median (min–max) |",
        "|---|---|---|---|",
        *rows,
    ])
    print(body)
    if a.write:
        write_section(a.write, "mfu", body)


if __name__ == "__main__":
    main()
