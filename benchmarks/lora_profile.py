"""Where a LoRA DPO step's time goes: ``benchmarks/profile_step.py``'s attribution (XLA CPU runtime events
per HLO instruction, attributed through the instruction's Python stack) on the trainer's own LoRA step.

Model: SmolLM2-135M's shape (random weights; ``--layers`` decoder layers, the full 30 by default) with
LoRA rank 16 / alpha 32 on every projection, fp32; 8 pairs of prompt 128 + response 128 (``make_pairs``),
DPO with a cached (``--reference cached``) or online reference, AdamW. One warm-up step, then ``--steps``
traced steps::

    python benchmarks/lora_profile.py --layers 2 --reference cached --steps 2

Prints the step's XLA FLOPs, the traced wall times, the summed time per (phase, component) and the
largest instructions.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import lora as bench_lora  # noqa: E402
import profile_step  # noqa: E402
from common import make_pairs, peak_rss_mib  # noqa: E402
from spo_jax import adapters, inputs, models, optim, train  # noqa: E402
from spo_jax import sharding as sharding_lib  # noqa: E402
from spo_jax.data import BatchIterator  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--reference", default="cached", choices=["cached", "online"])
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--attention", default="einsum", help="models.set_attention's implementation (einsum, xla)")
    p.add_argument("--hlo", default="", help="write the compiled step's HLO text to this file")
    p.add_argument("--top", type=int, default=12, help="how many of the largest instructions to list")
    a = p.parse_args()
    P = R = 128
    cfg = dict(bench_lora.SMOLLM2_SHAPE, num_hidden_layers=a.layers)
    c = bench_lora.make_config("lora", model_path="", model_config=cfg, pairs=a.pairs, max_length=P + R)
    c.reference.mode = a.reference
    mesh = sharding_lib.make_mesh((-1, 1, 1))
    model = inputs.build_model(c)
    models.set_attention(model, a.attention)
    policy, params, frozen = adapters.split_policy(c, model)
    tx, schedule = optim.make_optimizer(c)
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(0), ref_params=None, frozen=frozen)
    shardings = sharding_lib.param_shardings(jax.eval_shape(lambda: state), mesh)
    state = jax.device_put(state, shardings)
    step = train.make_train_step(c, policy, tx, schedule, mesh, shardings)
    rows = make_pairs(a.pairs * (a.steps + 1), P, R, seed=0, vocab=cfg["vocab_size"])
    ds = datasets.Dataset.from_dict(dict(prompt_ids=[r["prompt"] for r in rows], chosen_ids=[r["chosen"] for r in rows],
                                         rejected_ids=[r["rejected"] for r in rows],
                                         example_index=list(range(len(rows)))))
    it = BatchIterator(ds, batch_size=a.pairs, max_length=P + R, packing=False, shuffle=False, seed=0, num_epochs=1,
                       pad_id=0, length_bucket="pow2")
    batches = []
    for b in it:  # a cached reference's log-probs: any fixed values time the same step
        if a.reference == "cached":
            b = dict(b, ref_logps=np.full((b["input_ids"].shape[0],), -100.0, np.float32))
        batches.append(sharding_lib.make_global_batch(b, mesh))
    compiled = step.lower(state, batches[0]).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    info = profile_step.parse_hlo(compiled.as_text())
    if a.hlo:
        with open(a.hlo, "w") as f:
            f.write(compiled.as_text())
    state, _ = compiled(state, batches[0])
    jax.block_until_ready(state)
    walls = []
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for b in batches[1:a.steps + 1]:
            t = time.perf_counter()
            state, m = compiled(state, b)
            jax.block_until_ready(state)
            walls.append(time.perf_counter() - t)
        jax.profiler.stop_trace()
        events = profile_step.trace_events(sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1])
    by, ops = collections.defaultdict(float), []
    for name, ns in events.items():
        sec = ns / 1e9 / len(walls)
        op, stack = info.get(name, ("", []))
        key = profile_step.classify(op, stack) if name in info else ("rest of the step", "(not in the HLO)")
        by[key] += sec
        ops.append((sec, name, *key, op))
    total = sum(by.values())
    print(f"layers {a.layers}, reference {a.reference}, batch {batches[0]['input_ids'].shape}: XLA flops "
          f"{ca.get('flops', 0) / 1e12:.3f} T per step; steps {[round(w, 2) for w in walls]} s wall; summed "
          f"instruction time {total:.2f} s per step; peak RSS {peak_rss_mib() / 1024:.2f} GiB; load "
          f"{os.getloadavg()[0]:.1f}")
    print("| phase | component | s per step | share |\n|---|---|---:|---:|")
    for (ph, comp), s in sorted(by.items(), key=lambda x: -x[1]):
        if s / total >= 0.005:
            print(f"| {ph} | {comp} | {s:.2f} | {s / total:.1%} |")
    print("\nlargest instructions:")
    for s, n, ph, comp, op in sorted(ops, reverse=True)[:a.top]:
        print(f"  {s:7.3f} s  {n}  [{ph} / {comp}]  {op[-90:]}")


if __name__ == "__main__":
    main()
