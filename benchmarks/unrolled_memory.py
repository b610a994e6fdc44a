"""Memory of the ``unrolled`` SPO solver as the number of inner steps K grows.

Measures XLA's compiled memory analysis (``jit(solver).lower(...).compile()
.memory_analysis()``: temp bytes = activations, saved residuals and scan carries
of the whole step; argument bytes = params + batch) of one unrolled solver step
(``spo_jax.bilevel.make_solver`` with solver="unrolled", DPO upper loss, SGD
inner loop) for K = 1..8, with the inner step under ``jax.checkpoint``
(remat=True, the default) and, for contrast, without it. The penalty solver
(no inner loop) is the baseline row.

Model: a self-contained pre-LN causal decoder written here in pure JAX (the
demo's size: 3 layers, width 128, 4 heads, MLP 512, vocab 57, T = 84, 32 pairs
= 64 sequences per batch, ≈0.6M parameters, fp32). It is not
``spo_jax.models`` (which had not landed when this was written); the memory
behaviour depends only on parameter and activation sizes.

Run (CPU is fine; nothing is executed, only compiled)::

    python benchmarks/unrolled_memory.py            # prints the table
    python benchmarks/unrolled_memory.py --write    # also updates benchmarks/RESULTS.md

Target: temp bytes at K = 8 at most 1.5x those at K = 1 with remat.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np

from spo_jax import bilevel, losses

LAYERS, WIDTH, HEADS, MLP, VOCAB, SEQ, PAIRS = 3, 128, 4, 512, 57, 84, 32
MARK_OPEN, MARK_CLOSE = "<!-- unrolled_memory -->", "<!-- /unrolled_memory -->"


def init_params(key):
    keys = iter(jax.random.split(key, 4 + 4 * LAYERS))

    def dense(shape):
        return jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(shape[0])

    layers = [dict(qkv=dense((WIDTH, 3 * WIDTH)), out=dense((WIDTH, WIDTH)), up=dense((WIDTH, MLP)),
                   down=dense((MLP, WIDTH)), ln1=jnp.ones(WIDTH), ln2=jnp.ones(WIDTH))
              for _ in range(LAYERS)]
    return dict(embed=dense((VOCAB, WIDTH)), pos=0.02 * dense((SEQ, WIDTH)), layers=layers,
                ln_f=jnp.ones(WIDTH), unembed=dense((WIDTH, VOCAB)))


def _norm(x, scale):
    return scale * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def hidden_states(params, ids_BT):
    b, t = ids_BT.shape
    x = params["embed"][ids_BT] + params["pos"][:t]
    causal = jnp.tril(jnp.ones((t, t), bool))
    for layer in params["layers"]:
        q, k, v = jnp.split(_norm(x, layer["ln1"]) @ layer["qkv"], 3, axis=-1)
        q, k, v = (z.reshape(b, t, HEADS, WIDTH // HEADS) for z in (q, k, v))
        att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(WIDTH // HEADS)
        att = jax.nn.softmax(jnp.where(causal, att, -1e30), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, WIDTH) @ layer["out"]
        x = x + jax.nn.gelu(_norm(x, layer["ln2"]) @ layer["up"]) @ layer["down"]
    return _norm(x, params["ln_f"])


def logps_fn(params, batch):
    """(sums_S, counts_S): summed response log-probs per sequence (padded: row = sequence)."""
    logits = hidden_states(params, batch["input_ids"]) @ params["unembed"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    return jnp.sum(tok * mask, axis=1), jnp.sum(mask, axis=1)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    s = 2 * PAIRS
    ids = rng.integers(1, VOCAB, size=(s, SEQ)).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((s, 1), np.int32)], axis=1)
    mask = np.zeros((s, SEQ), np.float32)
    mask[:, 30:SEQ - 1] = 1.0
    return dict(input_ids=ids, targets=targets, loss_mask=mask,
                ref_logps=rng.normal(-100.0, 5.0, size=s).astype(np.float32),
                seq_valid=np.ones(s, np.float32))


def compiled_memory(cfg, params, batch):
    solver = bilevel.make_solver(logps_fn, losses.get_loss("dpo", beta=0.1), cfg)
    stats = jax.jit(solver).lower(params, batch).compile().memory_analysis()
    return stats.temp_size_in_bytes, stats.argument_size_in_bytes


def run(max_k=8):
    params = init_params(jax.random.key(0))
    batch = make_batch()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    base, args = compiled_memory(bilevel.SPOConfig(solver="penalty"), params, batch)
    rows = []
    for k in range(1, max_k + 1):
        remat, _ = compiled_memory(bilevel.SPOConfig(solver="unrolled", inner_steps=k, remat=True), params, batch)
        plain, _ = compiled_memory(bilevel.SPOConfig(solver="unrolled", inner_steps=k, remat=False), params, batch)
        rows.append((k, remat, plain))
    mib = 2.0**20
    lines = [
        f"Unrolled-solver step memory (XLA compiled temp bytes; {jax.default_backend()}, jax {jax.__version__}, "
        f"{platform.machine()}). Model: self-written pre-LN causal decoder, {LAYERS} layers, width {WIDTH}, "
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
