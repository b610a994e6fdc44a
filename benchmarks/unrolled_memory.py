"""Memory of the ``unrolled`` SPO solver as the number of inner steps K grows.

Measures XLA's compiled memory analysis (``jit(solver).lower(...).compile()
.memory_analysis()``: temp bytes = activations, saved residuals and scan carries
of the whole step; argument bytes = params + batch) of one unrolled solver step
(``spo_jax.objectives.make_spo_solver`` with solver="unrolled", DPO upper loss, SGD
inner loop) for K = 1..8, with the inner step under ``jax.checkpoint``
(remat=True, the default) and, for contrast, without it. The penalty solver
(no inner loop) is the baseline row.

Model: ``spo_jax.models``' Llama decoder (3 layers, width 128, 4 heads, MLP
512, vocab 57, T = 84, 32 pairs = 64 sequences per batch, fp32) with the
trainer's log-prob function (``spo_jax.objectives.make_logps_fn``).

Run (CPU is fine; nothing is executed, only compiled)::

    python benchmarks/unrolled_memory.py            # prints the table
    python benchmarks/unrolled_memory.py --write    # also updates benchmarks/RESULTS.md

Target: temp bytes at K = 8 at most 1.5x those at K = 1 with remat.
"""

from __future__ import annotations

import argparse
import pathlib
import platform

import jax
import numpy as np

from flax import nnx

from spo_jax import bilevel, losses, models, objectives

LAYERS, WIDTH, HEADS, MLP, VOCAB, SEQ, PAIRS = 3, 128, 4, 512, 57, 84, 32
MARK_OPEN, MARK_CLOSE = "<!-- unrolled_memory -->", "<!-- /unrolled_memory -->"


def build():
    """spo_jax.models' Llama decoder at the demo's size and the trainer's chunked log-prob function."""
    cfg = models.ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=128))
    graphdef, params = nnx.split(models.create_model(cfg, rngs=nnx.Rngs(0)))
    return params, objectives.make_logps_fn(graphdef, seq_chunk=128)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    s = 2 * PAIRS
    ids = rng.integers(1, VOCAB, size=(s, SEQ)).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((s, 1), np.int32)], axis=1)
    mask = np.zeros((s, SEQ), np.float32)
    mask[:, 30:SEQ - 1] = 1.0
    return dict(input_ids=ids, targets=targets, loss_mask=mask,
                positions=np.broadcast_to(np.arange(SEQ, dtype=np.int32), (s, SEQ)).copy(),
                segment_ids=np.ones((s, SEQ), np.int32), seq_ids=np.repeat(np.arange(s, dtype=np.int32)[:, None], SEQ, 1),
                ref_logps=rng.normal(-100.0, 5.0, size=s).astype(np.float32),
                seq_valid=np.ones(s, np.float32))


def compiled_memory(cfg, params, batch, logps_fn):
    solver = objectives.make_spo_solver(logps_fn, losses.get_loss("dpo", beta=0.1), cfg)
    stats = jax.jit(solver).lower(params, batch).compile().memory_analysis()
    return stats.temp_size_in_bytes, stats.argument_size_in_bytes


def run(max_k=8):
    params, logps_fn = build()
    batch = make_batch()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    base, args = compiled_memory(bilevel.SPOConfig(solver="penalty"), params, batch, logps_fn)
    rows = []
    for k in range(1, max_k + 1):
        remat, _ = compiled_memory(bilevel.SPOConfig(solver="unrolled", inner_steps=k, remat=True), params, batch, logps_fn)
        plain, _ = compiled_memory(bilevel.SPOConfig(solver="unrolled", inner_steps=k, remat=False), params, batch, logps_fn)
        rows.append((k, remat, plain))
    mib = 2.0**20
    lines = [
        f"Unrolled-solver step memory (XLA compiled temp bytes; {jax.default_backend()}, jax {jax.__version__}, "
        f"{platform.machine()}). Model: spo_jax.models Llama decoder (trainer's chunked log-probs), {LAYERS} layers, width {WIDTH}, "
        f"{HEADS} heads, MLP {MLP}, vocab {VOCAB}, T={SEQ}, {PAIRS} pairs ({2 * PAIRS} sequences), "
        f"{n_params / 1e6:.2f}M fp32 params ({n_params * 4 / mib:.1f} MiB); DPO upper loss, SGD inner steps, "
        f"gamma=10 reference penalty at theta_K. Arguments (params + batch): {args / mib:.1f} MiB. "
        f"Penalty solver (no inner loop): {base / mib:.1f} MiB temp.",
        "",
        "| K | temp MiB, remat | ratio to K=1 | temp MiB, no remat | ratio to K=1 |",
        "|---|---|---|---|---|",
    ]
    for k, remat, plain in rows:
        lines.append(f"| {k} | {remat / mib:.1f} | {remat / rows[0][1]:.2f} | {plain / mib:.1f} | "
                     f"{plain / rows[0][2]:.2f} |")
    if len(rows) > 2:
        lines += ["", f"With remat the K={rows[-1][0]} step needs {rows[-1][1] / rows[0][1]:.2f}x the K=1 temp memory "
                  f"and {rows[-1][1] / rows[1][1]:.2f}x the K=2 figure (target: at most 1.5x K=1); without remat "
                  f"it grows linearly ({rows[-1][2] / rows[0][2]:.2f}x). K=1 is compiled differently (XLA "
                  "simplifies a length-1 scan, so its residuals are not rematerialised), hence its larger figure."]
    lines += ["", "Command: `python benchmarks/unrolled_memory.py --write`"]
    return "\n".join(lines), rows


def write_results(text, path=pathlib.Path(__file__).with_name("RESULTS.md")):
    """Replace only this benchmark's section (between the markers) in RESULTS.md."""
    section = f"{MARK_OPEN}\n## Unrolled solver memory vs inner steps K\n\n{text}\n{MARK_CLOSE}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if MARK_OPEN in old and MARK_CLOSE in old:
        head, rest = old.split(MARK_OPEN, 1)
        new = head + section + rest.split(MARK_CLOSE, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(new)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-k", type=int, default=8)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    text, _ = run(args.max_k)
    print(text)
    if args.write:
        write_results(text)


if __name__ == "__main__":
    main()
