"""Where a train step's time goes: a JAX profiler trace of the trainer's step, attributed to the code.

    python benchmarks/profile_step.py                      # DPO, online reference, the throughput shape
    python benchmarks/profile_step.py --variant dpo_cached # DPO with cached reference log-probs
    python benchmarks/profile_step.py --write benchmarks/RESULTS.md

The step (``benchmarks/spo_jax_train.Bench``: the trainer's jitted ``make_train_step``) runs under
``jax.profiler.trace``; XLA's CPU runtime records one event per executed HLO instruction (a fusion,
a dot, a copy, ...). Each instruction's Python call stack is in the compiled module's HLO text
(``stack_frame_id`` -> FileLocations / FunctionNames), so its time is attributed to

* a phase: the reference forward (under ``_with_ref``), the policy forward or backward (under the
  solver; backward = a ``transpose(...)`` op, JAX's reverse mode), the optimizer update (optax), or
  the rest of the step;
* a component: the innermost spo_jax function on its stack (``Attention.attend``, ``MLP.__call__``,
  the log-prob functions of ``spo_jax/logprobs.py``, ...), marked "(Linear)" when the op is a flax
  ``Linear`` inside it (a projection matmul).

Times are the summed durations of the instructions over the traced steps divided by the steps
(XLA may run independent instructions concurrently on its threads, so the sum can exceed the
step's wall time); the wall time and CPU seconds per step are measured on the same steps.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

from common import machine_info, make_pairs, write_section  # noqa: E402
from spo_jax.compile_cache import enable_compile_cache  # noqa: E402
from spo_jax_train import VARIANTS, Bench, make_config, versions  # noqa: E402

LABELS = {
    "Attention.attend": "attention: scores, softmax, weighted sum, o_proj",
    "Attention.qkv": "attention: q/k/v projections",
    "apply_rope": "RoPE",
    "MLP.__call__": "MLP",
    "RMSNorm.__call__": "RMSNorm",
    "Decoder.embed_inputs": "embedding gather",
    "Decoder.__call__": "decoder (masks, residual glue)",
    "Block.__call__": "residual adds",
}
_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S")
_META = re.compile(r"metadata=\{([^}]*)\}")


def parse_hlo(text: str) -> dict:
    """instruction name -> (op_name, [(file, function, line), ...] innermost first) from HLO text."""
    tables: dict[str, dict[int, str]] = {s: {} for s in _SECTIONS}
    section = None
    instrs = {}
    for line in text.splitlines():
        s = line.strip()
        if s in _SECTIONS:
            section = s
            continue
        if section and re.match(r"^\d+ ", s):
            n, rest = s.split(" ", 1)
            tables[section][int(n)] = rest
            continue
        section = None
        m = _INSTR.match(line)
        if m:
            meta_m = _META.search(line)
            meta = meta_m.group(1) if meta_m else ""
            op = re.search(r'op_name="([^"]*)"', meta)
            frame = re.search(r"stack_frame_id=(\d+)", meta)
            instrs[m.group(1)] = (op.group(1) if op else "", int(frame.group(1)) if frame else 0)
    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    funcs = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locs = {k: dict((a, int(b)) for a, b in re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["FileLocations"].items()}
    frames = {k: dict((a, int(b)) for a, b in re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["StackFrames"].items()}

    def stack(frame_id: int) -> list[tuple[str, str, int]]:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:  # parent_frame_id is the parent's id + 1 (0: none)
            seen.add(frame_id)
            loc = locs.get(frames[frame_id]["file_location_id"], {})
            out.append((files.get(loc.get("file_name_id"), "?"), funcs.get(loc.get("function_name_id"), "?"),
                        loc.get("line", 0)))
            frame_id = frames[frame_id].get("parent_frame_id", 0) - 1
        return out

    return {name: (op, stack(fid)) for name, (op, fid) in instrs.items()}


def classify(op_name: str, stack: list[tuple[str, str, int]]) -> tuple[str, str]:
    """(phase, component) of one HLO instruction from its op_name and Python stack."""
    fns = [f for _, f, _ in stack]
    if any(f in ("_with_ref", "with_reference") for f in fns):
        phase = "reference forward"
    elif any("solver" in f or "objective" in f for f in fns):
        phase = "policy backward" if "transpose(" in op_name else "policy forward"
    elif any("/optax/" in path for path, _, _ in stack):
        phase = "optimizer (AdamW)"
    else:
        phase = "rest of the step"
    component = "other"
    for i, (path, fn, _) in enumerate(stack):
        if f"{os.sep}spo_jax{os.sep}" in path and f"{os.sep}benchmarks{os.sep}" not in path:
            linear = any(f == "Linear.__call__" for _, f, _ in stack[:i])
            base = os.path.basename(path)
            if base == "logprobs.py":
                component = "log-probs (unembedding matmul, log-softmax)"
            elif base in ("losses.py", "bilevel.py") or "objective" in fn:
                component = "loss"
            else:
                component = LABELS.get(fn, f"{base}:{fn}") + (" (Linear)" if linear and fn != "Attention.qkv" else "")
            break
    if phase == "optimizer (AdamW)":
        component = "AdamW update"
    return phase, component


def trace_events(path: str) -> collections.Counter:
    """instruction name -> summed duration (ns) of the XLA CPU runtime's events in an .xplane.pb."""
    total: collections.Counter = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for e in line.events:
                name = e.name
                if "::" in name or name.startswith("end: "):
                    continue
                total[name] += e.duration_ns
    return total


