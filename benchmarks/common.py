"""Shared set-up for the spo_jax-vs-TRL benchmarks: one model config, one data set.

Both sides train the same small Llama config on the same token ids: random
prompts and responses drawn from a fixed seed, written as words ``w<id>`` so a
WordLevel tokenizer maps them back to exactly those ids on the TRL side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys

import numpy as np

VOCAB = 32000
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2

# The "small Llama" of the benchmark issue: 4 layers, hidden 256, vocab 32000.
LLAMA_CONFIG = dict(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)


def add_shape_args(p: argparse.ArgumentParser, *, pairs: int = 8, prompt_len: int = 64, response_len: int = 64,
                   cap_help: str | None = None) -> None:
    """The benchmarks' ``--pairs-per-step``, ``--prompt-len`` and ``--response-len`` flags (``make_pairs``'
    sizes); ``cap_help``: their help when the lengths are caps of skewed lengths."""
    p.add_argument("--pairs-per-step", type=int, default=pairs)
    p.add_argument("--prompt-len", type=int, default=prompt_len,
                   help=cap_help and f"cap of the skewed prompt {cap_help}")
    p.add_argument("--response-len", type=int, default=response_len,
                   help=cap_help and f"cap of the skewed response {cap_help}")


def make_pairs(n_pairs: int, prompt_len: int, response_len: int, seed: int = 0,
               skew: bool = False, vocab: int | None = None) -> list[dict]:
    """Token-id preference pairs. Responses end with EOS (counted in response_len).

    skew=True draws lengths from a long-tailed distribution (most short, a few at
    the maximum), the case where packing pays. Ids are drawn below ``vocab``
    (default ``VOCAB``).
    """
    rng = np.random.default_rng(seed)
    vocab = VOCAB if vocab is None else vocab
    rows = []
    for _ in range(n_pairs):
        if skew:
            pl = int(np.clip(rng.geometric(1.0 / (prompt_len / 4)), 4, prompt_len))
            cl = int(np.clip(rng.geometric(1.0 / (response_len / 4)), 2, response_len))
            rl = int(np.clip(rng.geometric(1.0 / (response_len / 4)), 2, response_len))
        else:
            pl, cl, rl = prompt_len, response_len, response_len
        rows.append(dict(
            prompt=rng.integers(3, vocab, pl).tolist(),
            chosen=rng.integers(3, vocab, cl - 1).tolist() + [EOS_ID],
            rejected=rng.integers(3, vocab, rl - 1).tolist() + [EOS_ID],
        ))
    return rows


def real_tokens(rows: list[dict]) -> int:
    """Tokens a DPO step processes for these pairs: prompt+chosen and prompt+rejected."""
    return sum(2 * len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in rows)


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarize(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values))


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return dict(python=platform.python_version(), cpu=cpu, cores=os.cpu_count())


def run_json_subprocess(args: list[str]) -> dict:
    """Run ``python args...`` in a fresh process (its own peak memory); parse its last JSON line."""
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True)
    for line in reversed(out.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result from {args}:\n{out.stdout}\n{out.stderr}")


def write_section(path: str, name: str, body: str) -> None:
    """Replace (or append) the section between <!-- name --> markers of RESULTS.md."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)
