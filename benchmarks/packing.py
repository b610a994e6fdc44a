"""Padded vs packed batches on a length-skewed preference set (`benchmarks/packing.py`).

    python benchmarks/packing.py               # writes the "packing" section of benchmarks/RESULTS.md

Same data (common.make_pairs(skew=True): geometric prompt/response lengths,
most short, a few at the cap), same model and DPO step (the trainer's jitted
step, frozen online reference); the two differ only in ``data.packing``. Each
round is one pass over the data set with either layout, the two passes
interleaved batch by batch (padded b0, packed b0, padded b1, ...). Tokens/s
counts real tokens only (segment_ids > 0: prompt + response of both
sequences of each pair), i.e. the same total for both layouts per pass. The
first pass (compiles every padded length bucket) is a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import add_shape_args, machine_info, make_pairs, write_section  # noqa: E402
from spo_jax_train import Bench, make_config, versions  # noqa: E402


def measure(*, n_pairs: int, pairs: int, prompt_len: int, response_len: int, rounds: int,
            model_config: dict | None = None, log=print) -> dict:
    """Returns {"padded"|"packed": {"rates": [tokens/s per pass], "tokens", "slots", "shapes", "steps"}}."""
    rows = make_pairs(n_pairs, prompt_len, response_len, seed=0, skew=True)
    max_length = prompt_len + response_len
    benches = {
        layout: Bench(make_config("dpo", pairs=pairs, max_length=max_length, packing=(layout == "packed"),
                                  model_config=model_config), rows, num_batches=None)
        for layout in ("padded", "packed")
    }
    out = {}
    for layout, b in benches.items():
        out[layout] = dict(rates=[], tokens=sum(b.tokens), steps=len(b.batches),
                           slots=int(sum(np.prod(s) for s in b.shapes)), shapes=sorted(set(b.shapes)))
    n = max(len(b.batches) for b in benches.values())
    for r in range(rounds + 1):  # pass 0: warm-up (compiles)
        spent = {k: 0.0 for k in benches}
        for i in range(n):
            for layout in (("padded", "packed") if (r + i) % 2 == 0 else ("packed", "padded")):
                b = benches[layout]
                if i < len(b.batches):
                    spent[layout] += b.step()[0]
        if r == 0:
            log(f"warm-up pass: padded {spent['padded']:.1f} s, packed {spent['packed']:.1f} s")
            continue
        for layout in benches:
            out[layout]["rates"].append(out[layout]["tokens"] / spent[layout])
        log(f"pass {r}: padded {out['padded']['rates'][-1]:.0f} tok/s, packed {out['packed']['rates'][-1]:.0f} tok/s")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=32, help="pairs in the data set (one pass per round)")
    add_shape_args(p, prompt_len=128, response_len=128, cap_help="lengths")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--write", default=os.path.join(HERE, "RESULTS.md"))
    a = p.parse_args()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = measure(n_pairs=a.pairs, pairs=a.pairs_per_step, prompt_len=a.prompt_len, response_len=a.response_len,
                  rounds=a.rounds, log=lambda s: print(s, flush=True))
    total, load1 = time.perf_counter() - t0, os.getloadavg()[0]
    ratios = [k / d for k, d in zip(res["packed"]["rates"], res["padded"]["rates"])]
    rows = []
    for layout in ("padded", "packed"):
        o = res[layout]
        rt = o["rates"]
        rows.append(f"| {layout} | {o['steps']} | {', '.join('x'.join(map(str, s)) for s in o['shapes'])} | "
                    f"{o['tokens']} | {o['slots']} | {o['tokens'] / o['slots']:.0%} | "
                    f"{statistics.median(rt):.0f} ({min(rt):.0f}–{max(rt):.0f}) |")
    lens = [2 * len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"])
            for r in make_pairs(a.pairs, a.prompt_len, a.response_len, seed=0, skew=True)]
    m, v = machine_info(), versions()
    med = statistics.median(ratios)
    body = "\n".join([
        "## Padded vs packed batches on a length-skewed set (`benchmarks/packing.py`)",
        "",
        f"Command: `python benchmarks/packing.py` ({total:.0f} s). Machine: {m['cpu']}, {m['cores']} cores, "
        f"backend {v['backend']} ({v['device']}); jax {v['jax']}, flax {v['flax']}. Model: common.LLAMA_CONFIG, "
        f"fp32, DPO with a frozen online reference, the trainer's jitted step. Data: {a.pairs} pairs from "
        f"`make_pairs(skew=True)` (prompt and response lengths geometric, capped at {a.prompt_len} / "
        f"{a.response_len}; tokens per pair median {statistics.median(lens):.0f}, max {max(lens)}), "
        f"{a.pairs_per_step} pairs per step; padded: length buckets of 64; packed: rows of "
        f"{a.prompt_len + a.response_len} tokens, automatic row count. {a.rounds} passes over the data after a "
        f"warm-up pass, the layouts interleaved batch by batch; tokens/s = real tokens of a pass / its time. "
        f"1-min load average {load0:.2f} before, {load1:.2f} after (shared cores).",
        "",
        "| layout | steps per pass | batch shapes [R, T] | real tokens per pass | token slots per pass | "
        "fill | real tokens/s, median (min–max) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Packed / padded tokens/s: **{med:.2f}x** (per-pass ratios {min(ratios):.2f}–{max(ratios):.2f}); "
        f"target >= 1.5x: {'met' if med >= 1.5 else 'missed'}.",
    ])
    print(body)
    if a.write:
        write_section(a.write, "packing", body)


if __name__ == "__main__":
    main()
