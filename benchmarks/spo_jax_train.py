"""spo_jax's side of the throughput benchmark, and the harness the other benchmarks share.

One process, one variant: `python benchmarks/spo_jax_train.py --variant dpo --steps 7 --warmup 2`
prints a JSON line with per-step times (after warm-up), real tokens per step and
the process's peak RSS. `benchmarks/throughput.py` runs it (and TRL's side) in
fresh processes and writes the table.

The step timed is the trainer's own: ``spo_jax.train.make_train_step`` (jitted,
state donated, in/out shardings over the trainer's mesh) on Contract-1 batches
from ``spo_jax.data.BatchIterator`` (padded or packed) built from the same
token ids as TRL's side (``common.make_pairs``). Each step is timed from
dispatch to ``block_until_ready`` of the new state; batches are on the device
before the clock starts. Nothing here is CPU-specific: on a GPU the same code
runs on the default backend.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import datasets  # noqa: E402
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from spo_jax import models  # noqa: E402
from spo_jax import sharding as sharding_lib  # noqa: E402
from spo_jax.config import get_default_config  # noqa: E402
from spo_jax.data import BatchIterator  # noqa: E402
from spo_jax.inputs import batch_devices_per_process, model_dtypes  # noqa: E402
from spo_jax.objectives import make_logps_fn  # noqa: E402
from spo_jax.optim import make_optimizer  # noqa: E402
from spo_jax.train import TrainState, make_train_step  # noqa: E402

from common import LLAMA_CONFIG, PAD_ID, add_shape_args, make_pairs, peak_rss_mib  # noqa: E402

# name -> config overrides (dotted keys of spo_jax.config). "online" reference =
# a frozen copy of the initial policy whose forward runs inside the step, as TRL's
# DPOTrainer with an explicit ref_model.
VARIANTS = {
    "dpo": {"loss.name": "dpo", "loss.hparams": {"beta": 0.1}, "reference.mode": "online"},
    # cached: reference log-probs computed once before training (no reference forward in the step), as
    # TRL's precompute_ref_log_probs
    "dpo_cached": {"loss.name": "dpo", "loss.hparams": {"beta": 0.1}, "reference.mode": "cached"},
    "simpo": {"loss.name": "simpo", "loss.hparams": {"beta": 2.0, "gamma": 1.0}, "reference.mode": "none"},
    "dpo_spo": {"loss.name": "dpo", "loss.hparams": {"beta": 0.1}, "reference.mode": "online",
                "spo.enabled": True, "spo.solver": "penalty", "spo.value": "reference"},
    # solver-cost variants (benchmarks/solver_cost.py)
    "penalty_reference": {"loss.name": "dpo", "reference.mode": "online", "spo.enabled": True,
                          "spo.solver": "penalty", "spo.value": "reference"},
    "penalty_inner_sft_k1": {"loss.name": "dpo", "reference.mode": "online", "spo.enabled": True,
                             "spo.solver": "penalty", "spo.value": "inner_sft", "spo.inner_steps": 1},
    "penalty_inner_sft_k4": {"loss.name": "dpo", "reference.mode": "online", "spo.enabled": True,
                             "spo.solver": "penalty", "spo.value": "inner_sft", "spo.inner_steps": 4},
    "barrier": {"loss.name": "dpo", "reference.mode": "online", "spo.enabled": True,
                "spo.solver": "barrier", "spo.value": "reference"},
    "unrolled_k1": {"loss.name": "dpo", "reference.mode": "online", "spo.enabled": True,
                    "spo.solver": "unrolled", "spo.value": "reference", "spo.inner_steps": 1},
    "unrolled_k4": {"loss.name": "dpo", "reference.mode": "online", "spo.enabled": True,
                    "spo.solver": "unrolled", "spo.value": "reference", "spo.inner_steps": 4},
    "implicit": {"loss.name": "dpo", "reference.mode": "online", "spo.enabled": True,
                 "spo.solver": "implicit", "spo.value": "reference"},
}


def versions() -> dict:
    return dict(jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", jax.__version__),
                flax=flax.__version__, optax=optax.__version__, backend=jax.default_backend(),
                device=str(jax.devices()[0].device_kind), num_devices=jax.device_count())


def peak_device_mib() -> float | None:
    """Peak bytes in use on the first accelerator (None on CPU, where peak RSS is the number)."""
    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        return None
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def make_config(variant: str, *, pairs: int, max_length: int, packing: bool = False,
                dtype: str = "float32", seq_chunk: int | None = None, vocab_chunk: int | None = None,
                model_config: dict | None = None, extra: dict | None = None):
    """The trainer config for one benchmark variant (``VARIANTS[variant]`` + ``extra``).

    ``seq_chunk`` / ``vocab_chunk``: None keeps the trainer's defaults."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {sorted(VARIANTS)}")
    c = get_default_config()
    c.model.config = ml_collections.ConfigDict(dict(model_config or LLAMA_CONFIG))
    c.model.dtype = dtype
    c.model.param_dtype = "float32"
    c.data.batch_size = pairs
    c.data.max_length = max_length
    c.data.packing = packing
    if seq_chunk is not None:
        c.logprobs.seq_chunk = seq_chunk
    if vocab_chunk is not None:
        c.logprobs.vocab_chunk = vocab_chunk
    c.optim.schedule = "constant"
    c.train.num_steps = 1000
    for key, value in {**VARIANTS[variant], **(extra or {})}.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        if isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
        node[leaf] = value
    return c


