"""One-GPU check of spo_jax's speed: DPO step tokens/s and MFU, SPO overhead, sampling, peak memory.

    python benchmarks/accelerator_check.py                 # one GPU, ~5-8 min, no downloads
    python benchmarks/accelerator_check.py --tiny          # the same code at a tiny size (CPU; the tests)

On a randomly initialised Qwen2.5-0.5B-shaped model (24 layers, hidden 896, 14 query / 2 KV heads,
MLP 4864, vocab 151936, tied embeddings; no weights are downloaded), in bfloat16 compute with float32
master weights:

1. **attention**: ``jax.nn.dot_product_attention`` with cuDNN's fused kernel (GPU only), the same with
   XLA's implementation, and the model's own einsum attention, each timed forward+backward on the step's
   packed shape with its segment mask (two sequences per row); the fastest that works is used below
   (``--attention`` forces one; train with the winner through ``--config.model.attention``); failures
   (e.g. cuDNN unavailable) are reported, not fatal;
2. **DPO step** (the trainer's jitted step, ``make_train_step``, frozen online reference, AdamW) on packed
   rows of ``--seq`` tokens: tokens/s and MFU = model FLOPs / step time / the device's dense bf16 peak;
3. **SPO** (penalty solver, reference value) step time relative to the DPO step, interleaved with it in
   one process on the same state and batches;
4. **sampling**: ``spo_jax.models.generate`` at batch ``--sample-batch`` (greedy, EOS disabled so every
   row generates ``--sample-new`` tokens) from random prompts of ``--sample-prompt`` tokens: tokens/s of
   a second call (the first, which compiles, is reported separately);
5. **peak device memory** after each phase (``memory_stats()['peak_bytes_in_use']``; peak RSS on CPU).

Model FLOPs per step (the MFU numerator): 4 passes' worth of matmul work over the real tokens -- the
policy's forward and backward (3 x 2·N·tokens) and the reference's forward (2·N·tokens), N = the matmul
parameters (every weight matrix; the tied embedding counted once, as the unembedding, since its use as
the input embedding is a gather), the unembedding's D·V counted at the response tokens only (the step
computes log-probs only where ``loss_mask`` is 1: Contract 1's ``score_index``) -- plus causal attention, 4·L·H·hd·s(s+1)/2 per sequence of length s per
forward pass (QK^T and PV over the causal half only). The peaks used (:data:`PEAK_BF16_TFLOPS`) are
vendor dense (no sparsity) bf16 tensor-core numbers; ``--peak-tflops`` overrides them. On a CPU the peak
is measured (``spo_jax.metrics.measure_peak_flops``), which makes the --tiny MFU a smoke value only.

Prints a markdown table and a JSON line; ``--json FILE`` saves the results, ``--write RESULTS.md``
replaces the "accelerator_check" section there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import EOS_ID, PAD_ID, BOS_ID, machine_info, make_pairs, peak_rss_mib, write_section  # noqa: E402
from spo_jax import models  # noqa: E402
from spo_jax.compile_cache import enable_compile_cache  # noqa: E402
from spo_jax_train import Bench, make_config, versions  # noqa: E402

# Qwen/Qwen2.5-0.5B's config.json (architecture fields only; random weights)
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                  tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
# the same family at a size a CPU test compiles in seconds
TINY = dict(QWEN25_05B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

#: device_kind substring -> dense (no sparsity) bf16 TFLOP/s per chip, from the vendors' data sheets.
#: The longest matching key wins ("H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "GH200": 989.0, "H100": 989.0, "H800": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "B200": 2250.0, "B100": 1750.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0,
    "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def peak_tflops_for(device_kind: str) -> float | None:
    """The table's dense bf16 peak for ``device_kind`` (longest matching key), or None."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in device_kind.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def matmul_params(cfg: dict) -> int:
    """Parameters that multiply activations: every layer's projections (+ biases) and the unembedding."""
    D, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or D // H
    attn = D * H * hd + 2 * D * KV * hd + H * hd * D + (H * hd + 2 * KV * hd)  # q, k, v, o + q/k/v biases (qwen2)
    mlp = 3 * D * F
    return L * (attn + mlp) + D * cfg["vocab_size"]


def attention_flops(cfg: dict, seq_lengths) -> float:
    """Forward FLOPs of causal attention (QK^T and PV) over sequences of these lengths."""
    H = cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    return float(sum(4 * cfg["num_hidden_layers"] * H * hd * s * (s + 1) / 2 for s in seq_lengths))