def measure(variant: str, *, pairs: int, prompt_len: int, response_len: int, steps: int,
            model_config: dict | None = None, log=print) -> dict:
    rows = make_pairs(pairs * 2, prompt_len, response_len, seed=0,
                      vocab=(model_config or {}).get("vocab_size"))
    c = make_config(variant, pairs=pairs, max_length=prompt_len + response_len, model_config=model_config)
    bench = Bench(c, rows, num_batches=2)
    bench.step()
    bench.step()  # both batches compiled and warm
    hlo = bench.steps["main"].lower(bench.state, bench.batches[0]).compile().as_text()
    info = parse_hlo(hlo)
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            dt, _ = bench.step()
            walls.append(dt)
            cpus.append(bench.last_cpu)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
        events = trace_events(path)
    by = collections.defaultdict(float)
    ops = []
    unknown = 0.0
    for name, ns in events.items():
        sec = ns / 1e9 / steps
        if name not in info:
            unknown += sec
            by[("rest of the step", "(not in the module's HLO)")] += sec
            continue
        op, stack = info[name]
        phase, comp = classify(op, stack)
        by[(phase, comp)] += sec
        ops.append((sec, name, phase, comp, op))
    ops.sort(reverse=True)
    log(f"{variant}: step {statistics.median(walls):.2f} s wall, {statistics.median(cpus):.2f} CPU s, "
        f"{sum(by.values()):.2f} s summed over instructions")
    return dict(variant=variant, walls=walls, cpus=cpus, by=dict(by), top=ops[:12], tokens=bench.tokens[0],
                shape=bench.shapes[0], num_params=bench.num_params, unknown=unknown,
                instructions=len(info), traced=len(events))


def table(res: dict) -> list[str]:
    total = sum(res["by"].values())
    phases = collections.defaultdict(float)
    comps = collections.defaultdict(float)
    for (p, c), s in res["by"].items():
        phases[p] += s
        comps[c] += s
    lines = [f"**{res['variant']}** ({VARIANTS[res['variant']]}): batch {list(res['shape'])}, {res['tokens']} real "
             f"tokens; step {statistics.median(res['walls']):.2f} s wall (min {min(res['walls']):.2f}), "
             f"{statistics.median(res['cpus']):.2f} CPU s; instructions' summed time {total:.2f} s per step.", "",
             "| phase | s per step | share |", "|---|---|---|"]
    lines += [f"| {p} | {s:.3f} | {s / total:.1%} |" for p, s in sorted(phases.items(), key=lambda x: -x[1])]
    lines += ["", "| component (all phases) | s per step | share |", "|---|---|---|"]
    lines += [f"| {c} | {s:.3f} | {s / total:.1%} |" for c, s in sorted(comps.items(), key=lambda x: -x[1])
              if s / total >= 0.005]
    lines += ["", "| largest instructions | phase | component | s per step | share |", "|---|---|---|---|---|"]
    lines += [f"| `{n}` ({op.split('/')[-1]}) | {p} | {c} | {s:.3f} | {s / total:.1%} |"
              for s, n, p, c, op in res["top"][:8]]
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", nargs="+", default=["dpo"], choices=sorted(VARIANTS))
    p.add_argument("--pairs-per-step", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="traced steps (after two warm-up steps)")
    p.add_argument("--write", default="", help="replace the 'profile' section of this RESULTS.md")
    a = p.parse_args(argv)
    # the HLO text comes from a second compilation of the step: let it hit the persistent cache
    with tempfile.TemporaryDirectory() as cache:
        enable_compile_cache(cache)
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        results = [measure(v, pairs=a.pairs_per_step, prompt_len=a.prompt_len, response_len=a.response_len,
                           steps=a.steps, log=lambda s: print(s, flush=True)) for v in a.variant]
        load1, total = os.getloadavg()[0], time.perf_counter() - t0
    m, v = machine_info(), versions()
    body = [
        "## Where the train step's time goes (`benchmarks/profile_step.py`)",
        "",
        f"Command: `python benchmarks/profile_step.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"({total:.0f} s). Machine: {m['cpu']}, {m['cores']} cores, backend {v['backend']}; jax {v['jax']}. "
        f"Model: common.LLAMA_CONFIG, fp32; {a.pairs_per_step} pairs of prompt {a.prompt_len} + response "
        f"{a.response_len}; {a.steps} traced steps after two warm-up steps. 1-min load average {load0:.2f} "
        f"before, {load1:.2f} after (shared cores). Method: the script's docstring (XLA CPU runtime events per "
        "HLO instruction, attributed through the instruction's Python stack).",
    ]
    for r in results:
        body += [""] + table(r)
    text = "\n".join(body)
    print(text)
    if a.write:
        write_section(a.write, "profile", text)


if __name__ == "__main__":
    main()
