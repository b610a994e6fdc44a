"""A run's inputs, built from the trainer config: tokenizer, model, tokenized data, batches.

``model.*`` -> ``load_tokenizer`` / ``build_model`` (``spo_jax.models``);
``data.*`` -> ``load_split`` (``spo_jax.data.prepare_dataset``) and ``make_iterator``
(``spo_jax.data.BatchIterator``, Contract-1 NumPy batches, each process its slice);
``train_batches``: the training batches, with the SFT data's batch under ``"sft"``.
"""

from __future__ import annotations

import json
import os

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.compute as pc
from flax import nnx

from spo_jax import adapters, models
from spo_jax import sharding as sharding_lib
from spo_jax.data import FORMATS, BatchIterator, DataError, prepare_dataset, score_index, synthetic
from spo_jax.data.loading import SFT_FORMATS, load_rows
from spo_jax.validation import ConfigError, check_bool, check_choice, check_int, check_source, fail

JNP_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PARAM_DTYPES = ("float32", "bfloat16")

__all__ = ["JNP_DTYPES", "PARAM_DTYPES", "validate_config", "check_positions", "model_dtypes", "load_tokenizer", "pad_id", "build_model", "load_split",
           "make_iterator", "TrainBatches", "train_batches", "batch_devices_per_process", "stack_micro"]


def validate_config(config) -> None:
    """The ``model.*`` and ``data.*`` fields (``spo_jax.validation.ConfigError`` naming the field)."""
    _validate_model(config)
    _validate_data(config)
    mcfg = _known_model_config(config)
    if mcfg is not None:
        check_positions(config, mcfg)  # a RoPE model's warning is logged once the model is built (spo_jax.train)


def _validate_model(c) -> None:
    has_path, has_cfg = bool(c.model.path), c.model.config is not None
    if has_path == has_cfg:
        fail("model.path", c.model.path, "set exactly one of model.path (HF dir, Hub id or .gguf) and "
             f"model.config (inline HF config dict; now {c.model.config!r})")
    if has_path:
        check_source("model.path", c.model.path)
    else:
        mc = dict(c.model.config)
        if "model_type" not in mc:
            fail("model.config", mc, "needs 'model_type' (e.g. 'llama') like an HF config.json")
        if not c.model.tokenizer:
            fail("model.tokenizer", c.model.tokenizer, "a from-scratch model (model.config) needs a tokenizer: "
                 "'synthetic' or a tokenizer path")
    if c.model.tokenizer and c.model.tokenizer != "synthetic":
        check_source("model.tokenizer", c.model.tokenizer)
    check_choice(c, "model.dtype", tuple(JNP_DTYPES))
    check_choice(c, "model.param_dtype", PARAM_DTYPES)
    check_bool(c, "model.remat")
    check_choice(c, "model.remat_policy", tuple(models.REMAT_POLICIES))
    check_choice(c, "model.attention", models.ATTENTION_IMPLEMENTATIONS)


def _validate_data(c) -> None:
    d = c.data
    if c.stage in ("sft", "preference") and not d.train_path:
        fail("data.train_path", d.train_path, f"stage {c.stage!r} needs a training set "
             "(a file, a save_to_disk dir or a Hub id)")
    if d.train_path:
        check_source("data.train_path", d.train_path)
    if d.eval_path:
        check_source("data.eval_path", d.eval_path)
    if d.sft_path:
        check_source("data.sft_path", d.sft_path)
    if c.stage == "eval" and not d.eval_path:
        fail("data.eval_path", d.eval_path, "stage 'eval' needs a held-out set")
    if d.format != "auto" and d.format not in FORMATS:
        fail("data.format", d.format, f"must be 'auto' or one of {FORMATS}")
    check_int(c, ("data.max_length",), 2)
    check_int(c, ("data.batch_size", "data.eval_batch_size"), 1)
    check_int(c, ("data.min_prompt_length", "data.length_bucket", "data.pack_rows", "data.pack_length",
                  "data.sft_batch_size", "data.max_examples"), 0)
    if d.pack_length and d.pack_length < d.max_length:
        fail("data.pack_length", d.pack_length, f"must be >= data.max_length={d.max_length} (or 0)")
    check_bool(c, "data.packing", "data.shuffle", "data.use_chat_template")


