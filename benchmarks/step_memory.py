"""Where a SmolLM2-135M training step's memory goes: XLA's memory analysis of the trainer's step.

Compiles (does not run) the trainer's jitted step (``spo_jax.train.make_train_step``) for a
randomly initialised model of SmolLM2-135M-Instruct's shape (30 layers, hidden 576, MLP 1536,
9 heads / 3 KV heads, vocab 49152, tied embedding; 134.5 M parameters), fp32, DPO with cached
reference log-probs, 8 pairs per optimizer step at 192 tokens per sequence (the shape of
``experiments/smollm2.py --size cpu``'s part 1), for micro-batches of 8, 4 and 1 pairs
(``optim.grad_accum_steps`` 1, 2, 8) with and without per-layer rematerialisation
(``model.remat``). XLA's ``compile().memory_analysis()`` splits the step's device memory into
arguments (the train state -- parameters and AdamW moments -- and the batch), outputs (the new
state, aliased onto the arguments: donated), and temporaries (activations kept for the backward
pass, gradients, the gradient accumulator, optimizer intermediates); the peak the step adds
to what is already resident is about its temporaries.

    python benchmarks/step_memory.py            # prints the table
    python benchmarks/step_memory.py --write    # also updates benchmarks/RESULTS.md

Nothing is downloaded; about 5 minutes on 2 CPU cores (6 compiles).
"""

from __future__ import annotations

import argparse
import os
import sys
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
            model_config: dict = SMOLLM2_135M) -> dict:
    c = make_config("dpo_cached", pairs=pairs, max_length=prompt_len + response_len, model_config=model_config,
                    extra={"optim.grad_accum_steps": accum, "model.remat": remat})
    bench = Bench(c, make_pairs(pairs, prompt_len, response_len, seed=0), num_batches=1)
    batch = bench.batches[0]
    if accum > 1:  # the trainer's layout: a leading micro-batch axis [A, S / A, ...]
        batch = jax.tree.map(lambda x: np.asarray(x).reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    t = time.perf_counter()
    m = bench.train_step.lower(bench.state, batch).compile().memory_analysis()
    state = sum(x.nbytes for x in jax.tree.leaves(bench.state))
    return dict(micro_pairs=pairs // accum, accum=accum, remat=remat, state_gb=state / GB,
                argument_gb=m.argument_size_in_bytes / GB, output_gb=m.output_size_in_bytes / GB,
                alias_gb=m.alias_size_in_bytes / GB, temp_gb=m.temp_size_in_bytes / GB, compile_s=time.perf_counter() - t,
                num_params=bench.num_params, shape=list(np.asarray(bench.batches[0]["input_ids"]).shape))


def table(rows: list[dict]) -> str:
    out = ["| micro-batch (pairs) | grad_accum_steps | remat | arguments GB (state + batch) | outputs GB "
           "(aliased onto arguments) | temporaries GB |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['micro_pairs']} | {r['accum']} | {'on' if r['remat'] else 'off'} | {r['argument_gb']:.2f} "
                   f"| {r['output_gb']:.2f} ({r['alias_gb']:.2f}) | **{r['temp_gb']:.2f}** |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--response-len", type=int, default=96)
    p.add_argument("--accum", default="1,2,8", help="optim.grad_accum_steps values")
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    a = p.parse_args()
    t0 = time.time()
    rows = []
    for accum in (int(x) for x in a.accum.split(",")):
        for remat in (False, True):
            r = analyse(accum, remat, a.pairs, a.prompt_len, a.response_len)
            rows.append(r)
            print(f"micro {r['micro_pairs']} pairs, remat {remat}: temp {r['temp_gb']:.2f} GB, arguments "
                  f"{r['argument_gb']:.2f} GB, outputs {r['output_gb']:.2f} GB (aliased {r['alias_gb']:.2f}), "
                  f"compile {r['compile_s']:.0f} s", flush=True)
    m = machine_info()
    body = (f"Command: `python benchmarks/step_memory.py {' '.join(sys.argv[1:])}` ({time.time() - t0:.0f} s; "
            f"{time.strftime('%Y-%m-%d', time.gmtime())}). Machine: {m}; nothing is executed, only compiled, so "
            f"the load does not matter. Model: SmolLM2-135M-Instruct's shape ({rows[0]['num_params'] / 1e6:.1f} M "
            f"parameters, random init), fp32; DPO with cached reference log-probs, {a.pairs} pairs per optimizer "
            f"step, prompt {a.prompt_len} + response {a.response_len} tokens (padded batch {rows[0]['shape']}); "
            f"train state (parameters + AdamW moments) {rows[0]['state_gb']:.2f} GB. XLA's "
            "`compile().memory_analysis()` of the trainer's step.\n\n" + table(rows) + "\n")
    print(body)
    if a.write:
        write_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                      "step_memory", "## Where a SmolLM2-135M step's memory goes (`benchmarks/step_memory.py`)\n\n"
                      + body)


if __name__ == "__main__":
    main()
