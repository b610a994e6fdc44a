"""The trainer's configuration: the ml_collections default and its validation.

``get_default_config()`` returns a *locked* ``ConfigDict`` (a typo such as
``--config.optim.learnig_rate=1e-4`` fails with the list of valid keys). Two
sub-dicts are deliberately unlocked because their keys depend on a choice:
``loss.hparams`` (the keyword arguments of ``spo_jax.losses.get_loss(loss.name,
**hparams)``, validated by the loss registry, which names the valid ones) and
``model.config`` (an inline Hugging Face ``config.json`` dict).

Every field is read by the trainer (``spo_jax.train`` and the modules it builds
from the config: ``inputs``, ``adapters``, ``reference``, ``objectives``, ``optim``, ``sharding``; no
dead fields), except ``compile_cache``, read by the CLI. The schema:

stage                      "sft" | "preference" | "eval"
run_dir                    run directory: config.json, run_info.json (spo_jax.run_info), checkpoints/,
                           metrics.jsonl, tb/, hf_final/, ref_cache/
seed                       int: parameter init (from-scratch models), data order, PRNG state
compile_cache              JAX persistent compilation cache directory, read by the CLI (spo_jax.cli):
                           "" = $SPO_JAX_COMPILE_CACHE, else ~/.cache/spo_jax/jax_cache; "off" disables
                           it (spo_jax.compile_cache; Python callers use enable_compile_cache)
preflight                  before any data or reference work, compile the train step at the largest batch and
                           check it fits each device's memory (spo_jax.plan.preflight; skipped when a generous
                           bound from the shapes is under half of it): "stop" (a misfit is a config error naming
                           flags that fit), "warn" or "off"

model.path                 local HF directory, Hub id or ``.gguf`` file ("" -> use model.config)
model.config               inline HF-style config dict for a from-scratch model (None -> use model.path)
model.tokenizer            "" (= model.path), "synthetic" (the synthetic task's tokenizer) or a path/Hub id
model.dtype                compute dtype: "float32" | "bfloat16" | "float16"
model.param_dtype          master-weight dtype (the optimizer's): "float32" | "bfloat16"
model.remat                rematerialise each decoder layer in the backward pass (saves memory on GPU/TPU; XLA:CPU
                           keeps the forward values anyway: benchmarks/RESULTS.md, "step's memory")
model.remat_policy         what a rematerialised layer keeps (MaxText's names): "full" (nothing: least memory),
                           "dots_saveable" (matmul outputs), "dots_with_no_batch_dims_saveable"
model.attention            attention kernel (spo_jax.models.set_attention): "einsum" (default), "xla" or
                           "cudnn" (jax.nn.dot_product_attention's implementations; cudnn: NVIDIA GPUs, bf16/fp16)
model.lora.enabled         train LoRA adapters on a frozen base (spo_jax.adapters; off by default)
model.lora.rank, model.lora.alpha   adapter rank r and alpha (update scaled by alpha / r)
model.lora.use_rslora      scale the update by alpha / sqrt(r) (rsLoRA) instead of alpha / r
model.lora.dropout         dropout on the adapters' input (training only)
model.lora.targets         "all-linear" or comma-separated PEFT module names (q_proj,...,down_proj; GPT-2:
                           c_attn, c_proj, c_fc)
model.lora.base_dtype      the frozen base's dtype: "" (= model.param_dtype), "float32" or "bfloat16"
model.lora.init_from       a PEFT adapter directory to continue training ("" = fresh adapters, B = 0)

reference.mode             "online" (frozen reference forward inside the step), "cached" (one pass
                           before training, stored on disk) or "none" (reference-free losses, SFT)
reference.path             reference model source; "" = the initial policy (model.path / model.config)
reference.cache_dir        "" = <run_dir>/ref_cache

data.train_path            dataset file / save_to_disk dir / Hub id (required for sft, preference)
data.train_split           split of train_path, with an optional row slice: "train[:64]" (the first 64 rows),
                           "train[100:200]", "train[-50:]", "train[:10%]" (a single file is one split: only the
                           slice is read)
data.eval_path             held-out set ("" = none)
data.eval_split            split of eval_path (a slice as in data.train_split)
data.format                "auto" (detected from the columns) or a format: "preference" (prompt, chosen, rejected),
                           "implicit_preference" (chosen, rejected: full dialogues, the shared leading part is
                           the prompt, as HH-RLHF), "prompt_completion" (prompt, completion), "messages"
                           (messages: role/content list, the last assistant turn is the response),
                           "question_answer" (question, answer: GSM8K, rendered with a template); any text
                           field may be a role/content list (chat template). Files: .jsonl, .json, .jsonl.gz,
                           .json.gz, .parquet, .csv(.gz), .arrow, a save_to_disk directory, or a Hub id
data.max_examples          read only the first N rows of every data source (train, eval, sft) before
                           tokenization (0 = all)
data.max_length            tokens per sequence (prompt + one response); at most the model's
                           max_position_embeddings for learned positions (GPT-2: a config error), a warning
                           for RoPE models (they run past it, as in transformers, outside the trained range)
data.min_prompt_length     prompt truncation floor in tokens
data.use_chat_template     render prompts with the tokenizer's chat template
data.packing               packed (True) or padded (False) batches
data.length_bucket         padded T, and the scored positions per row N (the log-probs are computed only
                           there: Contract 1's score_index), rounded up to a multiple of this;
                           0 = next power of two (N: 4 steps per octave)
data.pack_rows             packed rows per process and micro-batch (0 = automatic)
data.pack_length           packed row length (0 = data.max_length)
data.shuffle               reshuffle every epoch
data.batch_size            global examples (pairs, or SFT examples) per optimizer step
data.eval_batch_size       global examples per evaluation batch
data.sft_path              SFT data for preference training ("" = none): an SFT-format dataset (prompt/completion,
                           messages or question/answer) batched beside the pairs as batch["sft"] (own iterator,
                           length buckets and checkpointed position); read by loss.sft_data_weight and by SPO's lower
                           level (spo.value="inner_sft", or the unrolled / implicit solvers)
data.sft_split             split of sft_path (a slice as in data.train_split)
data.sft_batch_size        global SFT examples per optimizer step (0 = data.batch_size)

loss.name                  a registered loss (spo_jax.losses.get_loss); stage "sft" ignores it
loss.hparams               its hyperparameters (unlocked dict, validated by get_loss)
loss.sft_weight            > 0 adds sft_weight * token-mean NLL of the chosen responses ("DPO + λ·NLL", RPO)
loss.sft_data_weight       > 0 adds sft_data_weight * token-mean NLL of the SFT data (data.sft_path; "DPO +
                           λ·SFT-data NLL", mixing the SFT objective into preference training; metric sft_data/nll)

spo.enabled                wrap the preference loss in SPO (spo_jax.objectives.make_spo_solver)
spo.<field>                spo_jax.bilevel.SPOConfig fields: solver, gamma, epsilon, value, per_sample,
                           squared, inner_steps, inner_lr, inner_optimizer, mu, cg_iters, cg_tol,
                           barrier_alpha, barrier_delta, remat

optim.learning_rate        peak learning rate; 0 = by what trains (spo_jax.optim.DEFAULT_LEARNING_RATES): 1e-4 with
                           LoRA, else 2e-5 for stage sft and 5e-7 for preference (full fine-tuning)
optim.schedule             "cosine" | "linear" | "constant" (after a linear warm-up)
optim.warmup_steps         warm-up steps (from 0 to the peak)
optim.min_lr_ratio         final learning rate = learning_rate * min_lr_ratio
optim.weight_decay         AdamW decoupled weight decay (matrices only, not norms/biases)
optim.b1, optim.b2, optim.eps   AdamW moments
optim.grad_clip            global-norm clipping threshold (0 = off)
optim.grad_accum_steps     micro-batches per optimizer step (scan inside the step)

train.num_steps            optimizer steps
train.on_degenerate        "stop" | "warn": what exploding parameters, a gradient norm of exactly 0 or a frozen
                           loss for train.degenerate_steps steps do (non-finite values always stop)
train.degenerate_steps     consecutive steps of zero gradient norm / identical loss that count as degenerate

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
checkpoint.strict_restore  a newest checkpoint that cannot be restored stops the run (True) instead of being
                           moved to checkpoints.corrupt/ with a fall-back to the previous one (False)
checkpoint.allow_optim_change  resume even though config.optim differs from the checkpoint's (logged)
checkpoint.export_hf       export the final policy in HF format to <run_dir>/hf_final
checkpoint.restore_step    stage eval: the checkpoint step of run_dir to evaluate (0 = the latest)

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
metrics.wandb_project      log to Weights & Biases under this project ("" = off; needs the optional dependency:
                           pip install "spo_jax[wandb]"; WANDB_MODE=offline logs without a network)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

import jax
import ml_collections

from spo_jax import adapters, bilevel, inputs, objectives, optim
from spo_jax import reference as reference_lib
from spo_jax import sharding as sharding_lib
from spo_jax.metrics import DEGENERATE_ACTIONS
from spo_jax.validation import ConfigError, check_bool, check_choice, check_int, fail, is_int, is_num

__all__ = ["ConfigError", "STAGES", "get_default_config", "validate_config"]

STAGES = ("sft", "preference", "eval")


def get_default_config() -> ml_collections.ConfigDict:
    """The default configuration (locked, except ``loss.hparams`` and ``model.config``)."""
    section = ml_collections.ConfigDict
    c = section({"stage": "preference", "run_dir": "", "seed": 0, "compile_cache": "", "preflight": "stop"})
    c.model = section({"path": "", "config": None,  # a ConfigDict of HF config.json fields when set
                       "tokenizer": "", "dtype": "bfloat16", "param_dtype": "float32", "remat": False,
                       "remat_policy": "full", "attention": "einsum", "lora": adapters.default_config()})
    c.reference = section({"mode": "cached", "path": "", "cache_dir": ""})
    c.data = section({
        "train_path": "", "train_split": "train", "eval_path": "", "eval_split": "test", "format": "auto",
        "max_length": 512, "min_prompt_length": 64, "use_chat_template": False, "packing": False,
        "length_bucket": 64, "pack_rows": 0, "pack_length": 0, "shuffle": True, "batch_size": 8,
        "eval_batch_size": 8, "sft_path": "", "sft_split": "train", "sft_batch_size": 0, "max_examples": 0})
    c.loss = section({"name": "dpo", "hparams": section({"beta": 0.1}), "sft_weight": 0.0, "sft_data_weight": 0.0})
    c.spo = section({"enabled": False, **dataclasses.asdict(bilevel.SPOConfig())})
    c.optim = section({
        "learning_rate": 0.0, "schedule": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.0, "weight_decay": 0.0,
        "b1": 0.9, "b2": 0.999, "eps": 1e-8, "grad_clip": 1.0, "grad_accum_steps": 1})
    c.train = section({"num_steps": 100, "on_degenerate": "stop", "degenerate_steps": 5})
    c.logprobs = section({"seq_chunk": 128, "vocab_chunk": 0})
    c.mesh = section({"data": -1, "fsdp": 1, "tensor": 1})
    c.distributed = section({"coordinator_address": "", "num_processes": 1, "process_id": 0,
                             "cpu_collectives": "gloo"})
    c.checkpoint = section({"every": 100, "keep": 3, "async_save": True, "resume": True, "strict_restore": False,
                            "allow_optim_change": False, "export_hf": True, "restore_step": 0})
    c.eval = section({"every": 0, "num_batches": 0, "generation": False, "num_prompts": 64, "max_new_tokens": 256,
                      "temperature": 0.0})
    c.metrics = section({"log_every": 1, "jsonl": True, "tensorboard": True, "progress_bar": True,
                         "peak_tflops": 0.0, "wandb_project": ""})
    c.lock()
    c.loss.hparams.unlock()
    return c


# --------------------------------------------------------------------------- #
# Field descriptions: the schema table above, as data (python -m spo_jax.train --help)
# --------------------------------------------------------------------------- #

_ROW = re.compile(r"^((?:[a-z_][\w.]*|spo\.<field>)(?:, [a-z_][\w.]*)*)\s{2,}(\S.*)$")
_SPO_BULLET = re.compile(r"^\s*- ((?:``\w+``[^,:]*,? ?)+):\s*(.*)$")


def field_help() -> dict[str, str]:
    """``{"section.field": description}`` for every field of :func:`get_default_config`,
    read from the schema table of this module's docstring (``spo.<field>`` from the
    bullets of ``bilevel.SPOConfig``'s docstring). ``tests/test_cli.py`` checks that
    every field has exactly one description."""
    out: dict[str, str] = {}
    names: list[str] = []
    for line in (__doc__ or "").splitlines():
        m = _ROW.match(line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                out[n] = m.group(2).strip()
        elif line.startswith(" ") and line.strip() and names:
            for n in names:
                out[n] += " " + line.strip()
        else:
            names = []
    out.pop("spo.<field>", None)
    bullets: list[str] = []
    for line in (bilevel.SPOConfig.__doc__ or "").splitlines():
        m = _SPO_BULLET.match(line)
        if m:
            bullets = re.findall(r"``(\w+)``", m.group(1))
            for n in bullets:
                out[f"spo.{n}"] = (m.group(1).replace("``", "") + ": " + m.group(2)).strip()
        elif line.strip() and bullets and line.startswith("      "):
            for n in bullets:
                out[f"spo.{n}"] += " " + line.strip()
        else:
            bullets = []
    return out


def config_fields(config=None) -> list[tuple[str, Any]]:
    """``(dotted name, value)`` of every leaf field (``loss.hparams`` and ``model.config``
    count as one field each: their keys depend on the loss / the model)."""
    config = get_default_config() if config is None else config
    out = []

    def walk(node, prefix):
        for key in sorted(node.keys()):
            name, value = f"{prefix}{key}", node[key]
            if isinstance(value, ml_collections.ConfigDict) and name not in ("loss.hparams", "model.config"):
                walk(value, f"{name}.")
            else:
                out.append((name, value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value))

    walk(config, "")
    return out


# --------------------------------------------------------------------------- #
# Validation: each module checks the fields it reads, this function assembles
# --------------------------------------------------------------------------- #


def validate_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                    process_count: int | None = None) -> None:
    """Check every field before anything heavy starts.

    Keys and the run-level sections (stage, run_dir, seed, distributed, checkpoint,
    eval, metrics) here; ``inputs.validate_config`` (model.*, data.*), ``adapters.validate_config``
    (model.lora.*),
    ``optim.validate_config`` (optim.*, train.num_steps),
    ``objectives.validate_config`` (loss.*, spo.*, logprobs.*) and
    ``reference.validate_config`` (reference.*) for theirs; last the mesh and the
    batch's split over ``num_devices`` / ``process_count`` (default: JAX's). Raises
    ``ConfigError`` (a ``ValueError``) naming the field, the value and the fix.
    """
    _check_keys(config)
    c = config
    check_choice(c, "stage", STAGES)
    if not c.run_dir:
        fail("run_dir", c.run_dir, "set a run directory (checkpoints, metrics and caches go there)")
    if os.path.exists(os.path.expanduser(c.run_dir)) and not os.path.isdir(os.path.expanduser(c.run_dir)):
        fail("run_dir", c.run_dir, "is a file, not a directory; name a directory (it is created if missing)")
    if not isinstance(c.compile_cache, str):
        fail("compile_cache", c.compile_cache, "must be a directory, 'off', or '' (the default location)")
    if not is_int(c.seed):
        fail("seed", c.seed, "must be an int")
    check_choice(c, "preflight", ("stop", "warn", "off"))
    inputs.validate_config(c)
    adapters.validate_config(c)  # before reference's: LoRA decides which reference is allowed
    objectives.validate_config(c)
    reference_lib.validate_config(c)
    optim.validate_config(c)
    _validate_distributed(c)
    _validate_hooks(c)
    _validate_devices(c, jax.device_count() if num_devices is None else num_devices,
                      jax.process_count() if process_count is None else process_count)


def _check_keys(config: ml_collections.ConfigDict) -> None:
    """Unknown keys (possible when a config file built its own ConfigDict or unlocked one)."""
    default = get_default_config()

    def walk(have, want, prefix):
        for key in have.keys():
            field = f"{prefix}{key}"
            if key not in want:
                fail(field, have[key], f"unknown key; valid keys under config.{prefix or ''}"
                     f"are {sorted(want.keys())}. Fix the spelling or remove it.")
            if field in ("loss.hparams", "model.config"):
                continue
            if isinstance(want[key], ml_collections.ConfigDict):
                if not isinstance(have[key], (ml_collections.ConfigDict, dict)):
                    fail(field, have[key], "must be a dict of settings")
                walk(have[key], want[key], f"{field}.")
        missing = sorted(set(want.keys()) - set(have.keys()))
        if missing:
            fail(prefix.rstrip(".") or "<root>", "...", f"missing key(s) {missing}; build the config from "
                 "spo_jax.config.get_default_config() and override fields instead of writing a new ConfigDict.")

    walk(config, default, "")


def _validate_distributed(c) -> None:
    """distributed.* (read by ``sharding.initialize_distributed``)."""
    dist = c.distributed
    if dist.coordinator_address not in ("", "auto"):
        if ":" not in dist.coordinator_address:
            fail("distributed.coordinator_address", dist.coordinator_address, "must be 'host:port', 'auto' or ''")
        check_int(c, ("distributed.num_processes",), 1)
        if not is_int(dist.process_id) or not 0 <= dist.process_id < dist.num_processes:
            fail("distributed.process_id", dist.process_id, f"must be in [0, {dist.num_processes})")
    check_choice(c, "distributed.cpu_collectives", ("gloo", "mpi"))


def _validate_hooks(c) -> None:
    """checkpoint.*, eval.*, metrics.*, train.on_degenerate / degenerate_steps (the loop's hooks)."""
    check_choice(c, "train.on_degenerate", DEGENERATE_ACTIONS)
    check_int(c, ("train.degenerate_steps",), 2)
    check_int(c, ("checkpoint.every", "checkpoint.restore_step", "eval.every", "eval.num_batches"), 0)
    if c.checkpoint.restore_step and not c.checkpoint.resume:
        fail("checkpoint.restore_step", c.checkpoint.restore_step, "names a checkpoint to restore, but "
             "checkpoint.resume=False restores none; set checkpoint.resume=True (or restore_step=0)")
    if c.checkpoint.restore_step and c.stage != "eval":
        fail("checkpoint.restore_step", c.checkpoint.restore_step, "names a checkpoint to evaluate: only with "
             "stage eval (training resumes from the latest); set it to 0")
    check_int(c, ("checkpoint.keep", "eval.num_prompts", "eval.max_new_tokens", "metrics.log_every"), 1)
    check_bool(c, "checkpoint.async_save", "checkpoint.resume", "checkpoint.strict_restore",
               "checkpoint.allow_optim_change", "checkpoint.export_hf",
               "eval.generation", "metrics.jsonl", "metrics.tensorboard", "metrics.progress_bar")
    if not is_num(c.eval.temperature) or c.eval.temperature < 0:
        fail("eval.temperature", c.eval.temperature, "must be >= 0 (0 = greedy)")
    if not isinstance(c.metrics.wandb_project, str):
        fail("metrics.wandb_project", c.metrics.wandb_project, "must be a W&B project name, or '' (off)")
    if c.metrics.wandb_project and importlib.util.find_spec("wandb") is None:
        fail("metrics.wandb_project", c.metrics.wandb_project, "needs the wandb package: pip install "
             "\"spo_jax[wandb]\" (or pip install wandb), or leave it '' to log to metrics.jsonl / TensorBoard only")
    if not is_num(c.metrics.peak_tflops) or c.metrics.peak_tflops < 0:
        fail("metrics.peak_tflops", c.metrics.peak_tflops, "must be >= 0 (0 = measure)")
    if c.eval.every and not c.data.eval_path:
        fail("eval.every", c.eval.every, "periodic evaluation needs data.eval_path")
    if c.eval.generation and not c.data.eval_path:
        fail("eval.generation", True, "generation accuracy needs data.eval_path (GSM8K-format answers)")


def _mesh_shape(c, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes with the -1 resolved (``sharding.resolve_axes``)."""
    sizes = {"mesh.data": c.mesh.data, "mesh.fsdp": c.mesh.fsdp, "mesh.tensor": c.mesh.tensor}
    for name, v in sizes.items():
        if not is_int(v) or (v < 1 and v != -1):
            fail(name, v, "must be a positive int or -1 (the remaining devices)")
    try:
        return sharding_lib.resolve_axes(tuple(sizes.values()), num_devices)
    except ValueError as e:
        fail("mesh", sizes, f"{e}; choose sizes that fit the {num_devices} available devices")


def _validate_devices(c, num_devices: int, process_count: int) -> None:
    """The mesh fits the devices, and every batch splits over the processes and the
    mesh's data*fsdp devices (sequences for padded batches, rows for packed ones)."""
    data_n, fsdp_n, _ = _mesh_shape(c, num_devices)
    shards = data_n * fsdp_n
    d, accum = c.data, c.optim.grad_accum_steps
    k = 1 if c.stage == "sft" else 2
    if c.stage != "eval":
        if d.batch_size % accum:
            fail("data.batch_size", d.batch_size, f"must be divisible by optim.grad_accum_steps={accum}")
        micro = d.batch_size // accum
        if micro % process_count:
            fail("data.batch_size", d.batch_size, f"the micro-batch of {micro} examples does not split over "
                 f"{process_count} processes; use a multiple of {process_count * accum}")
        if not d.packing and (k * micro) % shards:
            fail("data.batch_size", d.batch_size, f"{k * micro} sequences per micro-batch do not split over "
                 f"mesh.data*mesh.fsdp = {shards} devices; use a batch_size (per accumulation step) whose "
                 f"{'2x ' if k == 2 else ''}is a multiple of {shards}")
        if d.sft_path:
            sft_micro = (d.sft_batch_size or d.batch_size)
            if sft_micro % accum:
                fail("data.sft_batch_size", d.sft_batch_size, f"must be divisible by optim.grad_accum_steps={accum}")
            sft_micro //= accum
            if sft_micro % process_count or (not d.packing and sft_micro % shards):
                fail("data.sft_batch_size", d.sft_batch_size, f"the SFT micro-batch of {sft_micro} examples must split "
                     f"over {process_count} process(es) and (padded) over mesh.data*mesh.fsdp = {shards} devices; "
                     f"use a multiple of {max(process_count, 1 if d.packing else shards) * accum}")
        if d.packing and d.pack_rows == 0:
            fail("data.pack_rows", 0, "packed batches need an explicit pack_rows (rows per process) so that "
                 f"the rows split over the {shards} data*fsdp devices")
        if d.packing and (d.pack_rows * process_count) % shards:
            fail("data.pack_rows", d.pack_rows, f"pack_rows*processes = {d.pack_rows * process_count} must be a "
                 f"multiple of mesh.data*mesh.fsdp = {shards}")
    if d.eval_path and (d.eval_batch_size % process_count or (k * d.eval_batch_size) % shards):
        fail("data.eval_batch_size", d.eval_batch_size, f"must split over {process_count} process(es) and "
             f"({'2x ' if k == 2 else ''}) over mesh.data*mesh.fsdp = {shards} devices")