def _known_model_config(c) -> models.ModelConfig | None:
    """The model's ``ModelConfig`` when it is known without loading weights or the network: ``model.config``,
    or ``model.path``'s config.json when that is a local directory (a .gguf file or a Hub id: checked once
    the model is built). None also for a config the loader rejects (it names the problem when it builds)."""
    try:
        if c.model.config is not None:
            return models.ModelConfig.from_hf(dict(c.model.config))
        cfg_file = os.path.join(os.path.expanduser(c.model.path), "config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                return models.ModelConfig.from_hf(json.load(f))
    except (ValueError, TypeError, KeyError, OSError):
        return None
    return None


def check_token_ids(config, vocab_size: int, splits: dict, pad_id: int) -> None:
    """The tokenized data against the model's embedding table: an id >= ``vocab_size`` (a tokenizer that
    is not the model's) would be a silent clamp or NaN in the gather. ``ConfigError`` naming both numbers.
    ``splits``: ``{config field: tokenized dataset or None}``."""
    tokenizer = config.model.tokenizer or config.model.path or "model.config"
    why = (f"the tokenizer (model.tokenizer={tokenizer!r}) does not belong to the model, whose vocab_size is "
           f"{vocab_size}; use the model's own tokenizer (model.tokenizer='' uses model.path's)")
    if pad_id >= vocab_size:
        fail("model.tokenizer", config.model.tokenizer, f"its padding id {pad_id} is >= the model's vocab_size "
             f"{vocab_size}: {why}")
    for field, ds in splits.items():
        if ds is None:
            continue
        table = ds.with_format("arrow")[:]
        for col in (n for n in table.column_names if n.endswith("_ids")):
            top = pc.max(pc.list_flatten(table[col])).as_py()
            if top is not None and top >= vocab_size:
                fail("model.tokenizer", config.model.tokenizer, f"{field} tokenizes to id {top} (column {col}) "
                     f"but the model's vocab_size is {vocab_size}: {why}")


def check_positions(config, mcfg: models.ModelConfig) -> str | None:
    """``data.max_length`` against the model's ``max_position_embeddings`` (``mcfg``), as transformers treats
    the family. Learned absolute positions (GPT-2's ``n_positions``) have no embedding beyond the table
    (transformers fails with an index error; JAX's gather returns NaN rows there): ``ConfigError``.
    RoPE families (Llama, Mistral, Qwen) compute any position and transformers does not refuse them, but
    positions past ``max_position_embeddings`` are outside the range the model was trained on: returns a
    warning (None when the lengths fit)."""
    n, length = int(mcfg.max_position_embeddings), int(config.data.max_length)
    if length <= n:
        return None
    source = config.model.path or "model.config"
    if mcfg.position_embedding == "learned":
        n_name = f"max_position_embeddings={n}" + (" (n_positions in its config.json)"
                                                   if mcfg.model_type == "gpt2" else "")
        fail("data.max_length", length, f"longer than the {mcfg.model_type} model's {n_name} "
             f"({source}): its learned position embeddings have no row for positions >= {n}; lower "
             f"data.max_length to <= {n}, or use a model with longer positions")
    return (f"config.data.max_length={length} is longer than the {mcfg.model_type} model's "
            f"max_position_embeddings={n} ({source}): RoPE computes those positions (transformers does not refuse "
            f"them either) but positions >= {n} are beyond the range the model was trained on; lower "
            f"data.max_length to <= {n} unless that is intended")


def model_dtypes(config) -> dict:
    """``{"dtype", "param_dtype"}`` (jnp dtypes) of ``model.dtype`` / ``model.param_dtype``."""
    return {"dtype": JNP_DTYPES[config.model.dtype], "param_dtype": JNP_DTYPES[config.model.param_dtype]}


def load_tokenizer(config):
    """``model.tokenizer``: "synthetic", a path / Hub id, or "" (= model.path)."""
    name = config.model.tokenizer or config.model.path
    if name == "synthetic":
        return synthetic.build_tokenizer(model_max_length=int(config.data.max_length))
    return models.load_tokenizer(name)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad or 0)


def build_model(config, source: str | None = None):
    """An ``nnx`` model from ``source`` (a path) or, if empty, the config's model source
    (``model.path``, or ``model.config`` initialised from ``seed``)."""
    kw = model_dtypes(config)
    if not source:  # the policy: under LoRA its base may be stored in model.lora.base_dtype
        kw["param_dtype"] = JNP_DTYPES[adapters.base_param_dtype(config)]
    path = source or config.model.path
    if path:
        model = models.from_pretrained(path, **kw)
    else:
        try:
            mcfg = models.ModelConfig.from_hf(dict(config.model.config))
        except (ValueError, TypeError, KeyError) as e:
            fail("model.config", dict(config.model.config).get("model_type"), f"{e}")
        model = models.create_model(mcfg, rngs=nnx.Rngs(int(config.seed)), **kw)
    if config.model.remat:
        models.set_remat(model, True, config.model.remat_policy)
    models.set_attention(model, config.model.attention)
    return model