def step_flops(cfg: dict, tokens: int, seq_lengths, scored: int, *, reference: bool = True) -> float:
    """Model FLOPs of one preference step (policy forward + backward, and the reference's forward): the
    layers at every token, the unembedding at the ``scored`` (response) tokens only, which is all the
    step computes (Contract 1's ``score_index``): prompt logits are not part of the objective."""
    unembed = cfg["hidden_size"] * cfg["vocab_size"]
    fwd = 2 * (matmul_params(cfg) - unembed) * tokens + 2 * unembed * scored + attention_flops(cfg, seq_lengths)
    return (3 + (1 if reference else 0)) * fwd


def device_peak_mib() -> float | None:
    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def _timed(fn, *args):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def attention_trials(cfg: dict, rows: int, seq: int, dtype, candidates, log) -> dict:
    """Forward+backward time of one layer's attention per implementation, on [rows, seq] with two packed
    sequences per row (the step's segment mask); {impl: seconds} or {impl: "error: ..."}."""
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // H
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(k1, (rows, seq, H, hd), dtype)
    k = jax.random.normal(k2, (rows, seq, KV, hd), dtype)
    v = jax.random.normal(k3, (rows, seq, KV, hd), dtype)
    seg = jnp.where(jnp.arange(seq) < seq // 2, 1, 2)[None].repeat(rows, 0)
    mask = jnp.tril(jnp.ones((seq, seq), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    mcfg = models.ModelConfig.from_hf(cfg)
    out = {}
    for impl in candidates:
        attn = models.decoder.Attention(mcfg, nnx.Rngs(0), dtype, jnp.float32)
        attn.implementation = impl
        graphdef, params = nnx.split(attn)

        def loss(q, k, v, graphdef=graphdef, params=params):
            return jnp.sum(nnx.merge(graphdef, params).attend(q, k, v, mask, is_causal=True).astype(jnp.float32))
        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        try:
            _timed(f, q, k, v)
            out[impl] = min(_timed(f, q, k, v) for _ in range(3))
            log(f"attention {impl}: {out[impl] * 1e3:.2f} ms forward+backward per layer")
        except Exception as e:  # noqa: BLE001 -- an implementation this device lacks is a result, not a crash
            out[impl] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            log(f"attention {impl}: {out[impl]}")
    return out


def run(a, log=print) -> dict:
    t_start = time.perf_counter()
    backend = jax.default_backend()
    cfg = dict(TINY if a.tiny else QWEN25_05B)
    dtype = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    dev = jax.devices()[0]
    res: dict = dict(versions(), device=dev.device_kind, tiny=a.tiny, dtype=a.dtype, seq=a.seq, pairs=a.pairs,
                     model=cfg)
    if a.peak_tflops:
        res["peak_tflops"], res["peak_source"] = a.peak_tflops, "--peak-tflops"
    elif backend == "cpu":
        from spo_jax.metrics import measure_peak_flops
        res["peak_tflops"] = measure_peak_flops(a.dtype, size=256 if a.tiny else None) / 1e12
        res["peak_source"] = f"measured ({a.dtype} matmul on this CPU)"
    else:
        res["peak_tflops"], res["peak_source"] = peak_tflops_for(dev.device_kind), "table (PEAK_BF16_TFLOPS)"
        if res["peak_tflops"] is None:
            raise SystemExit(f"no dense bf16 peak known for device {dev.device_kind!r}: pass --peak-tflops "
                             "(the vendor's dense bf16 TFLOP/s per chip)")

    # pairs of prompt + response = seq / 2 tokens, so a packed row of `seq` holds two sequences
    half = a.seq // 2
    prompt_len = half // 4
    rows = make_pairs(a.pairs * (a.steps + 1), prompt_len, half - prompt_len, seed=0, vocab=cfg["vocab_size"])

    # 1. attention implementations
    candidates = (["cudnn"] if backend == "gpu" else []) + ["xla", "einsum"]
    if a.attention != "auto":
        candidates = [a.attention]
    trials = attention_trials(cfg, max(1, a.pairs), a.seq, dtype, candidates, log)
    ok = {k: v for k, v in trials.items() if not isinstance(v, str)}
    if not ok:
        raise SystemExit(f"no attention implementation worked: {trials}")
    res["attention_trials"] = trials
    res["attention"] = attention = min(ok, key=ok.get)
    log(f"using attention {attention!r}")

    # 2-3. DPO and SPO steps, interleaved on one state
    # every sequence is seq/2 tokens: `pairs` rows of `seq` hold a step's 2·pairs sequences exactly
    pack_rows = -(-a.pairs // jax.device_count()) * jax.device_count()
    extra = {"data.pack_length": a.seq, "data.pack_rows": pack_rows, "model.remat": a.remat,
             "model.attention": attention}
    c = make_config("dpo", pairs=a.pairs, max_length=a.seq, packing=True, dtype=a.dtype, model_config=cfg,
                    extra=extra)
    t = time.perf_counter()
    bench = Bench(c, rows, num_batches=a.steps)
    bench.add_variant("spo", make_config("penalty_reference", pairs=a.pairs, max_length=a.seq, packing=True,
                                         dtype=a.dtype, model_config=cfg, extra=extra))
    res["setup_s"] = time.perf_counter() - t
    res["num_params"], res["matmul_params"] = bench.num_params, matmul_params(cfg)
    res["batch_shape"] = list(bench.shapes[0])
    t = time.perf_counter()
    bench.step("main")
    res["dpo_first_step_s"] = time.perf_counter() - t
    res["peak_mib_after_dpo"] = device_peak_mib()
    t = time.perf_counter()
    bench.step("spo")
    res["spo_first_step_s"] = time.perf_counter() - t
    res["peak_mib_after_spo"] = device_peak_mib()
    log(f"compiled: DPO step {res['dpo_first_step_s']:.1f} s, SPO step {res['spo_first_step_s']:.1f} s (first calls)")
    dpo, spo, flops = [], [], []
    for r in range(a.rounds):
        for name in (("main", "spo") if r % 2 == 0 else ("spo", "main")):
            b = bench._i % len(bench.batches)
            dt, n = bench.step(name)
            if name == "main":
                dpo.append((dt, n))
                flops.append(step_flops(cfg, n, bench.seq_lengths[b], bench.scored[b]))
            else:
                spo.append((dt, n))
        log(f"round {r}: DPO {dpo[-1][0]:.3f} s, SPO {spo[-1][0]:.3f} s")
    dpo_t = [x[0] for x in dpo]
    tok_s = [n / dt for dt, n in dpo]
    # the batch is split over every device: the peak of all of them (a CPU's measured peak is already the host's)
    chips = 1 if backend == "cpu" else jax.device_count()
    mfu = [f / dt / (res["peak_tflops"] * 1e12 * chips) for f, (dt, _) in zip(flops, dpo)]
    res.update(dpo_step_s=dpo_t, spo_step_s=[x[0] for x in spo], tokens_per_step=dpo[0][1],
               dpo_tokens_per_s=tok_s, mfu=mfu, step_tflop=flops[0] / 1e12,
               spo_over_dpo=[s_[0] / d[0] for s_, d in zip(spo, dpo)])
    del bench

    # 4. sampling
    policy = models.create_model(models.ModelConfig.from_hf(cfg), rngs=nnx.Rngs(0), dtype=dtype)
    models.set_attention(policy, attention)
    prompts = np.random.default_rng(1).integers(3, cfg["vocab_size"], (a.sample_batch, a.sample_prompt))
    mask = np.ones_like(prompts)
    kw = dict(max_new_tokens=a.sample_new, eos_id=())
    t = time.perf_counter()
    jax.block_until_ready(models.generate(policy, prompts, mask, **kw))
    res["sample_first_call_s"] = time.perf_counter() - t
    times = []
    for _ in range(2):
        t = time.perf_counter()
        toks, valid = models.generate(policy, prompts, mask, **kw)
        jax.block_until_ready(toks)
        times.append(time.perf_counter() - t)
    res["sample_tokens"] = int(np.asarray(valid).sum())
    res["sample_s"] = min(times)
    res["sample_tokens_per_s"] = res["sample_tokens"] / res["sample_s"]
    res["peak_mib_after_sampling"] = device_peak_mib()
    res["peak_rss_mib"] = peak_rss_mib()
    res["total_s"] = time.perf_counter() - t_start
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return res


def table(res: dict, command: str) -> str:
    med = statistics.median
    m = machine_info()
    trials = ", ".join(f"{k} {v * 1e3:.2f} ms" if not isinstance(v, str) else f"{k} ({v})"
                       for k, v in res["attention_trials"].items())
    mem = [res.get(k) for k in ("peak_mib_after_dpo", "peak_mib_after_spo", "peak_mib_after_sampling")]
    mem_cell = " / ".join("n/a" if x is None else f"{x:.0f}" for x in mem)
    cfg = res["model"]
    lines = [
        "## Accelerator check (`benchmarks/accelerator_check.py`)",
        "",
        f"Run {res['date']}. Command: `{command}` ({res['total_s']:.0f} s). Device: {res['device']} ({res['backend']}, "
        f"{res['num_devices']} device(s), the batch split over them); host {m['cpu']}, {m['cores']} cores; "
        f"jax {res['jax']}. "
        f"Model: {'TINY (smoke size)' if res['tiny'] else 'Qwen2.5-0.5B-shaped'}, random init "
        f"({res['num_params'] / 1e6:.1f} M parameters, {res['matmul_params'] / 1e6:.1f} M in matmuls), "
        f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}; {res['dtype']} "
        f"compute, fp32 master weights. Batch: {res['pairs']} pairs per step packed into rows of {res['seq']} "
        f"tokens (shape {res['batch_shape']}, {res['tokens_per_step']} real tokens). Attention: "
        f"**{res['attention']}** (forward+backward per layer: {trials}). Peak: {res['peak_tflops']:.1f} TFLOP/s "
        f"({res['peak_source']}); model FLOPs per DPO step {res['step_tflop']:.2f} TFLOP (4 x 2·N·tokens, the "
        f"unembedding at the response tokens only, + causal attention; see the script's docstring).",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| DPO step (online reference), s, median (min–max) | {med(res['dpo_step_s']):.3f} "
        f"({min(res['dpo_step_s']):.3f}–{max(res['dpo_step_s']):.3f}) |",
        f"| DPO tokens/s, median | {med(res['dpo_tokens_per_s']):.0f} |",
        f"| DPO MFU, median (min–max) | **{med(res['mfu']):.1%}** ({min(res['mfu']):.1%}–{max(res['mfu']):.1%}) |",
        f"| SPO (penalty/reference) step / DPO step, median (min–max) | **{med(res['spo_over_dpo']):.2f}x** "
        f"({min(res['spo_over_dpo']):.2f}–{max(res['spo_over_dpo']):.2f}) |",
        f"| first call (compile + run): DPO step / SPO step / sampling, s | {res['dpo_first_step_s']:.1f} / "
        f"{res['spo_first_step_s']:.1f} / {res['sample_first_call_s']:.1f} |",
        f"| sampling tokens/s (batch {res['sample_batch']}, prompt {res['sample_prompt']}, {res['sample_new']} new "
        f"tokens, greedy) | {res['sample_tokens_per_s']:.0f} |",
        f"| peak device MiB after DPO / SPO / sampling | {mem_cell} |",
        f"| peak host RSS MiB | {res['peak_rss_mib']:.0f} |",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model and shapes (CPU smoke run; the tests)")
    p.add_argument("--seq", type=int, default=None, help="packed row length (default 1024; --tiny 64)")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs per step (default 16; --tiny 8)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--attention", default="auto", choices=["auto", *models.ATTENTION_IMPLEMENTATIONS],
                   help="attention implementation (auto: the fastest that works)")
    p.add_argument("--remat", action="store_true", help="rematerialise each layer in the backward pass")
    p.add_argument("--steps", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--rounds", type=int, default=None, help="timed DPO/SPO pairs (default 6; --tiny 1)")
    p.add_argument("--sample-batch", type=int, default=None, help="default 64; --tiny 8")
    p.add_argument("--sample-prompt", type=int, default=None, help="prompt tokens (default 128; --tiny 8)")
    p.add_argument("--sample-new", type=int, default=None, help="new tokens per row (default 256; --tiny 8)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak per chip, overriding the built-in table")
    p.add_argument("--compile-cache", default="off",
                   help="JAX compilation cache directory (default off: the compile times are part of the check)")
    p.add_argument("--json", default="", help="also save the results to this JSON file")
    p.add_argument("--write", default="", help="replace the accelerator_check section of this RESULTS.md")
    a = p.parse_args(argv)
    defaults = dict(seq=(64, 1024), pairs=(8, 16), rounds=(1, 6), sample_batch=(8, 64), sample_prompt=(8, 128),
                    sample_new=(8, 256))
    for k, (tiny, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, tiny if a.tiny else full)
    if a.seq % 8:
        raise SystemExit(f"--seq {a.seq}: must be a multiple of 8 (two packed sequences of seq/2 per row)")
    enable_compile_cache(a.compile_cache)
    log = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    res = run(a, log)
    res.update(sample_batch=a.sample_batch, sample_prompt=a.sample_prompt, sample_new=a.sample_new)
    command = "python benchmarks/accelerator_check.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                          if (argv if argv is not None else sys.argv[1:]) else "")
    body = table(res, command)
    print(body)
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.write:
        write_section(a.write, "accelerator_check", body)


if __name__ == "__main__":
    main()
