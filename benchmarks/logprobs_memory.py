"""Peak memory of naive vs chunked per-token log-probs (forward + backward), Qwen2.5-0.5B sizes.

What is measured: ``jax.value_and_grad`` w.r.t. the hidden states of
``Σ_t log p(y_t)`` for batch 1, length 2048, hidden 896, vocab 151936 (Qwen2.5-0.5B's
unembedding), fp32, on CPU, for

- ``naive``: ``spo_jax.logprobs.naive_token_logps`` (full [B, T, V] logits),
- ``seq128``: ``token_logps(seq_chunk=128)``,
- ``seq128_vocab16k``: ``token_logps(seq_chunk=128, vocab_chunk=16384)``.

Two measurements per variant:

1. XLA's compiled memory analysis (``jax.jit(f).lower(...).compile().memory_analysis()``):
   temp bytes (activations, saved residuals, scan buffers), output and argument
   bytes; "total" is their sum (the arguments, chiefly the 545 MB unembedding
   matrix, are the same for every variant). Nothing is executed.
2. Process RSS (Linux), in a fresh subprocess per variant that runs the compiled
   step once on random inputs: the RSS high-water mark, reset just before the
   step (inputs allocated, step compiled, freed heap trimmed), and its increase
   over the RSS at that moment. Skipped with ``--no-rss``.

Run (CPU; about 2 minutes on 2 cores, most of it the naive step)::

    python benchmarks/logprobs_memory.py            # prints the table
    python benchmarks/logprobs_memory.py --write    # also updates benchmarks/RESULTS.md

Target: the chunked step uses at least 4x less memory than the naive one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, package not installed
    sys.path.insert(0, str(ROOT))

B, T, D, V = 1, 2048, 896, 151936
VARIANTS = {
    "naive": None,
    "seq128": dict(seq_chunk=128),
    "seq128_vocab16k": dict(seq_chunk=128, vocab_chunk=16384),
}
RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
SECTION = "logprobs_memory"
MB = 2 ** 20


def _step(name):
    """jit(value_and_grad wrt hidden) of the summed token log-probs for one variant."""
    import jax
    from spo_jax import logprobs

    kw = VARIANTS[name]

    def objective(h, w, y):
        lp = logprobs.naive_token_logps(h, w, y) if kw is None else logprobs.token_logps(h, w, y, **kw)
        return lp.sum()

    return jax.jit(jax.value_and_grad(objective))


def _shapes():
    import jax
    import jax.numpy as jnp
    return (jax.ShapeDtypeStruct((B, T, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32))


def compiled_memory(name) -> dict:
    m = _step(name).lower(*_shapes()).compile().memory_analysis()
    out = dict(temp=m.temp_size_in_bytes, output=m.output_size_in_bytes, argument=m.argument_size_in_bytes)
    out["total"] = out["temp"] + out["output"] + out["argument"]
    return out


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def child(name) -> None:
    """Run one variant once in this (fresh) process; print RSS numbers as JSON.

    Before the step: inputs made on the device (no large NumPy temporaries), the
    step compiled, freed heap returned to the OS (``malloc_trim``) and the RSS
    high-water mark reset (``/proc/self/clear_refs`` ← 5), so that the peak is the
    step's own and not the compiler's.
    """
    import ctypes

    import jax
    import jax.numpy as jnp

    kh, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(kh, (B, T, D), jnp.float32)
    w = jax.random.normal(kw, (D, V), jnp.float32) / D ** 0.5
    y = jax.random.randint(ky, (B, T), 0, V, jnp.int32)
    compiled = _step(name).lower(h, w, y).compile()
    jax.block_until_ready((h, w, y))
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    value, grad = compiled(h, w, y)
    jax.block_until_ready(grad)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    print(json.dumps(dict(variant=name, rss_before=before, rss_peak=peak, rss_increase=peak - before,
                          seconds=seconds, value=float(value), finite=bool(jnp.isfinite(grad).all()))))


def measure_rss(name) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, __file__, "--child", name], check=True, capture_output=True,
                         text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows) -> str:
    naive = rows["naive"]
    head = ("| variant | XLA temp (MiB) | XLA total (MiB) | naive / variant (temp) | naive / variant (total) "
            "| peak RSS (MiB) | RSS increase (MiB) | naive / variant (RSS increase) | step (s) |")
    lines = [head, "|" + "---|" * 9]
    for name, r in rows.items():
        rss = r.get("rss")
        cells = [name, f"{r['temp'] / MB:.0f}", f"{r['total'] / MB:.0f}", f"{naive['temp'] / r['temp']:.1f}x",
                 f"{naive['total'] / r['total']:.1f}x"]
        if rss:
            cells += [f"{rss['rss_peak'] / MB:.0f}", f"{rss['rss_increase'] / MB:.0f}",
                      f"{naive['rss']['rss_increase'] / rss['rss_increase']:.1f}x", f"{rss['seconds']:.1f}"]
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="update this benchmark's section of RESULTS.md")
    ap.add_argument("--no-rss", action="store_true", help="only the compiled memory analysis (nothing runs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    import jax

    rows = {}
    for name in VARIANTS:
        rows[name] = compiled_memory(name)
        if not args.no_rss:
            rows[name]["rss"] = measure_rss(name)
            assert rows[name]["rss"]["finite"], f"{name}: non-finite gradient"
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    body = table(rows)
    best = min((n for n in rows if n != "naive"), key=lambda n: rows[n]["total"])
    ratio_total = rows["naive"]["total"] / rows[best]["total"]
    ratio_temp = rows["naive"]["temp"] / rows[best]["temp"]
    seq = rows["seq128"]
    summary = (f"Chunked (seq_chunk=128) needs {rows['naive']['total'] / seq['total']:.1f}x less memory than "
               f"naive in XLA's total (temp + output + arguments) and {rows['naive']['temp'] / seq['temp']:.1f}x "
               f"less temp; the best variant ({best}) {ratio_total:.1f}x / {ratio_temp:.1f}x.")
    if "rss" in seq:
        summary += (f" Measured RSS increase during the step: naive "
                    f"{rows['naive']['rss']['rss_increase'] / MB:.0f} MiB vs seq128 "
                    f"{seq['rss']['rss_increase'] / MB:.0f} MiB "
                    f"({rows['naive']['rss']['rss_increase'] / seq['rss']['rss_increase']:.1f}x); whole-process "
                    f"peak RSS {rows['naive']['rss']['rss_peak'] / MB:.0f} vs {seq['rss']['rss_peak'] / MB:.0f} MiB "
                    f"({rows['naive']['rss']['rss_peak'] / seq['rss']['rss_peak']:.1f}x, both including the "
                    f"JAX runtime and the inputs). Step time: naive {rows['naive']['rss']['seconds']:.1f} s, "
                    f"seq128 {seq['rss']['seconds']:.1f} s (the chunks' logits are recomputed in the backward pass).")
    print(body)
    print(summary)
    if args.write:
        from common import write_section  # benchmarks/common.py (this script's directory)

        text = (f"## Log-prob memory: naive vs chunked (`benchmarks/logprobs_memory.py`)\n\n"
                f"value_and_grad w.r.t. hidden of Σ log p, B={B}, T={T}, D={D}, V={V} (Qwen2.5-0.5B "
                f"unembedding), fp32, CPU ({platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores), jax {jax.__version__}. Command: "
                f"`python benchmarks/logprobs_memory.py --write`. XLA columns from "
                f"`compile().memory_analysis()` (total = temp + output + arguments; the arguments include "
                f"the {D * V * 4 / MB:.0f} MiB unembedding); RSS from one run per variant in a fresh process "
                f"(high-water mark reset just before the step; increase = peak − RSS at that moment).\n\n{body}\n\n{summary}\n")
        write_section(str(RESULTS), SECTION, text)
        print(f"wrote the {SECTION} section of {RESULTS}")


if __name__ == "__main__":
    main()
