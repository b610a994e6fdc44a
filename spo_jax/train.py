"""The trainer: CLI, train step and loop (SFT, preference +/- SPO, evaluation).

CLI::

    python -m spo_jax.train --config experiments/<name>.py [--config.a.b=value ...]

The config (``spo_jax.config``) is validated before anything heavy starts.

One way through (docs/DESIGN.md): config -> tokenized rows -> Contract-1 NumPy
batches (each process its slice) -> global arrays sharded over ``("data", "fsdp")``
-> ``train_step(state, batch)`` (pure, jitted with in/out shardings, state
donated) -> hidden states (``models.apply``) -> ``logprobs.token_logps`` (chunked,
never [B, T, V]) -> ``logprobs.sequence_logps`` -> ``PairStats`` -> loss, or the
SPO solver -> gradients -> optax (AdamW, warm-up + cosine/linear decay,
global-norm clipping) -> metrics read one step late -> writers; Orbax saves the
state with the data-iterator position.

Public Python API (what the demo and the benchmarks call):

* ``train(config, *, train_data=None, eval_data=None) -> TrainResult``
* ``make_optimizer(config) -> (optax.GradientTransformation, schedule)``
* ``make_logps_fn(graphdef, *, seq_chunk, vocab_chunk) -> logps_fn(params, batch) -> (sums_S, counts_S)``
* ``make_solver_for(config, logps_fn) -> solver(params, batch) -> (grads, metrics)``
* ``make_step_fn(config, graphdef, tx, schedule) -> step(state, batch) -> (state, metrics)`` (pure)
* ``make_train_step(config, graphdef, tx, schedule, mesh, state_shardings)`` -> the jitted step
* ``make_eval_step(config, graphdef, mesh)`` -> jitted ``(params, ref_params, batch) -> metrics``
* ``TrainState`` (step, params, opt_state, rng, ref_params)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from spo_jax import config as config_lib
from spo_jax import sharding as sharding_lib
from spo_jax.checkpoint import Checkpointer
from spo_jax.metrics import MetricWriter, Progress, measure_peak_flops, mfu

logger = logging.getLogger("spo_jax.train")

# --------------------------------------------------------------------------- #
# State
# --------------------------------------------------------------------------- #


class TrainState(struct.PyTreeNode):
    """The loop's state: a pytree (``jax.jit`` argument, donated).

    ``params``: the trainable parameters (``nnx.State``, master dtype);
    ``opt_state``: optax state; ``step``: int32 optimizer steps done; ``rng``: a raw
    uint32 PRNG key (sampling in evaluation); ``ref_params``: frozen reference
    parameters for ``reference.mode="online"`` (None otherwise; never saved).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ref_params: Any = None

    def saveable(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the final state (on device), the metric history
    (list of ``{"step", "split", ...}`` dicts, as in metrics.jsonl), the last
    evaluation's metrics, the run directory, and where the HF export went."""

    state: TrainState | None
    graphdef: Any
    history: list[dict]
    final_eval: dict
    run_dir: str
    export_dir: str | None
    start_step: int


# --------------------------------------------------------------------------- #
# Optimizer
# --------------------------------------------------------------------------- #


def make_schedule(optim, num_steps: int) -> optax.Schedule:
    """Linear warm-up 0 -> lr over ``warmup_steps``, then cosine / linear decay to
    ``lr·min_lr_ratio`` at ``num_steps`` (or constant)."""
    lr, warm = float(optim.learning_rate), int(optim.warmup_steps)
    end = lr * float(optim.min_lr_ratio)
    decay_steps = max(num_steps - warm, 1)
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim.min_lr_ratio))
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def _decay_mask(params):
    return jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) with global-norm clipping and the schedule."""
    o = config.optim
    schedule = make_schedule(o, int(config.train.num_steps))
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(o.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                             weight_decay=float(o.weight_decay), mask=_decay_mask))
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------- #
# Statistics, objectives, solvers
# --------------------------------------------------------------------------- #


def make_logps_fn(graphdef, *, seq_chunk: int = 128, vocab_chunk: int = 0) -> Callable:
    """``logps_fn(params, batch) -> (sums_S, counts_S)`` fp32 [S] (Contract 3).

    hidden = models.apply(graphdef, params, input_ids, positions, segment_ids);
    token log-probs of ``targets`` from the unembedding (chunked), summed per
    sequence over ``loss_mask``.
    """
    from spo_jax import logprobs, models

    def logps_fn(params, batch):
        hidden = models.apply(graphdef, params, batch["input_ids"], batch["positions"], batch["segment_ids"])
        w, b = models.unembedding(graphdef, params)
        logps = logprobs.token_logps(hidden, w, batch["targets"], b_V=b, seq_chunk=int(seq_chunk),
                                     vocab_chunk=int(vocab_chunk))
        num_seqs = batch["seq_valid"].shape[0]
        sums, counts = logprobs.sequence_logps(logps, batch["loss_mask"], batch["seq_ids"], num_seqs=num_seqs)
        dt = jnp.promote_types(sums.dtype, jnp.float32)  # fp32, or fp64 under x64 (exact tests)
        return sums.astype(dt), counts.astype(dt)

    return logps_fn


def make_upper_loss(config) -> Callable:
    """The preference loss ``loss(PairStats) -> (value, metrics)`` from ``loss.*``."""
    from spo_jax import losses
    loss = losses.get_loss(config.loss.name, **dict(config.loss.hparams))
    if config.loss.sft_weight > 0:
        loss = losses.combine([(1.0, loss), (float(config.loss.sft_weight), losses.get_loss("sft"))])
    return loss


def sft_objective(logps_fn) -> Callable:
    """SFT: token-mean NLL over the batch, −Σ_s sums_s / Σ_s counts_s (filler sequences count 0)."""

    def objective(params, batch):
        sums, counts = logps_fn(params, batch)
        valid = batch["seq_valid"].astype(jnp.float32)
        tokens = jnp.sum(counts * valid)
        nll = -jnp.sum(sums * valid) / jnp.maximum(tokens, 1.0)
        return nll, {"loss": nll, "sft/nll": nll, "sft/tokens": tokens}

    return objective


def preference_objective(logps_fn, upper_loss) -> Callable:
    from spo_jax.bilevel import pair_stats

    def objective(params, batch):
        sums, counts = logps_fn(params, batch)
        value, metrics = upper_loss(pair_stats(sums, counts, batch))
        metrics = dict(metrics)
        metrics["loss"] = value
        return value, metrics

    return objective


def _grad_solver(objective):
    def solver(params, batch):
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
        return grads, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return solver


def make_solver_for(config, logps_fn) -> Callable:
    """``solver(params, batch) -> (grads, metrics)`` for the stage: SFT NLL, a
    preference loss, or the preference loss wrapped by an SPO solver
    (``bilevel.make_solver``; ``metrics["loss"]`` is then spo/objective)."""
    if config.stage == "sft":
        return _grad_solver(sft_objective(logps_fn))
    upper = make_upper_loss(config)
    if not config.spo.enabled:
        return _grad_solver(preference_objective(logps_fn, upper))
    from spo_jax import bilevel
    solver = bilevel.make_solver(logps_fn, upper, bilevel.SPOConfig.from_dict(config_lib.spo_fields(config)))

    def wrapped(params, batch):
        grads, metrics = solver(params, batch)
        metrics = dict(metrics)
        metrics["loss"] = metrics["spo/objective"]
        return grads, metrics

    return wrapped


def _with_ref(logps_fn, ref_params, batch):
    """Add ``ref_logps`` [S] computed with frozen reference parameters (no gradient)."""
    ref_sums, _ = logps_fn(jax.lax.stop_gradient(ref_params), batch)
    return {**batch, "ref_logps": jax.lax.stop_gradient(ref_sums)}


def make_step_fn(config, graphdef, tx: optax.GradientTransformation, schedule) -> Callable:
    """The pure step ``step(state, batch) -> (state, metrics)``.

    With ``optim.grad_accum_steps = A > 1`` every batch array has a leading
    micro-batch axis [A, ...]; gradients and metrics are averaged over a
    ``jax.lax.scan`` of the micro-batches and optax updates once.
    Metrics: the solver's (loss, rewards/*, logps/*, spo/*), ``grad_norm`` (of the
    averaged direction, before clipping), ``learning_rate`` (of this update).
    """
    logps_fn = make_logps_fn(graphdef, seq_chunk=config.logprobs.seq_chunk, vocab_chunk=config.logprobs.vocab_chunk)
    solver = make_solver_for(config, logps_fn)
    accum = int(config.optim.grad_accum_steps) if config.stage != "eval" else 1
    online = config.reference.mode == "online" and config.stage != "sft"

    def micro(params, ref_params, mb):
        if online:
            mb = _with_ref(logps_fn, ref_params, mb)
        return solver(params, mb)

    def step(state: TrainState, batch):
        if accum == 1:
            grads, metrics = micro(state.params, state.ref_params, batch)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            first = jax.tree.map(lambda x: x[0], batch)
            metric_shapes = jax.eval_shape(lambda b: micro(state.params, state.ref_params, b)[1], first)
            mzeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)

            def body(carry, mb):
                g_acc, m_acc = carry
                g, m = micro(state.params, state.ref_params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

            (gsum, msum), _ = jax.lax.scan(body, (zeros, mzeros), batch)
            grads = jax.tree.map(lambda g: g / accum, gsum)
            metrics = jax.tree.map(lambda m: m / accum, msum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        metrics["tokens"] = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)  # global, non-padding
        rng = jax.random.fold_in(state.rng, state.step)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new, metrics

    return step


def state_shardings(state_abstract: TrainState, mesh, rules=sharding_lib.DEFAULT_RULES) -> TrainState:
    """Shardings of a TrainState: parameters (and the Adam moments, which mirror
    them leaf for leaf by path suffix) per the partition rules; scalars replicated."""
    def leaf(path, x):
        shape = np.shape(x)
        if len(shape) == 0:
            return sharding_lib.replicated(mesh)
        p = sharding_lib.path_str(path)
        return jax.sharding.NamedSharding(mesh, sharding_lib.spec_for(p, shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(leaf, state_abstract)


def make_train_step(config, graphdef, tx, schedule, mesh, shardings: TrainState) -> Callable:
    """``jax.jit`` of ``make_step_fn`` with state in/out shardings, the batch sharded
    over ``("data", "fsdp")`` and the state donated."""
    step = make_step_fn(config, graphdef, tx, schedule)
    accum = int(config.optim.grad_accum_steps) > 1
    micro = sharding_lib.P(None, sharding_lib.BATCH_AXES) if accum else sharding_lib.P(sharding_lib.BATCH_AXES)
    batch_sharding = jax.sharding.NamedSharding(mesh, micro)
    return jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(config, graphdef, mesh, *, sft_data: bool | None = None) -> Callable:
    """Jitted ``(params, ref_params, batch) -> metrics`` on a held-out batch (no
    gradient). Preference: the loss's metrics (rewards/*, logps/*, loss) plus the
    SPO gap ``spo/q_mean`` and violation fraction when reference log-probs exist,
    and ``num_pairs``; SFT: token-mean NLL."""
    from spo_jax.bilevel import pair_stats
    logps_fn = make_logps_fn(graphdef, seq_chunk=config.logprobs.seq_chunk, vocab_chunk=config.logprobs.vocab_chunk)
    sft_like = config.stage == "sft" if sft_data is None else bool(sft_data)
    online = config.reference.mode == "online" and not sft_like

    def step(params, ref_params, batch):
        if sft_like:
            _, metrics = sft_objective(logps_fn)(params, batch)
            metrics = dict(metrics)
            metrics["num_seqs"] = jnp.sum(batch["seq_valid"])
            return metrics
        if online:
            batch = _with_ref(logps_fn, ref_params, batch)
        sums, counts = logps_fn(params, batch)
        stats = pair_stats(sums, counts, batch)
        value, metrics = make_upper_loss(config)(stats)
        metrics = dict(metrics)
        metrics["loss"] = value
        if stats.ref_chosen_logps is not None:
            from spo_jax import losses
            q = losses.reference_gap(stats)
            w = stats.weight if stats.weight is not None else jnp.ones_like(q)
            metrics["spo/q_mean"] = jnp.sum(w * q) / jnp.maximum(jnp.sum(w), 1.0)
            metrics["spo/violation_frac"] = jnp.sum(w * (q > 0)) / jnp.maximum(jnp.sum(w), 1.0)
        metrics["num_pairs"] = jnp.sum(batch["seq_valid"][0::2])
        return {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    return jax.jit(step, out_shardings=sharding_lib.replicated(mesh))


# --------------------------------------------------------------------------- #
# Model, tokenizer, data
# --------------------------------------------------------------------------- #

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load_tokenizer(config):
    """``model.tokenizer``: "synthetic", a path / Hub id, or "" (= model.path)."""
    from spo_jax import models
    name = config.model.tokenizer or config.model.path
    if name == "synthetic":
        from spo_jax.data import synthetic
        return synthetic.build_tokenizer(model_max_length=int(config.data.max_length))
    return models.load_tokenizer(name)


def _model_kwargs(config, *, for_reference: bool = False) -> dict:
    kw = {"dtype": _DTYPES[config.model.dtype], "param_dtype": _DTYPES[config.model.param_dtype]}
    return kw


def build_model(config, source: str | None = None):
    """An ``nnx`` model from ``source`` (a path) or, if empty, the config's model source."""
    from spo_jax import models
    kw = _model_kwargs(config)
    path = source or config.model.path
    if path:
        model = models.from_pretrained(path, **kw)
    else:
        mcfg = models.ModelConfig.from_hf(dict(config.model.config))
        model = models.create_model(mcfg, rngs=nnx.Rngs(int(config.seed)), **kw)
    if config.model.remat and hasattr(models, "set_remat"):
        models.set_remat(model, True)
    return model


