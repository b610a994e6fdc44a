"""The paper's models on TPU slices, planned on this CPU: ``spo_jax.plan`` over a grid of configs.

For each (model, method, slice) it builds ``experiments/paper.py``'s config (the paper's batch of 128
pairs at 512 tokens on GSM8K; the model from ``paper.HF_CONFIGS``, no weights), compiles the trainer's
train step for the slice with libtpu's compiler (no TPU present) and records per-chip memory, whether it
fits the chip's HBM, the step-time estimate and MFU. Every number is the TPU compiler's estimate, not a
measurement. Methods: DPO, DPO + SPO penalty, SPO unrolled K=1 / K=4, SPO implicit.

    flock /tmp/spo_heavy.lock python benchmarks/plan_grid.py --models qwen2.5-0.5b --slices v5p:2x2x1 \\
        --methods dpo,penalty --write

Each compile of the 0.5B model takes minutes on a loaded 2-core machine; run a few cells at a time
(rows are merged into benchmarks/plan_grid.json, the table is rebuilt from all of them).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spo_jax import plan  # noqa: E402

plan.quiet_libtpu()

from common import write_section  # noqa: E402
from experiments import paper  # noqa: E402

#: method -> (grid loss, spo, extra config fields)
METHODS = {
    "dpo": ("dpo", False, {}),
    "penalty": ("dpo", True, {}),
    "unrolled_k1": ("dpo", True, {"spo.solver": "unrolled", "spo.inner_steps": 1}),
    "unrolled_k4": ("dpo", True, {"spo.solver": "unrolled", "spo.inner_steps": 4}),
    "implicit": ("dpo", True, {"spo.solver": "implicit"}),
}
SLICES = ("v5e:4x4", "v5e:8x8", "v5p:2x2x1", "v5p:4x4x4", "v6e:2x4")
STORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_grid.json")


def cell(model: str, method: str, topology: str) -> dict:
    loss, spo, extra = METHODS[method]
    arg = f"{model},{loss},{'spo' if spo else 'nospo'},gsm8k,tpu"
    c = paper.get_config(arg)
    for key, value in extra.items():
        section, field = key.split(".")
        c[section][field] = value
    c = plan.planning_config(c, paper.hf_config(arg))
    t = time.time()
    rep = plan.plan(c, plan.topology_devices(topology), programs=("train_step",))
    r = rep["programs"]["train_step"]
    return {"model": model, "method": method, "topology": topology, "chips": rep["devices"],
            "compile_s": round(time.time() - t, 1), **{k: v for k, v in r.items() if k != "error"},
            "mesh": rep["mesh"], "grad_accum": int(c.optim.grad_accum_steps), "remat": bool(c.model.remat),
            "libtpu": importlib.metadata.version("libtpu")}


def _libtpu_versions(rows: list[dict]) -> str:
    """The libtpu versions the rows were compiled with (rows from before this was recorded: 0.0.52)."""
    return " / ".join(sorted({r.get("libtpu", "0.0.52") for r in rows}))


def _pct(x) -> str:
    return "-" if not x else f"{100 * x:.1f}%"


def table(rows: list[dict]) -> str:
    gib = lambda b: "?" if b is None else f"{b / plan.GiB:.2f}"  # noqa: E731
    lines = ["| model | method | slice | chips | fits | args GiB/chip | temps GiB/chip | peak GiB/chip | "
             "step s (estimate) | MFU | plan |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["method"], r["topology"])):
        step = f"{r['estimated_step_s']:.3g} ({r['estimate_source']})" if r.get("estimated_step_s") else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['topology']} | {r['chips']} | "
                     f"{'yes' if r['fits'] else 'no'} | {gib(r.get('argument_bytes'))} | {gib(r.get('temp_bytes'))} "
                     f"| {gib(r.get('peak_bytes') or r.get('needed_bytes'))} | {step} | "
                     f"{_pct(r.get('mfu'))} | "
                     f"fsdp {r['mesh']['fsdp']}, accum {r['grad_accum']}, remat {r['remat']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2.5-0.5b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--slices", default=",".join(SLICES))
    ap.add_argument("--write", action="store_true", help="merge into plan_grid.json and rewrite RESULTS.md's table")
    args = ap.parse_args()
    rows = json.load(open(STORE)) if os.path.exists(STORE) else []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for topology in args.slices.split(","):
                r = cell(model, method, topology)
                print(json.dumps(r), flush=True)
                rows = [x for x in rows if (x["model"], x["method"], x["topology"]) != (model, method, topology)] + [r]
                if args.write:
                    with open(STORE, "w") as f:
                        json.dump(rows, f, indent=1)
    if args.write:
        write_section(os.path.join(os.path.dirname(STORE), "RESULTS.md"), "plan_grid",
                      "### The paper's models on TPU slices (`benchmarks/plan_grid.py`)\n\n**TPU compiler's estimate "
                      f"(libtpu {_libtpu_versions(rows)}, deviceless compile on a 2-core CPU), not a measurement**: "
                      "libtpu compiled "
                      "the train step on this CPU for each slice (`python -m spo_jax.plan`); GSM8K shapes, "
                      "128 pairs x 512 tokens per step. Only the rows below have run.\n\n" + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