def load_split(config, tokenizer, path: str, split: str, data=None, *, sft: bool = False):
    """Tokenized dataset (``spo_jax.data.prepare_dataset``) and its stats; ``data`` (an
    in-memory dataset) replaces ``path``. ``sft``: the SFT data of a preference run
    (``data.sft_path``), read with ``data.format`` only when that names an SFT format
    (else "auto"); ``ConfigError`` when its rows are not SFT rows."""
    d = config.data
    fmt = d.format if not sft or d.format in SFT_FORMATS else "auto"
    source = data if data is not None else path
    if d.max_examples:  # the first N rows, before tokenization drops any
        source = source if isinstance(source, datasets.Dataset) else load_rows(source, split=split)
        source = source.select(range(min(int(d.max_examples), len(source))))
    try:
        ds, stats = prepare_dataset(
            source, tokenizer, max_length=int(d.max_length), format=fmt,
            split=split, min_prompt_length=int(d.min_prompt_length), use_chat_template=bool(d.use_chat_template))
    except DataError as e:  # say which source, when the message does not (e.g. every row dropped)
        if isinstance(path, str) and path and path not in str(e):
            raise DataError(f"{path}: {e}") from e
        raise
    if sft and stats.get("kind") != "sft":
        fail("data.sft_path", path or "<in-memory sft_data>", f"holds {stats.get('kind')} data (format "
             f"{stats.get('format')!r}) but the SFT batch needs SFT data (prompt/completion, messages or "
             "question/answer rows); point it at an SFT dataset")
    return ds, stats


def make_iterator(config, dataset, *, batch_size: int, shuffle: bool, num_epochs: int | None, seed: int,
                  pad_id: int, drop_remainder: bool = False) -> BatchIterator:
    """This process's Contract-1 batches of ``dataset`` (padded or packed per ``data.*``)."""
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


class TrainBatches:
    """This process's training batches: the main iterator's, each with the SFT iterator's next batch
    under ``"sft"`` when the run has SFT data. Its position (checkpointed with the state) is the main
    iterator's, with the SFT iterator's under ``"sft"``."""

    def __init__(self, main: BatchIterator, sft: BatchIterator | None = None):
        self.main, self.sft = main, sft

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict:
        batch = next(self.main)
        return batch if self.sft is None else {**batch, "sft": next(self.sft)}

    def get_state(self) -> dict:
        state = self.main.get_state()
        return state if self.sft is None else {**state, "sft": self.sft.get_state()}

    def set_state(self, state: dict) -> None:
        # an SPO config runs with or without in-memory SFT data (its lower level reads them when given),
        # so the checkpoint's config check (spo_jax.checkpoint.check_resume_config) cannot catch this
        if (self.sft is not None) != ("sft" in state):
            raise ConfigError(
                f"the checkpoint's data position {'has no' if self.sft is not None else 'has an'} SFT-data iterator "
                f"but this run {'reads' if self.sft is not None else 'has no'} SFT data (config.data.sft_path); "
                "use the run's original data settings or a new run_dir")
        self.main.set_state({k: v for k, v in state.items() if k != "sft"})
        if self.sft is not None:
            self.sft.set_state(state["sft"])


def train_batches(config, train_ds, sft_ds=None, *, pad_id: int) -> TrainBatches:
    """The training micro-batches (``data.batch_size / optim.grad_accum_steps`` examples, endless, in
    ``seed``'s order) of ``train_ds`` and, when ``sft_ds`` (SFT data) is given, of ``sft_ds`` in its own
    order (``seed + 1``), size (``data.sft_batch_size``, default ``data.batch_size``) and length buckets."""
    d, accum, seed = config.data, int(config.optim.grad_accum_steps), int(config.seed)
    main = make_iterator(config, train_ds, batch_size=d.batch_size // accum, shuffle=d.shuffle, num_epochs=None,
                         seed=seed, pad_id=pad_id)
    sft = None if sft_ds is None else make_iterator(
        config, sft_ds, batch_size=(d.sft_batch_size or d.batch_size) // accum, shuffle=d.shuffle, num_epochs=None,
        seed=seed + 1, pad_id=pad_id)
    return TrainBatches(main, sft)


def batch_devices_per_process(config) -> int:
    """Devices of this process that the batch's row axis is split over (data x fsdp)."""
    data, fsdp, _ = sharding_lib.resolve_axes((config.mesh.data, config.mesh.fsdp, config.mesh.tensor),
                                              jax.device_count())
    return max(1, data * fsdp // jax.process_count())


def stack_micro(batches: list[dict]) -> dict:
    """Stack A Contract-1 batches on a new leading (micro-batch) axis, padding [R, T]
    arrays to the longest T (padding columns are valid padding: segment 0, mask 0) and
    rebuilding ``score_index`` at the largest N of the A batches. A nested batch
    (``batch["sft"]``) is stacked the same way, with its own T and N."""
    t = max(b["input_ids"].shape[1] for b in batches)
    n = max(b["score_index"].shape[1] for b in batches)
    out = {}
    for k in batches[0]:
        if isinstance(batches[0][k], dict):
            out[k] = stack_micro([b[k] for b in batches])
            continue
        arrs = []
        for b in batches:
            x = b[k]
            if k == "score_index":
                x = score_index(np.pad(b["loss_mask"], ((0, 0), (0, t - b["loss_mask"].shape[1]))), n)
            elif x.ndim == 2 and x.shape[1] < t:
                x = np.pad(x, ((0, 0), (0, t - x.shape[1])))
            arrs.append(x)
        out[k] = np.stack(arrs)
    return out