def tokenized_dataset(rows: list[dict]):
    """``common.make_pairs`` rows as the tokenized columns BatchIterator reads."""
    return datasets.Dataset.from_dict(dict(
        prompt_ids=[r["prompt"] for r in rows], chosen_ids=[r["chosen"] for r in rows],
        rejected_ids=[r["rejected"] for r in rows], example_index=list(range(len(rows)))))


class Bench:
    """A compiled train step, its state and device batches for one variant.

    ``step()`` runs one step on the next batch (cycling) and returns its wall
    time in seconds (dispatch -> ``block_until_ready``) and its real tokens.
    ``num_batches=None``: the batches of one pass over ``rows`` (in order).
    ``config.model.remat`` and ``config.model.attention`` are honoured. ``all_positions``: the
    batches go without ``score_index``, so the log-probs are computed at every position (the
    step before score_index; ``logprobs.scored_sequence_logps`` derives N = T), for before/after
    comparisons in one process.
    """

    def __init__(self, config, rows: list[dict], *, num_batches: int | None, seed: int = 0,
                 all_positions: bool = False):
        c = self.config = config
        self.mesh = sharding_lib.make_mesh((-1, 1, 1))
        mcfg = models.ModelConfig.from_hf(dict(c.model.config))
        model = models.create_model(mcfg, rngs=nnx.Rngs(seed), **model_dtypes(c))
        models.set_remat(model, bool(c.model.remat))
        models.set_attention(model, c.model.attention)
        self.graphdef, params = nnx.split(model)
        self.num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
        tx, schedule = self.tx, self.schedule = make_optimizer(c)
        ref = jax.tree.map(jnp.copy, params) if c.reference.mode == "online" else None
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.PRNGKey(seed), ref_params=ref)
        self.shardings = sharding_lib.param_shardings(jax.eval_shape(lambda: state), self.mesh)
        self.state = jax.device_put(state, self.shardings)
        self.train_step = make_train_step(c, self.graphdef, tx, schedule, self.mesh, self.shardings)
        self.steps = {"main": self.train_step}
        it_kw = dict(batch_size=int(c.data.batch_size), max_length=int(c.data.max_length),
                     packing=bool(c.data.packing), shuffle=False, seed=seed,
                     num_epochs=1 if num_batches is None else None, pad_id=PAD_ID,
                     length_bucket=int(c.data.length_bucket) or "pow2")
        if c.data.packing:
            it_kw.update(pack_rows=int(c.data.pack_rows) or None, pack_length=int(c.data.pack_length) or None,
                         pack_rows_multiple=batch_devices_per_process(c))
        it = BatchIterator(tokenized_dataset(rows), **it_kw)
        # seq_lengths: the sequences' lengths per batch; scored: its loss_mask positions (response tokens)
        self.batches, self.tokens, self.seq_lengths, self.scored = [], [], [], []
        # cached reference: the reference log-probs of each batch, computed once before training with the
        # initial parameters (what the trainer's RefLogpsTable holds), enter the batch as `ref_logps`
        ref_fn = jax.jit(lambda p, b: make_logps_fn(self.graphdef, seq_chunk=c.logprobs.seq_chunk,
                                                    vocab_chunk=c.logprobs.vocab_chunk)(p, b)[0])
        for local in it:
            if all_positions:
                local = {k: v for k, v in local.items() if k != "score_index"}
            if c.reference.mode == "cached":
                local = dict(local, ref_logps=np.asarray(ref_fn(self.state.params,
                                                                sharding_lib.make_global_batch(local, self.mesh))))
            self.tokens.append(int(np.sum(local["segment_ids"] > 0)))
            self.scored.append(int(np.sum(local["loss_mask"] > 0)))
            seg = np.asarray(local["segment_ids"])
            self.seq_lengths.append([int(n) for row in seg for n in np.unique(row[row > 0], return_counts=True)[1]])
            self.batches.append(sharding_lib.make_global_batch(local, self.mesh))
            if num_batches is not None and len(self.batches) == num_batches:
                break
        self.shapes = [tuple(b["input_ids"].shape) for b in self.batches]
        self._i = 0

    def add_variant(self, name: str, config) -> None:
        """Another step function (e.g. another SPO solver) on the same state and batches.

        ``config`` must keep the optimizer and the reference mode of the main one
        (the state is shared), which every solver-cost variant does."""
        if config.reference.mode != self.config.reference.mode:
            raise ValueError(f"variant {name!r}: reference.mode={config.reference.mode!r} differs from the "
                             f"shared state's {self.config.reference.mode!r}")
        self.steps[name] = make_train_step(config, self.graphdef, self.tx, self.schedule, self.mesh,
                                           self.shardings)

    def step(self, name: str = "main") -> tuple[float, int]:
        b = self._i % len(self.batches)
        self._i += 1
        t, c = time.perf_counter(), time.process_time()
        self.state, metrics = self.steps[name](self.state, self.batches[b])
        jax.block_until_ready((self.state, metrics))
        dt = time.perf_counter() - t
        self.last_cpu = time.process_time() - c  # CPU seconds of all this process's threads
        self.last_metrics = metrics
        if not np.isfinite(float(metrics["loss"])):
            raise FloatingPointError(f"non-finite loss in benchmark variant (step {self._i})")
        return dt, self.tokens[b]

    def cost_analysis(self, name: str = "main") -> dict:
        """XLA's compiled cost analysis (flops, bytes accessed) of the step on the first batch."""
        compiled = self.steps[name].lower(self.state, self.batches[0]).compile()
        ca = compiled.cost_analysis()
        if isinstance(ca, list):
            ca = ca[0] if ca else {}
        return {k: float(v) for k, v in (ca or {}).items() if k in ("flops", "bytes accessed", "transcendentals")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="dpo", choices=sorted(VARIANTS))
    add_shape_args(p)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seq-chunk", type=int, default=None, help="logprobs.seq_chunk (default: the trainer's)")
    p.add_argument("--vocab-chunk", type=int, default=None, help="logprobs.vocab_chunk (default: the trainer's)")
    a = p.parse_args()
    rows = make_pairs(a.pairs_per_step * a.steps, a.prompt_len, a.response_len, seed=0)
    cfg = make_config(a.variant, pairs=a.pairs_per_step, max_length=a.prompt_len + a.response_len,
                      dtype=a.dtype, seq_chunk=a.seq_chunk, vocab_chunk=a.vocab_chunk)
    bench = Bench(cfg, rows, num_batches=a.steps)
    t0 = time.perf_counter()
    times, cpu, tokens = [], [], []
    for i in range(a.steps):
        dt, n = bench.step()
        if i == 0:
            first = time.perf_counter() - t0
        if i >= a.warmup:
            times.append(dt)
            cpu.append(bench.last_cpu)
            tokens.append(n)
    print(json.dumps(dict(side="spo_jax", variant=a.variant, step_times=times, cpu_times=cpu, tokens_per_step=tokens[0],
                          first_step_s=first, peak_rss_mib=peak_rss_mib(), peak_device_mib=peak_device_mib(), num_params=bench.num_params,
                          shapes=bench.shapes[:1], **versions())))


if __name__ == "__main__":
    main()