def model_identity(config, source: str | None = None) -> dict:
    """What determines a model's weights, for the reference-cache key."""
    path = source or config.model.path
    ident: dict[str, Any] = {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    if path:
        expanded = os.path.abspath(os.path.expanduser(path))
        ident["path"] = expanded if os.path.exists(expanded) else path
        if os.path.isdir(expanded):
            files = []
            for root, _, names in os.walk(expanded):
                for n in sorted(names):
                    f = os.path.join(root, n)
                    st = os.stat(f)
                    files.append((os.path.relpath(f, expanded), st.st_size, int(st.st_mtime)))
            ident["files"] = sorted(files)
        elif os.path.isfile(expanded):
            st = os.stat(expanded)
            ident["file"] = (st.st_size, int(st.st_mtime))
    else:
        ident["config"] = json.loads(json.dumps(dict(config.model.config), default=str))
        ident["seed"] = int(config.seed)
    return ident


def load_split(config, tokenizer, path: str, split: str, data=None):
    """Tokenized dataset (``spo_jax.data.prepare_dataset``) and its stats."""
    from spo_jax.data import prepare_dataset
    d = config.data
    return prepare_dataset(
        data if data is not None else path, tokenizer, max_length=int(d.max_length), format=d.format,
        split=split, min_prompt_length=int(d.min_prompt_length), use_chat_template=bool(d.use_chat_template))


def make_iterator(config, dataset, *, batch_size: int, shuffle: bool, num_epochs: int | None, seed: int,
                  pad_id: int, drop_remainder: bool = False):
    from spo_jax.data import BatchIterator
    d = config.data
    kw = dict(batch_size=int(batch_size), max_length=int(d.max_length), packing=bool(d.packing),
              length_bucket=int(d.length_bucket) if d.length_bucket else "pow2", shuffle=shuffle, seed=seed,
              num_epochs=num_epochs, pad_id=pad_id)
    if d.packing:
        kw.update(pack_rows=int(d.pack_rows) or None, pack_length=int(d.pack_length) or None,
                  pack_rows_multiple=batch_devices_per_process(config))
    else:
        kw.update(drop_remainder=drop_remainder)
    return BatchIterator(dataset, **kw)


def batch_devices_per_process(config) -> int:
    """Devices of this process that the batch's row axis is split over (data x fsdp)."""
    data, fsdp, _ = sharding_lib.resolve_axes((config.mesh.data, config.mesh.fsdp, config.mesh.tensor),
                                              jax.device_count())
    return max(1, data * fsdp // jax.process_count())


def dataset_identity(dataset) -> str:
    """sha256 of the tokenized token ids (prompt/response columns) and example indices."""
    h = hashlib.sha256()
    table = dataset.with_format("arrow")[:]
    for name in sorted(table.column_names):
        col = table.column(name).combine_chunks()
        h.update(name.encode())
        if hasattr(col, "offsets"):
            offsets = col.offsets.to_numpy()
            h.update(np.ascontiguousarray(offsets - offsets[0]).astype(np.int64).tobytes())
            vals = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
            h.update(np.ascontiguousarray(vals).astype(np.int64).tobytes())
        else:
            h.update(np.ascontiguousarray(col.to_numpy(zero_copy_only=False)).astype(np.int64).tobytes())
    return h.hexdigest()


def _stack_micro(batches: list[dict]) -> dict:
    """Stack A Contract-1 batches on a new leading axis, padding [R, T] arrays to the
    longest T (padding columns are valid padding: segment 0, mask 0)."""
    t = max(b["input_ids"].shape[1] for b in batches)
    out = {}
    for k in batches[0]:
        arrs = []
        for b in batches:
            x = b[k]
            if x.ndim == 2 and x.shape[1] < t:
                x = np.pad(x, ((0, 0), (0, t - x.shape[1])))
            arrs.append(x)
        out[k] = np.stack(arrs)
    return out


def _pad_ids(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad or 0)


# --------------------------------------------------------------------------- #
# Reference log-probs: cached table
# --------------------------------------------------------------------------- #


class RefLogpsTable:
    """Reference log-prob sums per (dataset row, response): ``logps[row, k]``
    (k = 0 chosen, 1 rejected); looked up per sequence by ``example_index``."""

    def __init__(self, example_index: np.ndarray, logps: np.ndarray):
        self.example_index = np.asarray(example_index, np.int64)
        self.logps = np.asarray(logps, np.float32)
        size = int(self.example_index.max()) + 1 if len(self.example_index) else 0
        self._lut = np.full((size, self.logps.shape[1]), np.nan, np.float32)
        self._lut[self.example_index] = self.logps

    def lookup(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        """``ref_logps`` [S] for a local preference batch (fillers get 0)."""
        ex = np.asarray(batch["example_index"])
        valid = ex >= 0
        k = np.arange(len(ex)) % self.logps.shape[1]
        out = np.zeros(len(ex), np.float32)
        if valid.any():
            if ex[valid].max() >= len(self._lut):
                raise ValueError(f"reference cache has no entry for example_index {int(ex[valid].max())}; "
                                 "the cache was built for a different dataset (delete it or fix reference.cache_dir)")
            vals = self._lut[ex[valid], k[valid]]
            if np.isnan(vals).any():
                raise ValueError("reference cache misses some example_index values of this batch; the cache was "
                                 "built for a different dataset (delete it or fix reference.cache_dir)")
            out[valid] = vals
        return out

    def save(self, path: str) -> None:
        """Atomic write (tmp file + rename)."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, example_index=self.example_index, logps=self.logps)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "RefLogpsTable":
        with np.load(path) as f:
            return cls(f["example_index"], f["logps"])


def reference_cache_key(config, dataset, source: str | None) -> str:
    """sha256 over (reference identity, dataset token ids, tokenization settings)."""
    d = config.data
    payload = {
        "reference": model_identity(config, source),
        "dataset": dataset_identity(dataset),
        "tokenization": {"max_length": d.max_length, "min_prompt_length": d.min_prompt_length,
                         "format": d.format, "use_chat_template": d.use_chat_template,
                         "tokenizer": config.model.tokenizer or config.model.path},
        "logprobs": {"seq_chunk": config.logprobs.seq_chunk, "vocab_chunk": config.logprobs.vocab_chunk},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def compute_reference_table(config, graphdef, ref_params, dataset, mesh, pad_id: int,
                            batch_size: int) -> RefLogpsTable:
    """One pass over ``dataset`` (in order, padded batches) with the reference model."""
    logps_fn = make_logps_fn(graphdef, seq_chunk=config.logprobs.seq_chunk, vocab_chunk=config.logprobs.vocab_chunk)
    fn = jax.jit(lambda p, b: logps_fn(p, b)[0], out_shardings=sharding_lib.replicated(mesh))
    it = make_iterator(config, dataset, batch_size=batch_size, shuffle=False, num_epochs=1, seed=0,
                       pad_id=pad_id)
    rows, values = [], []
    from jax.experimental import multihost_utils
    for local in it:
        batch = sharding_lib.make_global_batch(local, mesh)
        sums = np.asarray(jax.device_get(fn(ref_params, batch)))
        ex = np.asarray(multihost_utils.process_allgather(batch["example_index"], tiled=True)) \
            if jax.process_count() > 1 else np.asarray(local["example_index"])
        valid = ex >= 0
        rows.append(ex[valid].reshape(-1, 2)[:, 0])
        values.append(sums[valid].reshape(-1, 2))
    return RefLogpsTable(np.concatenate(rows), np.concatenate(values))


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient norm."""


def _config_dict(config) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))


def _count_params(params) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


class _Loop:
    """Holds the run's objects; ``run()`` is the training loop."""

    def __init__(self, config, train_data=None, eval_data=None):
        self.config = config
        c = config
        self.run_dir = os.path.abspath(os.path.expanduser(c.run_dir))
        self.is_main = jax.process_index() == 0
        self.mesh = sharding_lib.make_mesh((c.mesh.data, c.mesh.fsdp, c.mesh.tensor))
        self.history: list[dict] = []
        self.writer = MetricWriter(self.run_dir, jsonl=c.metrics.jsonl, tensorboard=c.metrics.tensorboard,
                                   enabled=self.is_main)
        self.tokenizer = load_tokenizer(c)
        self.pad_id = _pad_ids(self.tokenizer)
        self.accum = int(c.optim.grad_accum_steps)
        self.ref_mode_requested = c.reference.mode if c.stage != "sft" else "none"

        # data
        self.train_ds = self.eval_ds = None
        if c.stage != "eval":
            self.train_ds, stats = load_split(c, self.tokenizer, c.data.train_path, c.data.train_split, train_data)
            self._check_kind(stats, "data.train_path", c.data.train_path)
        if c.data.eval_path or eval_data is not None:
            self.eval_ds, stats = load_split(c, self.tokenizer, c.data.eval_path, c.data.eval_split, eval_data)
            self._check_kind(stats, "data.eval_path", c.data.eval_path)
            self.eval_kind = stats["kind"]

        # model (policy) and shardings
        model = build_model(c)
        self.graphdef, params = nnx.split(model)
        del model
        self.tx, self.schedule = make_optimizer(c)
        self.num_params = _count_params(params)
        params = self._shard_params(params)

        # reference
        self.ref_params = None
        self.ref_tables: dict[str, RefLogpsTable] = {}
        ref_mode = c.reference.mode if c.stage != "sft" else "none"
        self.ref_mode = ref_mode
        if ref_mode != "none":
            if c.reference.path:
                _, ref = nnx.split(build_model(c, c.reference.path))
                ref = self._shard_params(ref)
            else:
                ref = jax.tree.map(jnp.copy, params)
            if ref_mode == "online":
                self.ref_params = ref
            else:
                for name, ds in (("train", self.train_ds), ("eval", self.eval_ds)):
                    if ds is not None:
                        self.ref_tables[name] = self._cached_table(name, ds, ref)
                del ref

        # state
        rng = jax.random.PRNGKey(int(c.seed))
        opt_state = jax.jit(self.tx.init)(params)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                           rng=rng, ref_params=self.ref_params)
        self.shardings = state_shardings(jax.eval_shape(lambda: state), self.mesh)
        self.state = jax.device_put(state, self.shardings)
        self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"), keep=c.checkpoint.keep,
                                         async_save=c.checkpoint.async_save)

    # --------------------------------------------------------------- helpers

    def _check_kind(self, stats, field, value):
        want = "sft" if self.config.stage == "sft" else "preference"
        if self.config.stage == "eval":
            want = "preference" if self.ref_mode_requested != "none" else stats.get("kind")
        if stats.get("kind") != want:
            raise config_lib.ConfigError(
                f"config.{field}={value!r}: holds {stats.get('kind')} data (format {stats.get('format')!r}) but "
                f"stage {self.config.stage!r} needs {want} data; point it at a {want} dataset or change config.stage")

    def _shard_params(self, params):
        shard = state_shardings(jax.eval_shape(lambda: params), self.mesh)
        return jax.device_put(params, shard)

    def _cached_table(self, name, ds, ref_params) -> RefLogpsTable:
        c = self.config
        key = reference_cache_key(c, ds, c.reference.path or None)
        cache_dir = c.reference.cache_dir or os.path.join(self.run_dir, "ref_cache")
        path = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"ref_logps-{key}.npz")
        if os.path.exists(path):
            logger.info("reference log-probs (%s): cache hit %s", name, path)
            return RefLogpsTable.load(path)
        logger.info("reference log-probs (%s): computing one pass -> %s", name, path)
        bs = c.data.eval_batch_size if name == "eval" else c.data.batch_size // self.accum
        table = compute_reference_table(c, self.graphdef, ref_params, ds, self.mesh, self.pad_id, bs)
        if self.is_main:
            table.save(path)
        return table

    def _add_ref(self, local: dict, name: str) -> dict:
        if self.ref_mode == "cached":
            local = dict(local)
            local["ref_logps"] = self.ref_tables[name].lookup(local)
        return local

    def _next_local(self, it) -> dict:
        if self.accum == 1:
            return self._add_ref(next(it), "train")
        return _stack_micro([self._add_ref(next(it), "train") for _ in range(self.accum)])

    # --------------------------------------------------------------- eval

    def evaluate(self, params, step: int) -> dict:
        """Held-out metrics (weighted by pairs / sequences) over ``eval.num_batches``."""
        c = self.config
        if self.eval_ds is None:
            return {}
        if not hasattr(self, "_eval_step"):
            self._eval_step = make_eval_step(c, self.graphdef, self.mesh, sft_data=self.eval_kind == "sft")
        it = make_iterator(c, self.eval_ds, batch_size=c.data.eval_batch_size, shuffle=False, num_epochs=1, seed=0,
                           pad_id=self.pad_id)
        totals: dict[str, float] = {}
        weight_total = 0.0
        for i, local in enumerate(it):
            if c.eval.num_batches and i >= c.eval.num_batches:
                break
            batch = sharding_lib.make_global_batch(self._add_ref(local, "eval"), self.mesh)
            m = jax.device_get(self._eval_step(params, self.ref_params, batch))
            w = float(m.get("num_pairs", m.get("num_seqs", 1.0)))
            for k, v in m.items():
                if k in ("num_pairs", "num_seqs"):
                    totals[k] = totals.get(k, 0.0) + float(v)
                else:
                    totals[k] = totals.get(k, 0.0) + w * float(v)
            weight_total += w
        out = {k: (v if k in ("num_pairs", "num_seqs") else v / max(weight_total, 1e-12)) for k, v in totals.items()}
        if c.eval.generation:
            out.update(self._generation_accuracy(params))
        self.writer.write(step, out, split="eval")
        self.history.append({"step": step, "split": "eval", **out})
        return out

    def _generation_accuracy(self, params) -> dict:
        """GSM8K-style accuracy of sampled / greedy answers on the first ``eval.num_prompts``
        held-out prompts (``spo_jax.sampling.generate_texts``: left-padded fixed-shape batches,
        stopping on the tokenizer's and the model config's EOS ids), scored with
        ``spo_jax.data.gsm8k.accuracy`` against the reference response (chosen response or SFT
        completion, which ends in ``#### N``)."""
        from spo_jax import sampling
        from spo_jax.data import gsm8k
        c = self.config
        n = min(int(c.eval.num_prompts), len(self.eval_ds))
        rows = self.eval_ds.select(range(n))
        ref_col = "chosen_ids" if "chosen_ids" in rows.column_names else "completion_ids"
        refs = [self.tokenizer.decode(r, skip_special_tokens=True) for r in rows[ref_col]]
        samples = sampling.generate_texts(
            (self.graphdef, params), self.tokenizer, [list(p) for p in rows["prompt_ids"]],
            max_new_tokens=int(c.eval.max_new_tokens), key=jax.random.fold_in(jax.random.PRNGKey(int(c.seed)), 7),
            temperature=float(c.eval.temperature), batch_size=min(int(c.data.eval_batch_size), n),
            pad_id=self.pad_id)
        texts = [s[0] for s in samples]
        self.last_generations = list(zip(refs, texts))
        return {"gen/accuracy": gsm8k.accuracy(texts, refs), "gen/num_prompts": float(n)}

    # --------------------------------------------------------------- train

    def restore_if_any(self, it) -> int:
        c = self.config
        if not c.checkpoint.resume:
            return 0
        step = self.checkpointer.latest_step()
        if step is None:
            return 0
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                self.state.saveable(), self.shardings.saveable())
        restored, data_state, saved_cfg = self.checkpointer.restore(step, abstract)
        self._check_resume_config(saved_cfg)
        self.state = self.state.replace(**restored)
        if data_state:
            it.set_state(data_state)
        logger.info("resumed from %s step %d", self.checkpointer.directory, step)
        return int(step)

    def _check_resume_config(self, saved: dict) -> None:
        now = _config_dict(self.config)
        for section in ("model", "data", "loss", "spo", "optim", "stage"):
            if saved.get(section) is not None and saved.get(section) != now.get(section):
                raise config_lib.ConfigError(
                    f"config.{section} differs from the checkpoint in {self.checkpointer.directory} "
                    f"(saved {saved.get(section)!r}, now {now.get(section)!r}); use a new run_dir or set "
                    "checkpoint.resume=False")

    def _save(self, step: int, it) -> None:
        self.checkpointer.save(step, self.state.saveable(), it.get_state(), _config_dict(self.config))

    def run(self, stop_at: int | None = None) -> TrainResult:
        c = self.config
        num_steps = int(c.train.num_steps)
        last = num_steps if stop_at is None else min(int(stop_at), num_steps)
        micro_bs = c.data.batch_size // self.accum
        it = make_iterator(c, self.train_ds, batch_size=micro_bs, shuffle=c.data.shuffle, num_epochs=None,
                           seed=int(c.seed), pad_id=self.pad_id)
        start = self.restore_if_any(it)
        train_step = make_train_step(c, self.graphdef, self.tx, self.schedule, self.mesh, self.shardings)
        peak = c.metrics.peak_tflops * 1e12 if c.metrics.peak_tflops else measure_peak_flops(
            "bfloat16" if jax.devices()[0].platform != "cpu" and c.model.dtype == "bfloat16" else "float32")
        ref_n = self.num_params if self.ref_mode == "online" else 0
        progress = Progress(num_steps, initial=start, enabled=c.metrics.progress_bar and self.is_main)
        pending = None  # (step, metrics still on device)
        final_eval: dict = {}

        def read(p, next_dispatch: float | None = None):
            # step time = from this step's dispatch to the next step's dispatch (steady state:
            # the loop is paced by the device), or to now when nothing was dispatched after it.
            step, metrics, dispatched = p
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            tokens = m["tokens"]
            if not (math.isfinite(m["loss"]) and math.isfinite(m.get("grad_norm", 0.0))):
                self.checkpointer.wait()
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}: loss={m['loss']}, grad_norm={m.get('grad_norm')}; training "
                    f"stopped without saving this state. The last good checkpoint is step "
                    f"{self.checkpointer.latest_step()} in {self.checkpointer.directory}. Lower optim.learning_rate, "
                    "enable optim.grad_clip, or check the data.")
            dt = (next_dispatch if next_dispatch is not None else time.perf_counter()) - dispatched
            if step > start + 1:  # the first step of a process includes compilation
                m["step_time"] = dt
                m["tokens_per_sec"] = tokens / dt
                m["mfu"] = mfu(self.num_params, tokens, dt, peak, jax.device_count(), ref_n)
            if step % c.metrics.log_every == 0 or step == num_steps:
                self.writer.write(step, m)
                self.history.append({"step": step, "split": "train", **m})
            progress.update(1, m)

        try:
            for step in range(start, last):
                local = self._next_local(it)
                batch = sharding_lib.make_global_batch(local, self.mesh, leading_micro_axis=self.accum > 1)
                dispatched = time.perf_counter()
                self.state, metrics = train_step(self.state, batch)
                if pending is not None:
                    read(pending, dispatched)  # step t's metrics, after step t+1 was dispatched
                pending = (step + 1, metrics, dispatched)
                done = step + 1
                save_now = done == last or (c.checkpoint.every and done % c.checkpoint.every == 0)
                eval_now = bool(c.eval.every) and done % c.eval.every == 0 and done != num_steps
                if save_now or eval_now:
                    read(pending)  # never save or evaluate a state whose step was not checked
                    pending = None
                if save_now:
                    self._save(done, it)
                if eval_now:
                    self.evaluate(self.state.params, done)
            if pending is not None:
                read(pending)
            self.checkpointer.wait()
            finished = last == num_steps
            if self.eval_ds is not None and finished:
                final_eval = self.evaluate(self.state.params, num_steps)
            export = self._export() if c.checkpoint.export_hf and finished else None
        finally:
            progress.close()
            self.writer.flush()
            self.checkpointer.close()
            self.writer.close()
        return TrainResult(self.state, self.graphdef, self.history, final_eval, self.run_dir, export, start)

    def _export(self) -> str | None:
        """The final policy in HF format (``models.save_pretrained``) under <run_dir>/hf_final."""
        from spo_jax import models
        params = jax.jit(lambda p: p, out_shardings=sharding_lib.replicated(self.mesh))(self.state.params)
        path = os.path.join(self.run_dir, "hf_final")
        if self.is_main:
            model = nnx.merge(self.graphdef, jax.device_get(params))
            models.save_pretrained(model, path)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(path)
        return path

    def run_eval(self) -> TrainResult:
        """Stage "eval": restore the latest checkpoint if the run has one, then evaluate."""
        c = self.config
        start = 0
        if c.checkpoint.resume and self.checkpointer.latest_step() is not None:
            class _NoIter:
                def set_state(self, _):
                    pass
            start = self.restore_if_any(_NoIter())
        try:
            out = self.evaluate(self.state.params, start)
        finally:
            self.writer.flush()
            self.checkpointer.close()
            self.writer.close()
        return TrainResult(self.state, self.graphdef, self.history, out, self.run_dir, None, start)


