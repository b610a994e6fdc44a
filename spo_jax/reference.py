"""The reference model: its modes, the cached log-prob table and its key, in one place.

``reference.mode`` (trainer config):

- ``"online"``: frozen reference parameters travel in the train state; every step
  adds ``batch["ref_logps"]`` with one more forward (``with_reference``).
- ``"cached"``: one pass over each dataset before training (``compute_reference_table``)
  stores per-row sums in ``<cache_dir>/ref_logps-<key>.npz`` (``RefLogpsTable``); the
  key (``reference_cache_key``) hashes the reference's identity, the dataset's token
  ids, the tokenization and log-prob settings, so a stale cache is never read. The
  host adds ``ref_logps`` to every NumPy batch (``Reference.add_to``).
- ``"none"``: no reference (reference-free losses, SFT).

The reference is ``reference.path`` when set, else the initial policy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from spo_jax import inputs, objectives
from spo_jax import sharding as sharding_lib
from spo_jax.validation import check_choice, check_source, fail

logger = logging.getLogger("spo_jax.reference")

MODES = ("online", "cached", "none")

__all__ = ["MODES", "validate_config", "reference_mode", "with_reference", "model_identity", "dataset_identity",
           "reference_cache_key", "RefLogpsTable", "compute_reference_table", "Reference"]


def validate_config(config) -> None:
    """The ``reference.*`` fields, and that the objective gets the reference it needs
    (``objectives.needs_reference``); call after ``objectives.validate_config``."""
    c = config
    check_choice(c, "reference.mode", MODES)
    if c.reference.path:
        check_source("reference.path", c.reference.path)
    if c.stage == "sft" and c.reference.mode != "none":
        fail("reference.mode", c.reference.mode, "stage 'sft' uses no reference model; set reference.mode='none'")
    if c.reference.mode == "none" and objectives.needs_reference(c):
        fail("reference.mode", c.reference.mode, f"loss {c.loss.name!r}"
             f"{' with spo.value=reference' if c.spo.enabled else ''} needs reference log-probs; "
             "use 'online' or 'cached'")


def reference_mode(config) -> str:
    """The mode in effect: ``reference.mode``, except "none" for stage "sft"."""
    return "none" if config.stage == "sft" else config.reference.mode


def with_reference(logps_fn: Callable, ref_params, batch: Mapping[str, Any]) -> dict:
    """``batch`` plus ``ref_logps`` [S] computed with frozen reference parameters (no gradient)."""
    ref_sums, _ = logps_fn(jax.lax.stop_gradient(ref_params), batch)
    return {**batch, "ref_logps": jax.lax.stop_gradient(ref_sums)}


# --------------------------------------------------------------------------- #
# The cache key
# --------------------------------------------------------------------------- #


def model_identity(config, source: str | None = None) -> dict:
    """What determines a model's weights: the path with its files' sizes and mtimes, or
    the inline config and seed; and the dtypes."""
    path = source or config.model.path
    ident: dict[str, Any] = {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
    if config.model.lora.enabled and not source:  # the LoRA reference: the base, in its own dtype
        ident["param_dtype"] = config.model.lora.base_dtype or config.model.param_dtype
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


# --------------------------------------------------------------------------- #
# The cached table
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
        """A saved table; ``ValueError`` (or numpy's / zipfile's error) when the file is not a whole one."""
        with np.load(path) as f:
            ex, logps = np.asarray(f["example_index"]), np.asarray(f["logps"])
        if ex.ndim != 1 or logps.ndim != 2 or len(ex) != len(logps) or not np.isfinite(logps).all():
            raise ValueError(f"arrays of shapes {ex.shape} / {logps.shape}, finite: {bool(np.isfinite(logps).all())}")
        return cls(ex, logps)


def compute_reference_table(config, graphdef, ref_params, dataset, mesh, pad_id: int,
                            batch_size: int) -> RefLogpsTable:
    """One pass over ``dataset`` (in order, padded batches) with the reference model."""
    logps_fn = objectives.make_logps_fn(graphdef, seq_chunk=config.logprobs.seq_chunk, vocab_chunk=config.logprobs.vocab_chunk)
    fn = jax.jit(lambda p, b: logps_fn(p, b)[0], out_shardings=sharding_lib.replicated(mesh))
    it = inputs.make_iterator(config, dataset, batch_size=batch_size, shuffle=False, num_epochs=1, seed=0,
                              pad_id=pad_id)
    rows, values = [], []
    bar = tqdm(total=len(dataset), desc="reference log-probs", unit="example", dynamic_ncols=True,
               disable=not (config.metrics.progress_bar and jax.process_index() == 0))  # examples/s and ETA
    for local in it:
        batch = sharding_lib.make_global_batch(local, mesh)
        sums = np.asarray(jax.device_get(fn(ref_params, batch)))
        ex = np.asarray(multihost_utils.process_allgather(batch["example_index"], tiled=True)) \
            if jax.process_count() > 1 else np.asarray(local["example_index"])
        valid = ex >= 0
        rows.append(ex[valid].reshape(-1, 2)[:, 0])
        values.append(sums[valid].reshape(-1, 2))
        bar.update(int(np.sum(np.asarray(local["example_index"]) >= 0)) // 2 * jax.process_count())
    bar.close()
    return RefLogpsTable(np.concatenate(rows), np.concatenate(values))


# --------------------------------------------------------------------------- #
# The run's reference
# --------------------------------------------------------------------------- #


class Reference:
    """A run's reference in effect: ``mode``, the frozen ``params`` ("online") or the
    cached ``tables`` per split name ("cached")."""

    def __init__(self, mode: str, params=None, tables: dict[str, RefLogpsTable] | None = None):
        self.mode = mode
        self.params = params
        self.tables = tables or {}

    @classmethod
    def setup(cls, config, *, graphdef, policy_params, shard: Callable, mesh, pad_id: int, shares_policy: bool = False,
              datasets: Mapping[str, Any], batch_sizes: Mapping[str, int], run_dir: str,
              is_main: bool) -> "Reference":
        """The reference of ``config``: ``reference.path`` (loaded, ``shard`` applied) or a copy of
        ``policy_params``; for "cached", one table per dataset (``datasets[name]``, None = absent),
        read from the cache or computed with ``batch_sizes[name]`` and saved by the main process.
        ``shares_policy`` (LoRA): the reference is ``graphdef`` (the adapters-off graph) on the policy's own
        state, so nothing is copied and "online" holds no parameters (the step uses the frozen base)."""
        mode = reference_mode(config)
        if mode == "none":
            return cls(mode)
        if shares_policy:
            if mode == "online":
                return cls(mode)
            params = policy_params
        elif config.reference.path:
            _, params = nnx.split(inputs.build_model(config, config.reference.path))
            params = shard(params)
        else:
            params = jax.tree.map(jnp.copy, policy_params)
        if mode == "online":
            return cls(mode, params=params)
        c = config
        cache_dir = c.reference.cache_dir or os.path.join(run_dir, "ref_cache")
        tables = {}
        for name, ds in datasets.items():
            if ds is None:
                continue
            key = reference_cache_key(c, ds, c.reference.path or None)
            path = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"ref_logps-{key}.npz")
            if os.path.exists(path):
                try:
                    tables[name] = RefLogpsTable.load(path)
                    logger.info("reference log-probs (%s): cache hit %s", name, path)
                    continue
                except Exception as e:  # noqa: BLE001 - truncated, not an npz, wrong arrays: recompute it
                    logger.warning("reference log-probs (%s): the cache file %s is damaged (%s: %s); recomputing it",
                                   name, path, type(e).__name__, e)
            logger.info("reference log-probs (%s): computing one pass -> %s", name, path)
            tables[name] = compute_reference_table(c, graphdef, params, ds, mesh, pad_id, batch_sizes[name])
            if is_main:
                tables[name].save(path)
        return cls(mode, tables=tables)

    def add_to(self, local: dict, name: str) -> dict:
        """A local NumPy batch of split ``name`` with ``ref_logps`` from the cached table
        ("cached" mode; other modes return it unchanged)."""
        if self.mode != "cached":
            return local
        return {**local, "ref_logps": self.tables[name].lookup(local)}
