"""The trainer's configuration: the ml_collections default and its validation.

``get_default_config()`` returns a *locked* ``ConfigDict`` (a typo such as
``--config.optim.learnig_rate=1e-4`` fails with the list of valid keys). Two
sub-dicts are deliberately unlocked because their keys depend on a choice:
``loss.hparams`` (the keyword arguments of ``spo_jax.losses.get_loss(loss.name,
**hparams)``, validated by the loss registry, which names the valid ones) and
``model.config`` (an inline Hugging Face ``config.json`` dict).

Every field is read by ``spo_jax.train`` (no dead fields), except ``compile_cache``, read by the CLI. The schema:

stage                      "sft" | "preference" | "eval"
run_dir                    run directory: checkpoints/, metrics.jsonl, tb/, hf_final/, ref_cache/
seed                       int: parameter init (from-scratch models), data order, PRNG state
compile_cache              JAX persistent compilation cache directory, read by the CLI (spo_jax.cli):
                           "" = $SPO_JAX_COMPILE_CACHE, else ~/.cache/spo_jax/jax_cache; "off" disables
                           it (spo_jax.compile_cache; Python callers use enable_compile_cache)

model.path                 local HF directory, Hub id or ``.gguf`` file ("" -> use model.config)
model.config               inline HF-style config dict for a from-scratch model (None -> use model.path)
model.tokenizer            "" (= model.path), "synthetic" (the synthetic task's tokenizer) or a path/Hub id
model.dtype                compute dtype: "float32" | "bfloat16" | "float16"
model.param_dtype          master-weight dtype (the optimizer's): "float32" | "bfloat16"
model.remat                rematerialise each decoder layer in the backward pass

reference.mode             "online" (frozen reference forward inside the step), "cached" (one pass
                           before training, stored on disk) or "none" (reference-free losses, SFT)
reference.path             reference model source; "" = the initial policy (model.path / model.config)
reference.cache_dir        "" = <run_dir>/ref_cache

data.train_path            dataset file / save_to_disk dir / Hub id (required for sft, preference)
data.train_split           split of train_path
data.eval_path             held-out set ("" = none)
data.eval_split            split of eval_path
data.format                "auto" or one of spo_jax.data.FORMATS
data.max_length            tokens per sequence (prompt + one response)
data.min_prompt_length     prompt truncation floor in tokens
data.use_chat_template     render prompts with the tokenizer's chat template
data.packing               packed (True) or padded (False) batches
data.length_bucket         padded T rounded up to a multiple of this; 0 = next power of two
data.pack_rows             packed rows per process and micro-batch (0 = automatic)
data.pack_length           packed row length (0 = data.max_length)
data.shuffle               reshuffle every epoch
data.batch_size            global examples (pairs, or SFT examples) per optimizer step
data.eval_batch_size       global examples per evaluation batch

loss.name                  a registered loss (spo_jax.losses.get_loss); stage "sft" ignores it
loss.hparams               its hyperparameters (unlocked dict, validated by get_loss)
loss.sft_weight            > 0 adds sft_weight * token-mean NLL of the chosen response ("DPO + λ·NLL")

spo.enabled                wrap the preference loss in SPO (spo_jax.objectives.make_spo_solver)
spo.<field>                spo_jax.bilevel.SPOConfig fields: solver, gamma, epsilon, value, per_sample,
                           squared, inner_steps, inner_lr, inner_optimizer, mu, cg_iters, cg_tol,
                           barrier_alpha, barrier_delta, remat

optim.learning_rate        peak learning rate
optim.schedule             "cosine" | "linear" | "constant" (after a linear warm-up)
optim.warmup_steps         warm-up steps (from 0 to the peak)
optim.min_lr_ratio         final learning rate = learning_rate * min_lr_ratio
optim.weight_decay         AdamW decoupled weight decay (matrices only, not norms/biases)
optim.b1, optim.b2, optim.eps   AdamW moments
optim.grad_clip            global-norm clipping threshold (0 = off)
optim.grad_accum_steps     micro-batches per optimizer step (scan inside the step)

train.num_steps            optimizer steps

logprobs.seq_chunk         positions per chunk of the log-prob computation (0 = all at once, which
                           materialises [batch, length, vocab] logits; default 128)
logprobs.vocab_chunk       vocabulary chunk (0 = the whole vocabulary at once)

mesh.data, mesh.fsdp, mesh.tensor   device-mesh axis sizes; one may be -1 (= the remaining devices)

distributed.coordinator_address   "" = single process; "auto" = jax.distributed.initialize() without
                                  arguments (TPU pods, SLURM); "host:port" = explicit
distributed.num_processes          explicit: number of processes
distributed.process_id             explicit: this process's id
distributed.cpu_collectives        CPU backend collectives for multi-process CPU runs ("gloo" | "mpi")

checkpoint.every           save every N optimizer steps (0 = only at the end)
checkpoint.keep            keep the last K checkpoints
checkpoint.async_save      write checkpoints in the background (Orbax async)
checkpoint.resume          resume from the latest complete checkpoint in run_dir
checkpoint.export_hf       export the final policy in HF format to <run_dir>/hf_final

eval.every                 evaluate every N steps (0 = only at the end; needs data.eval_path)
eval.num_batches           held-out batches per evaluation (0 = the whole eval set)
eval.generation            also measure generation accuracy (GSM8K-format answers "#### n")
eval.num_prompts           prompts for generation accuracy
eval.max_new_tokens        generation budget
eval.temperature           0 = greedy

metrics.log_every          write metrics every N steps
metrics.jsonl              write <run_dir>/metrics.jsonl
metrics.tensorboard        write TensorBoard events to <run_dir>/tb
metrics.progress_bar       tqdm progress bar
metrics.peak_tflops        peak FLOP/s per device in TFLOP/s for MFU (0 = measure a matmul)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import ml_collections

from spo_jax import bilevel, losses, objectives
from spo_jax import reference as reference_lib
from spo_jax.data.loading import FORMATS

STAGES = ("sft", "preference", "eval")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
PARAM_DTYPES = ("float32", "bfloat16")


def get_default_config() -> ml_collections.ConfigDict:
    """The default configuration (locked, except ``loss.hparams`` and ``model.config``)."""
    c = ml_collections.ConfigDict()
    c.stage = "preference"
    c.run_dir = ""
    c.seed = 0
    c.compile_cache = ""

    c.model = ml_collections.ConfigDict()
    c.model.path = ""
    c.model.config = None  # a ConfigDict of HF config.json fields when set
    c.model.tokenizer = ""
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = False

    c.reference = ml_collections.ConfigDict()
    c.reference.mode = "cached"
    c.reference.path = ""
    c.reference.cache_dir = ""

    c.data = ml_collections.ConfigDict()
    c.data.train_path = ""
    c.data.train_split = "train"
    c.data.eval_path = ""
    c.data.eval_split = "test"
    c.data.format = "auto"
    c.data.max_length = 512
    c.data.min_prompt_length = 64
    c.data.use_chat_template = False
    c.data.packing = False
    c.data.length_bucket = 64
    c.data.pack_rows = 0
    c.data.pack_length = 0
    c.data.shuffle = True
    c.data.batch_size = 8
    c.data.eval_batch_size = 8

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "dpo"
    c.loss.hparams = ml_collections.ConfigDict({"beta": 0.1})
    c.loss.sft_weight = 0.0

    c.spo = ml_collections.ConfigDict({"enabled": False, **dataclasses.asdict(bilevel.SPOConfig())})

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0
    c.optim.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100

    c.logprobs = ml_collections.ConfigDict()
    c.logprobs.seq_chunk = 128
    c.logprobs.vocab_chunk = 0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.cpu_collectives = "gloo"

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.resume = True
    c.checkpoint.export_hf = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0
    c.eval.num_batches = 0
    c.eval.generation = False
    c.eval.num_prompts = 64
    c.eval.max_new_tokens = 256
    c.eval.temperature = 0.0

    c.metrics = ml_collections.ConfigDict()
    c.metrics.log_every = 1
    c.metrics.jsonl = True
    c.metrics.tensorboard = True
    c.metrics.progress_bar = True
    c.metrics.peak_tflops = 0.0

    c.lock()
    c.loss.hparams.unlock()
    return c


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


class ConfigError(ValueError):
    """A configuration mistake; the message names the field, the value and the fix."""


def _fail(field: str, value: Any, why: str) -> None:
    raise ConfigError(f"config.{field}={value!r}: {why}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_keys(config: ml_collections.ConfigDict) -> None:
    """Unknown keys (possible when a config file built its own ConfigDict or unlocked one)."""
    default = get_default_config()

    def walk(have, want, prefix):
        for key in have.keys():
            field = f"{prefix}{key}"
            if key not in want:
                _fail(field, have[key], f"unknown key; valid keys under config.{prefix or ''}"
                      f"are {sorted(want.keys())}. Fix the spelling or remove it.")
            if field in ("loss.hparams", "model.config"):
                continue
            if isinstance(want[key], ml_collections.ConfigDict):
                if not isinstance(have[key], (ml_collections.ConfigDict, dict)):
                    _fail(field, have[key], "must be a dict of settings")
                walk(have[key], want[key], f"{field}.")
        missing = sorted(set(want.keys()) - set(have.keys()))
        if missing:
            _fail(prefix.rstrip(".") or "<root>", "...", f"missing key(s) {missing}; build the config from "
                  "spo_jax.config.get_default_config() and override fields instead of writing a new ConfigDict.")

    walk(config, default, "")


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with the -1 resolved; raises ConfigError if they do not fit."""
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
    for n, v in zip(names, sizes):
        if not _is_int(v) or (v < 1 and v != -1):
            _fail(n, v, "must be a positive int or -1 (the remaining devices)")
    if sizes.count(-1) > 1:
        _fail("mesh", dict(zip(names, sizes)), "at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            _fail("mesh", dict(zip(names, sizes)), f"the fixed axes ({known} devices) do not divide the "
                  f"{num_devices} available devices; choose sizes whose product divides {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        _fail("mesh", dict(zip(names, sizes)), f"data*fsdp*tensor = {known} but {num_devices} devices are "
              "available; set one axis to -1 or make the product equal the device count")
    return tuple(sizes)


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    process_count: int | None = None) -> None:
    """Check every field before anything heavy starts.

    ``num_devices`` / ``process_count`` (default: JAX's) check the mesh and that the
    batch splits over the devices and processes. Raises ``ConfigError`` (a
    ``ValueError``) naming the field, the value and the fix.
    """
    _check_keys(config)
    c = config
    if c.stage not in STAGES:
        _fail("stage", c.stage, f"must be one of {STAGES}")
    if not c.run_dir:
        _fail("run_dir", c.run_dir, "set a run directory (checkpoints, metrics and caches go there)")
    if not isinstance(c.compile_cache, str):
        _fail("compile_cache", c.compile_cache, "must be a directory, 'off', or '' (the default location)")
    if not _is_int(c.seed):
        _fail("seed", c.seed, "must be an int")

    # model
    has_path, has_cfg = bool(c.model.path), c.model.config is not None
    if has_path == has_cfg:
        _fail("model.path", c.model.path, "set exactly one of model.path (HF dir, Hub id or .gguf) and "
              f"model.config (inline HF config dict; now {c.model.config!r})")
    if has_path:
        _check_source("model.path", c.model.path)
    else:
        mc = dict(c.model.config)
        if "model_type" not in mc:
            _fail("model.config", mc, "needs 'model_type' (e.g. 'llama') like an HF config.json")
        if not c.model.tokenizer:
            _fail("model.tokenizer", c.model.tokenizer, "a from-scratch model (model.config) needs a tokenizer: "
                  "'synthetic' or a tokenizer path")
    if c.model.tokenizer and c.model.tokenizer != "synthetic":
        _check_source("model.tokenizer", c.model.tokenizer)
    if c.model.dtype not in DTYPES:
        _fail("model.dtype", c.model.dtype, f"must be one of {DTYPES}")
    if c.model.param_dtype not in PARAM_DTYPES:
        _fail("model.param_dtype", c.model.param_dtype, f"must be one of {PARAM_DTYPES}")
    if not isinstance(c.model.remat, bool):
        _fail("model.remat", c.model.remat, "must be True or False")

    # reference
    if c.reference.mode not in reference_lib.MODES:
        _fail("reference.mode", c.reference.mode, f"must be one of {reference_lib.MODES}")
    if c.reference.path:
        _check_source("reference.path", c.reference.path)
    if c.stage == "sft" and c.reference.mode != "none":
        _fail("reference.mode", c.reference.mode, "stage 'sft' uses no reference model; set reference.mode='none'")

    # data
    d = c.data
    if c.stage in ("sft", "preference"):
        if not d.train_path:
            _fail("data.train_path", d.train_path, f"stage {c.stage!r} needs a training set "
                  "(a file, a save_to_disk dir or a Hub id)")
    if d.train_path:
        _check_source("data.train_path", d.train_path)
    if d.eval_path:
        _check_source("data.eval_path", d.eval_path)
    if c.stage == "eval" and not d.eval_path:
        _fail("data.eval_path", d.eval_path, "stage 'eval' needs a held-out set")
    if d.format != "auto" and d.format not in FORMATS:
        _fail("data.format", d.format, f"must be 'auto' or one of {FORMATS}")
    for name in ("max_length", "batch_size", "eval_batch_size"):
        v = d[name]
        if not _is_int(v) or v < (2 if name == "max_length" else 1):
            _fail(f"data.{name}", v, "must be a positive int" + (" >= 2" if name == "max_length" else ""))
    for name in ("min_prompt_length", "length_bucket", "pack_rows", "pack_length"):
        if not _is_int(d[name]) or d[name] < 0:
            _fail(f"data.{name}", d[name], "must be an int >= 0")
    if d.pack_length and d.pack_length < d.max_length:
        _fail("data.pack_length", d.pack_length, f"must be >= data.max_length={d.max_length} (or 0)")
    for name in ("packing", "shuffle", "use_chat_template"):
        if not isinstance(d[name], bool):
            _fail(f"data.{name}", d[name], "must be True or False")

    # loss / spo
    if c.stage != "sft":
        try:
            losses.get_loss(c.loss.name, **dict(c.loss.hparams))
        except (ValueError, TypeError, KeyError) as e:
            _fail(f"loss", {"name": c.loss.name, "hparams": dict(c.loss.hparams)}, str(e))
    if not _is_num(c.loss.sft_weight) or c.loss.sft_weight < 0:
        _fail("loss.sft_weight", c.loss.sft_weight, "must be a finite number >= 0")
    if not isinstance(c.spo.enabled, bool):
        _fail("spo.enabled", c.spo.enabled, "must be True or False")
    if c.spo.enabled:
        if c.stage == "sft":
            _fail("spo.enabled", True, "SPO wraps a preference loss; use stage='preference'")
        try:
            objectives.spo_config(c)
        except ValueError as e:
            raise ConfigError(f"config.spo: {e}") from None
    if objectives.needs_reference(c) and c.reference.mode == "none":
        _fail("reference.mode", c.reference.mode, f"loss {c.loss.name!r}"
              f"{' with spo.value=reference' if c.spo.enabled else ''} needs reference log-probs; "
              "use 'online' or 'cached'")

    # optim
    o = c.optim
    for name in ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip", "min_lr_ratio"):
        if not _is_num(o[name]) or o[name] < 0:
            _fail(f"optim.{name}", o[name], "must be a finite number >= 0")
    if o.learning_rate <= 0:
        _fail("optim.learning_rate", o.learning_rate, "must be > 0")
    if not o.b1 < 1 or not o.b2 < 1:
        _fail("optim.b1/b2", (o.b1, o.b2), "must be in [0, 1)")
    if o.min_lr_ratio > 1:
        _fail("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    if o.schedule not in SCHEDULES:
        _fail("optim.schedule", o.schedule, f"must be one of {SCHEDULES}")
    if not _is_int(o.warmup_steps) or o.warmup_steps < 0:
        _fail("optim.warmup_steps", o.warmup_steps, "must be an int >= 0")
    if not _is_int(o.grad_accum_steps) or o.grad_accum_steps < 1:
        _fail("optim.grad_accum_steps", o.grad_accum_steps, "must be an int >= 1")
    if not _is_int(c.train.num_steps) or c.train.num_steps < 1:
        _fail("train.num_steps", c.train.num_steps, "must be an int >= 1")
    if o.warmup_steps > c.train.num_steps:
        _fail("optim.warmup_steps", o.warmup_steps, f"exceeds train.num_steps={c.train.num_steps}")

    for name in ("seq_chunk", "vocab_chunk"):
        if not _is_int(c.logprobs[name]) or c.logprobs[name] < 0:
            _fail(f"logprobs.{name}", c.logprobs[name], "must be an int >= 0 (0 = no chunking)")

    # distributed
    dist = c.distributed
    if dist.coordinator_address not in ("", "auto"):
        if ":" not in dist.coordinator_address:
            _fail("distributed.coordinator_address", dist.coordinator_address, "must be 'host:port', 'auto' or ''")
        if not _is_int(dist.num_processes) or dist.num_processes < 1:
            _fail("distributed.num_processes", dist.num_processes, "must be an int >= 1")
        if not _is_int(dist.process_id) or not 0 <= dist.process_id < dist.num_processes:
            _fail("distributed.process_id", dist.process_id, f"must be in [0, {dist.num_processes})")
    if dist.cpu_collectives not in ("gloo", "mpi"):
        _fail("distributed.cpu_collectives", dist.cpu_collectives, "must be 'gloo' or 'mpi'")

    # checkpoint / eval / metrics
    for field, v, lo in (("checkpoint.every", c.checkpoint.every, 0), ("checkpoint.keep", c.checkpoint.keep, 1),
                         ("eval.every", c.eval.every, 0), ("eval.num_batches", c.eval.num_batches, 0),
                         ("eval.num_prompts", c.eval.num_prompts, 1), ("eval.max_new_tokens", c.eval.max_new_tokens, 1),
                         ("metrics.log_every", c.metrics.log_every, 1)):
        if not _is_int(v) or v < lo:
            _fail(field, v, f"must be an int >= {lo}")
    for field in ("checkpoint.async_save", "checkpoint.resume", "checkpoint.export_hf", "eval.generation",
                  "metrics.jsonl", "metrics.tensorboard", "metrics.progress_bar"):
        sec, key = field.split(".")
        if not isinstance(c[sec][key], bool):
            _fail(field, c[sec][key], "must be True or False")
    if not _is_num(c.eval.temperature) or c.eval.temperature < 0:
        _fail("eval.temperature", c.eval.temperature, "must be >= 0 (0 = greedy)")
    if not _is_num(c.metrics.peak_tflops) or c.metrics.peak_tflops < 0:
        _fail("metrics.peak_tflops", c.metrics.peak_tflops, "must be >= 0 (0 = measure)")
    if c.eval.every and not d.eval_path:
        _fail("eval.every", c.eval.every, "periodic evaluation needs data.eval_path")
    if c.eval.generation and not d.eval_path:
        _fail("eval.generation", True, "generation accuracy needs data.eval_path (GSM8K-format answers)")

    # devices: mesh and batch divisibility
    if num_devices is None or process_count is None:
        num_devices = jax.device_count() if num_devices is None else num_devices
        process_count = jax.process_count() if process_count is None else process_count
    data_n, fsdp_n, _ = mesh_shape(c, num_devices)
    shards = data_n * fsdp_n
    k = 1 if c.stage == "sft" else 2
    if c.stage != "eval":
        if d.batch_size % o.grad_accum_steps:
            _fail("data.batch_size", d.batch_size, f"must be divisible by optim.grad_accum_steps={o.grad_accum_steps}")
        micro = d.batch_size // o.grad_accum_steps
        if micro % process_count:
            _fail("data.batch_size", d.batch_size, f"the micro-batch of {micro} examples does not split over "
                  f"{process_count} processes; use a multiple of {process_count * o.grad_accum_steps}")
        if not d.packing and (k * micro) % shards:
            _fail("data.batch_size", d.batch_size, f"{k * micro} sequences per micro-batch do not split over "
                  f"mesh.data*mesh.fsdp = {shards} devices; use a batch_size (per accumulation step) whose "
                  f"{'2x ' if k == 2 else ''}is a multiple of {shards}")
        if d.packing and d.pack_rows == 0:
            _fail("data.pack_rows", 0, "packed batches need an explicit pack_rows (rows per process) so that "
                  f"the rows split over the {shards} data*fsdp devices")
        if d.packing and (d.pack_rows * process_count) % shards:
            _fail("data.pack_rows", d.pack_rows, f"pack_rows*processes = {d.pack_rows * process_count} must be a "
                  f"multiple of mesh.data*mesh.fsdp = {shards}")
    if d.eval_path:
        if d.eval_batch_size % process_count or (k * d.eval_batch_size) % shards:
            _fail("data.eval_batch_size", d.eval_batch_size, f"must split over {process_count} process(es) and "
                  f"({'2x ' if k == 2 else ''}) over mesh.data*mesh.fsdp = {shards} devices")


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".gguf", ".json", ".jsonl", ".parquet", ".csv",
                                                                 ".arrow", ".gz")) or os.sep in value.strip("/") and \
        value.count("/") > 1


def _check_source(field: str, value: str) -> None:
    """A path that looks local must exist (Hub ids like ``org/name`` are left to the loader)."""
    if not isinstance(value, str):
        _fail(field, value, "must be a string (a path or a Hub id)")
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        return
    if _looks_local(value):
        _fail(field, value, "no such file or directory; fix the path (Hub ids look like 'org/name')")