def train(config, *, train_data=None, eval_data=None, stop_at: int | None = None) -> TrainResult:
    """Validate ``config``, then run its stage. ``train_data`` / ``eval_data``
    (optional ``datasets.Dataset`` in any supported row format) replace the
    ``data.train_path`` / ``data.eval_path`` sources (the fields may then be
    empty). ``stop_at``: end this invocation after that optimizer step (with a
    checkpoint there, as a pre-empted job would; a later call resumes). The run
    resumes from the latest complete checkpoint in ``run_dir`` when
    ``checkpoint.resume``. Returns a ``TrainResult``."""
    c = config
    sharding_lib.initialize_distributed(c.distributed.coordinator_address, c.distributed.num_processes,
                                        c.distributed.process_id, c.distributed.cpu_collectives)
    validate_for_run(c, train_data=train_data, eval_data=eval_data)
    loop = _Loop(c, train_data=train_data, eval_data=eval_data)
    if c.stage == "eval":
        return loop.run_eval()
    return loop.run(stop_at=stop_at)


def validate_for_run(config, *, train_data=None, eval_data=None) -> None:
    """``config.validate_config`` with in-memory datasets standing in for paths."""
    if train_data is None and eval_data is None:
        config_lib.validate_config(config)
        return
    c = config.copy_and_resolve_references()
    if train_data is not None and not c.data.train_path:
        c.data.train_path = "<in-memory>"
    if eval_data is not None and not c.data.eval_path:
        c.data.eval_path = "<in-memory>"
    config_lib.validate_config(c)


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/<name>.py)",
                                    lock_config=True)

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments {args[1:]}; use --config.a.b=value")
        cfg = flags.FLAGS.config
        if cfg is None:
            raise app.UsageError("--config experiments/<name>.py is required")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        try:
            result = train(cfg)
        except config_lib.ConfigError as e:
            raise SystemExit(f"config error: {e}") from None
        if jax.process_index() == 0:
            summary = {"run_dir": result.run_dir, "start_step": result.start_step,
                       "final_eval": result.final_eval, "export_dir": result.export_dir}
            last = next((h for h in reversed(result.history) if h["split"] == "train"), None)
            if last:
                summary["last_train"] = last
            print(json.dumps(summary, default=str))

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
