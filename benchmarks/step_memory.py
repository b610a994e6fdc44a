"""Where a SmolLM2-135M training step's memory goes: XLA's memory analysis of the trainer's step.

Compiles (does not run) the trainer's jitted step (``spo_jax.train.make_train_step``) for a
randomly initialised model of SmolLM2-135M-Instruct's shape (30 layers, hidden 576, MLP 1536,
9 heads / 3 KV heads, vocab 49152, tied embedding; 134.5 M parameters), fp32, DPO with cached
reference log-probs, 8 pairs per optimizer step at 192 tokens per sequence (the shape of
``experiments/smollm2.py --size cpu``'s part 1). XLA's ``compile().memory_analysis()`` splits the
step's device memory into arguments (the train state -- parameters and AdamW moments -- and the
batch), outputs (the new state, aliased onto the arguments: donated), and temporaries (activations
kept for the backward pass, gradients, the gradient accumulator, optimizer intermediates); the peak
the step adds to what is already resident is about its temporaries. Rows:

- micro-batches of 8 and 1 pairs (``optim.grad_accum_steps`` 1 and 8), with and without per-layer
  rematerialisation (``model.remat``);
- 8 pairs with the log-prob computation chunked finer (``logprobs.seq_chunk`` 32,
  ``logprobs.vocab_chunk`` 8192);
- the same model with 4 and 8 layers (what one layer adds, with and without remat);
- ``--peak``: the buffers live at the step's memory peak, by kind, read from XLA's buffer live
  ranges (the compile of the 8-pair, remat-on step dumped with ``--xla_dump_to``; a fresh process).

    python benchmarks/step_memory.py                    # prints the table
    python benchmarks/step_memory.py --peak --write     # also the peak's buffers; updates RESULTS.md

Nothing is downloaded; about 5 minutes on 2 CPU cores (10 compiles, 11 with --peak).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_info, make_pairs, write_section  # noqa: E402
from spo_jax_train import Bench, make_config  # noqa: E402

#: SmolLM2-135M-Instruct's config.json (the fields our Llama decoder reads).
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, hidden_act="silu")
GB = 1e9


def analyse(accum: int, remat: bool, pairs: int, prompt_len: int, response_len: int,
            model_config: dict = SMOLLM2_135M, extra: dict | None = None) -> dict:
    c = make_config("dpo_cached", pairs=pairs, max_length=prompt_len + response_len, model_config=model_config,
                    extra={"optim.grad_accum_steps": accum, "model.remat": remat, **(extra or {})})
    bench = Bench(c, make_pairs(pairs, prompt_len, response_len, seed=0), num_batches=1)
    batch = bench.batches[0]
    if accum > 1:  # the trainer's layout: a leading micro-batch axis [A, S / A, ...]
        batch = jax.tree.map(lambda x: np.asarray(x).reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    t = time.perf_counter()
    m = bench.train_step.lower(bench.state, batch).compile().memory_analysis()
    state = sum(x.nbytes for x in jax.tree.leaves(bench.state))
    return dict(micro_pairs=pairs // accum, accum=accum, remat=remat, layers=model_config["num_hidden_layers"],
                extra=extra or {}, state_gb=state / GB,
                argument_gb=m.argument_size_in_bytes / GB, output_gb=m.output_size_in_bytes / GB,
                alias_gb=m.alias_size_in_bytes / GB, temp_gb=m.temp_size_in_bytes / GB, compile_s=time.perf_counter() - t,
                num_params=bench.num_params, shape=list(np.asarray(bench.batches[0]["input_ids"]).shape))


def peak_buffers(dump_dir: str, vocab: int) -> dict:
    """Bytes live at the step's memory peak by kind, from XLA's dump of the compiled step (its buffer live
    ranges, "Live ranges at N (peak)", and the optimized HLO for each buffer's shape and source op)."""
    live = glob.glob(os.path.join(dump_dir, "*jit_step*after_optimizations-live-range.txt"))
    hlo = glob.glob(os.path.join(dump_dir, "*jit_step*cpu_after_optimizations.txt"))
    if not live or not hlo:
        raise SystemExit(f"no live-range dump of the step in {dump_dir}: this XLA does not write one")
    shapes, ops = {}, {}
    for line in open(hlo[0], encoding="utf-8"):
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \(?\w+\[([\d,]*)\]", line)
        if m and m.group(1) not in shapes:
            shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(",") if d)
            op = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = op.group(1) if op else ""
    text = open(live[0], encoding="utf-8").read()
    peak = text[text.index("(peak):"):].splitlines()[1:]
    params = {shape for name, shape in shapes.items() if name.startswith("state_params")}
    kinds: dict[str, float] = {}
    for line in peak:
        m = re.match(r"\s+(\S+)\{[^}]*\}: (\d+) bytes", line)
        if not m:
            break
        name, size = m.group(1), int(m.group(2))
        shape = shapes.get(name, ())
        if name.startswith("state_"):
            kind = "train state (parameters, AdamW moments)"
        elif shape in params or shape[::-1] in params:
            kind = "parameter-shaped (gradients, their transposes, AdamW updates)"
        elif vocab in shape:
            kind = "log-prob chunk: logits and softmax over the vocabulary"
        else:
            kind = "activations (the layers' forward values kept for the backward, and their gradients)"
        kinds[kind] = kinds.get(kind, 0.0) + size / GB
    return kinds


def table(rows: list[dict]) -> str:
    out = ["| micro-batch (pairs) | grad_accum_steps | layers | remat | other settings | arguments GB (state + batch) "
           "| outputs GB (aliased onto arguments) | temporaries GB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        other = ", ".join(f"`{k}` {v}" for k, v in r["extra"].items()) or "-"
        out.append(f"| {r['micro_pairs']} | {r['accum']} | {r['layers']} | {'on' if r['remat'] else 'off'} | {other} "
                   f"| {r['argument_gb']:.2f} | {r['output_gb']:.2f} ({r['alias_gb']:.2f}) | **{r['temp_gb']:.2f}** |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--response-len", type=int, default=96)
    p.add_argument("--peak", action="store_true", help="also the buffers live at the 8-pair remat-on step's peak")
    p.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)  # (the --peak subprocess: compiles only)
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    a = p.parse_args()
    lens = (a.pairs, a.prompt_len, a.response_len)
    if a.peak_child:
        analyse(1, True, *lens)
        return
    t0 = time.time()
    runs = [dict(accum=1, remat=False), dict(accum=1, remat=True), dict(accum=a.pairs, remat=False),
            dict(accum=a.pairs, remat=True),
            dict(accum=1, remat=False, extra={"logprobs.seq_chunk": 32, "logprobs.vocab_chunk": 8192})]
    runs += [dict(accum=1, remat=remat, model_config=dict(SMOLLM2_135M, num_hidden_layers=n))
             for n in (4, 8) for remat in (False, True)]
    rows = []
    for run in runs:
        r = analyse(run["accum"], run["remat"], *lens, model_config=run.get("model_config", SMOLLM2_135M),
                    extra=run.get("extra"))
        rows.append(r)
        print(f"micro {r['micro_pairs']} pairs, {r['layers']} layers, remat {r['remat']} {r['extra']}: temp "
              f"{r['temp_gb']:.2f} GB, arguments {r['argument_gb']:.2f} GB, outputs {r['output_gb']:.2f} GB "
              f"(aliased {r['alias_gb']:.2f}), compile {r['compile_s']:.0f} s", flush=True)
    peak = ""
    if a.peak:
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={d} --xla_dump_hlo_as_text "
                                             "--xla_dump_hlo_module_re=.*jit_step.*")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-child", "1", "--pairs", str(a.pairs),
                            "--prompt-len", str(a.prompt_len), "--response-len", str(a.response_len)],
                           env=env, check=True)
            kinds = peak_buffers(d, SMOLLM2_135M["vocab_size"])
        peak = (f"\nBuffers live at the peak of the {a.pairs}-pair, remat-on step (XLA's buffer live ranges; "
                f"{sum(kinds.values()):.2f} GB in all):\n\n| kind | GB |\n|---|---|\n"
                + "\n".join(f"| {k} | {v:.2f} |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + "\n")
        print(peak)
    m = machine_info()
    body = (f"Command: `python benchmarks/step_memory.py {' '.join(sys.argv[1:])}` ({time.time() - t0:.0f} s; "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}). Machine: {m}; nothing is executed, only compiled, so "
            f"the load does not matter. Model: SmolLM2-135M-Instruct's shape ({rows[0]['num_params'] / 1e6:.1f} M "
            f"parameters, random init; the layers column: the same with fewer layers), fp32; DPO with cached "
            f"reference log-probs, {a.pairs} pairs per optimizer step, prompt {a.prompt_len} + response "
            f"{a.response_len} tokens (padded batch {rows[0]['shape']}); train state (parameters + AdamW moments) "
            f"{rows[0]['state_gb']:.2f} GB. XLA's `compile().memory_analysis()` of the trainer's step.\n\n"
            + table(rows) + "\n" + peak)
    print(body)
    if a.write:
        write_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                      "step_memory", "## Where a SmolLM2-135M step's memory goes (`benchmarks/step_memory.py`)\n\n"
                      + body)


if __name__ == "__main__":
    main()
