"""Plan a run before paying for it: compile its programs for the target devices, no weights, no data.

    python -m spo_jax.plan --config experiments/<name>.py [--config.a.b=value ...]
        [--topology v5e:4x4 [--num_slices 2]] [--json plan.json] [--search]

The same config file and ``--config.*`` flags as ``spo_jax.train``. ``--topology``: a TPU slice as
``jax.experimental.topologies`` names it (``v4:2x2x2``, ``v5e:4x4``, ``v5p:4x4x4``, ``v6e:2x4``, ...),
compiled by libtpu's compiler on this machine with no TPU present; without it, the local devices.

The model is built from its shapes alone (``nnx.eval_shape``): ``model.config``, else
``<model.path>/config.json``, else the config file's own ``hf_config(arg)`` (``experiments/paper.py``
carries its models' HF config fields), else a Hub id's config (needs the network). The batch is the
config's largest (``data.max_length`` tokens, every position scored). The programs are the trainer's own
(``steps.make_train_step`` / ``make_eval_step`` with ``sharding.param_shardings``), lowered on abstract
arguments and compiled; for each, per device: argument / temporary / output bytes (XLA's
``memory_analysis``) against the capacity (the chip's HBM, ``CHIPS``; on a CPU the host's free RAM; on a
GPU the device's limit), whether it fits, FLOPs and the compiler's step-time estimate
(``cost_analysis``: TPU only), and from the estimate tokens/s, the run's time and MFU against the chip's
published bf16 peak. A program the compiler refuses for memory is reported as not fitting, with the size
it reported. With ``eval.generation`` the sampling programs are compiled too, at their largest
(:func:`sampling_programs`: the packed prefill of one generate call's prompts and a decode chunk with the
cache at its longest).

``--search`` compiles the train step over mesh factorisations (data x fsdp x tensor), micro-batches
(``optim.grad_accum_steps`` at the same global batch), ``model.remat`` / ``model.remat_policy`` and the
log-prob chunk, and prints the fastest plan that fits with the flags that give it.

Exit codes as ``spo_jax.train`` (``spo_jax.cli.EXIT_CODES``): a bad topology name or config: 2.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spo_jax import adapters, models, validation
from spo_jax import config as config_lib
from spo_jax import reference as reference_lib
from spo_jax import sharding as sharding_lib
from spo_jax import steps as steps_lib
from spo_jax.data.batching import empty_batch
from spo_jax.metrics import mfu
from spo_jax.optim import make_optimizer
from spo_jax.validation import ConfigError

__all__ = ["quiet_libtpu", "topology_devices", "make_mesh", "host_free_bytes", "device_capacity", "hf_config",
           "planning_config", "abstract_policy", "abstract_state", "batch_shapes", "train_batch", "eval_batch",
           "tokens_per_step", "compile_program", "plan", "candidates", "search", "flags_text", "preflight",
           "format_report", "search_table", "run", "main", "CHIPS", "TOPOLOGY_FORMS", "PREFLIGHT_MODES"]

GiB = 1 << 30

#: TPU chips by ``device_kind``: (HBM bytes, peak bf16 FLOP/s, HBM bandwidth bytes/s, source), per chip.
CHIPS = {
    "TPU v4": (32 * GiB, 275e12, 1228e9, "cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 1228 GB/s, 275 bf16 TFLOP/s"),
    "TPU v5 lite": (16 * GiB, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 819 GB/s, 197 bf16 TFLOP/s"),
    "TPU v5": (95 * GiB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 2765 GB/s, 459 bf16 TFLOP/s"),
    "TPU v6 lite": (32 * GiB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e: 32 GiB HBM, 1640 GB/s, 918 bf16 TFLOP/s"),
}
TOPOLOGY_FORMS = "v4:2x2x2, v5e:2x2, v5e:4x4, v5e:8x8, v5p:2x2x1, v5p:4x4x4, v6e:2x4 (TPU generation:chips per axis)"
_TOPOLOGY = re.compile(r"^v(4|5e|5p|6e|5litepod|6litepod):\d+(x\d+){1,2}$")


# --------------------------------------------------------------------------- #
# Devices
# --------------------------------------------------------------------------- #


def quiet_libtpu() -> None:
    """Environment that keeps libtpu from probing for a TPU host (its start-up errors on stderr) and lets
    several processes load it (deviceless compiles hold no chip); a TPU VM's own settings are kept."""
    for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                 ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(k, v)


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The devices of TPU topology ``name`` (``num_slices`` slices over DCN), compiled for without a TPU."""
    if not _TOPOLOGY.match(name or "") or int(num_slices) < 1:
        raise ConfigError(f"--topology={name!r} --num_slices={num_slices}: not a TPU topology; use one of "
                          f"{TOPOLOGY_FORMS}, and --num_slices >= 1")
    quiet_libtpu()
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                                 num_slices=int(num_slices)).devices)
    except Exception as e:  # noqa: BLE001 - libtpu missing or a name it rejects: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--topology={name!r}: {first}; use one of {TOPOLOGY_FORMS} (needs libtpu: "
                          "pip install \"libtpu==0.0.42.*\", the version jax 0.10.2 pins)") from None


def make_mesh(config, devices) -> jax.sharding.Mesh:
    """The trainer's ``(data, fsdp, tensor)`` mesh over ``devices`` (topology-aware order where JAX has one)."""
    shape = sharding_lib.resolve_axes((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), len(devices))
    try:
        return jax.make_mesh(shape, sharding_lib.AXES, devices=devices,
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    except Exception:  # noqa: BLE001 - multi-slice devices JAX cannot place: in order (slices outermost)
        return sharding_lib.make_mesh(shape, devices)


def host_free_bytes() -> int:
    """The host's available RAM (``MemAvailable``), else its physical RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_capacity(device) -> tuple[int, float | None, float | None, str]:
    """(memory bytes per device, peak bf16 FLOP/s, memory bandwidth bytes/s (None where unknown), source)."""
    if device.platform == "cpu":
        return host_free_bytes(), None, None, "host MemAvailable (all simulated CPU devices share it)"
    kind = getattr(device, "device_kind", "")
    if kind in CHIPS:
        return CHIPS[kind]
    try:
        return int(device.memory_stats()["bytes_limit"]), None, None, f"{kind}: memory_stats()['bytes_limit']"
    except Exception:  # noqa: BLE001
        raise ConfigError(f"no memory capacity known for device kind {kind!r}; add it to spo_jax.plan.CHIPS") from None


# --------------------------------------------------------------------------- #
# The model's shapes, the abstract state and batches
# --------------------------------------------------------------------------- #


def hf_config(config, config_file: str = "", *, hub: bool = True) -> dict:
    """The model's HF config fields without its weights (see the module docstring for the order; ``hub``:
    also ask the Hub for a Hub id's config)."""
    if config.model.config is not None:
        return dict(config.model.config)
    path = os.path.expanduser(config.model.path)
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    file, _, arg = (config_file or "").partition(":")
    if file.endswith(".py") and os.path.isfile(file):
        spec = importlib.util.spec_from_file_location("_spo_plan_config", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "hf_config"):
            return dict(module.hf_config(arg) if arg else module.hf_config())
    if not hub:
        raise ConfigError(f"config.model.path={config.model.path!r}: no config.json there")
    try:
        import transformers
        return transformers.AutoConfig.from_pretrained(config.model.path).to_dict()
    except Exception as e:  # noqa: BLE001 - no network, not a Hub id
        raise ConfigError(f"config.model.path={config.model.path!r}: no config.json there and no Hub config "
                          f"({type(e).__name__}); plan with --config.model.config=<HF config dict> or a directory "
                          "holding config.json") from None


def planning_config(config, hf: dict):
    """A copy of ``config`` that builds the model from ``hf`` (no weights) with in-memory data stand-ins, so
    that validation and the builders run without any file; the shapes and settings are the run's."""
    c = config.copy_and_resolve_references()
    c.model.path = ""
    c.model.config = dict(hf)
    c.model.tokenizer = "synthetic"
    c.model.lora.init_from = ""  # an adapter of the configured rank: the same shapes
    c.reference.path = ""  # a reference of another model is not planned: the policy's shapes
    for field in ("train_path", "eval_path", "sft_path"):
        if c.data[field] or (field == "train_path" and c.stage != "eval"):
            c.data[field] = validation.IN_MEMORY + ">"
    return c


def abstract_policy(config):
    """``(policy, abstract params, abstract frozen)`` of the config's model, built under ``nnx.eval_shape``."""
    kw = {"dtype": jnp.dtype(config.model.dtype), "param_dtype": jnp.dtype(adapters.base_param_dtype(config))}
    mcfg = models.ModelConfig.from_hf(dict(config.model.config))
    holder = {}

    def build():
        model = models.create_model(mcfg, rngs=nnx.Rngs(0), **kw)
        models.set_remat(model, bool(config.model.remat), config.model.remat_policy)
        models.set_attention(model, config.model.attention)
        policy, params, frozen = adapters.split_policy(config, model)
        holder["policy"] = policy
        return params, frozen

    params, frozen = jax.eval_shape(build)
    return holder["policy"], params, frozen


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_state(config, mesh):
    """``(policy, abstract TrainState with the trainer's shardings, its shardings, tx, schedule)``."""
    policy, params, frozen = abstract_policy(config)
    tx, schedule = make_optimizer(config)
    online = reference_lib.reference_mode(config) == "online" and not policy.lora
    state = steps_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                 opt_state=jax.eval_shape(tx.init, params),
                                 rng=jax.ShapeDtypeStruct((2,), jnp.uint32), ref_params=params if online else None,
                                 frozen=frozen)
    shardings = sharding_lib.param_shardings(state, mesh)
    return policy, _with_shardings(state, shardings), shardings, tx, schedule


def batch_shapes(config, examples: int, *, sft: bool, reference: bool) -> dict:
    """Contract-1 shapes of a global batch of ``examples`` at the config's largest: padded rows of
    ``data.max_length`` (packed: ``data.pack_rows`` rows of ``data.pack_length``), every position scored."""
    d = config.data
    k = 1 if sft else 2
    if d.packing:
        rows, length = int(d.pack_rows) * max(1, jax.process_count()), int(d.pack_length or d.max_length)
    else:
        rows, length = k * examples, int(d.max_length)
    b = empty_batch(rows, length, k * examples, num_scored=length)
    if reference:
        b["ref_logps"] = np.zeros((k * examples,), np.float32)
    return {key: jax.ShapeDtypeStruct(v.shape, v.dtype) for key, v in b.items()}


def train_batch(config, mesh) -> dict:
    """The train step's abstract batch (micro-batched under ``optim.grad_accum_steps``, with ``sft``)."""
    accum = int(config.optim.grad_accum_steps)
    sft_stage = config.stage == "sft"
    cached = reference_lib.reference_mode(config) == "cached"
    b = batch_shapes(config, config.data.batch_size // accum, sft=sft_stage, reference=cached)
    if config.data.sft_path:
        b["sft"] = batch_shapes(config, (config.data.sft_batch_size or config.data.batch_size) // accum, sft=True,
                                reference=False)
    if accum > 1:
        b = jax.tree.map(lambda s: jax.ShapeDtypeStruct((accum, *s.shape), s.dtype), b)
    return _with_shardings(b, sharding_lib.batch_shardings(b, mesh, leading_micro_axis=accum > 1))


def eval_batch(config, mesh, sft: bool) -> dict:
    b = batch_shapes(config, int(config.data.eval_batch_size), sft=sft,
                     reference=not sft and reference_lib.reference_mode(config) == "cached")
    return _with_shardings(b, sharding_lib.batch_shardings(b, mesh))


def tokens_per_step(config) -> int:
    """Tokens of one optimizer step at the largest batch (padding included)."""
    d = config.data
    tokens = (1 if config.stage == "sft" else 2) * d.batch_size * d.max_length
    if d.sft_path:
        tokens += (d.sft_batch_size or d.batch_size) * d.max_length
    return int(tokens)


# --------------------------------------------------------------------------- #
# Compiling and reading the compiler's numbers
# --------------------------------------------------------------------------- #

#: libtpu's refusal: "... the total memory required for HLO temporaries (25.10G) exceeds available HBM (15.75G)"
_OOM = re.compile(r"temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM \(([\d.]+)([KMGT]?)i?B?\)", re.I)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _refused(e: Exception) -> dict | None:
    """The sizes of a compile refused for memory (``CompileTimeHbmOom`` / RESOURCE_EXHAUSTED), else None:
    ``temp_bytes`` / ``needed_bytes`` the temporaries the compiler reported, ``compiler_limit_bytes`` the HBM
    it had for them."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "HbmOom" not in text and "out of memory" not in text.lower():
        return None
    m = _OOM.search(text)
    used = int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if m else None
    limit = int(float(m.group(3)) * _UNITS[m.group(4).upper()]) if m else None
    return {"temp_bytes": used, "needed_bytes": used, "compiler_limit_bytes": limit,
            "error": next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)[:300]}


def compile_program(jitted, args, capacity: int, peak_flops: float | None = None,
                    bandwidth: float | None = None) -> tuple[Any, dict]:
    """``(executable or None, report)``: ``jitted.lower(*args).compile()`` and its per-device numbers. The step
    estimate is the compiler's ``optimal_seconds`` where it gives a positive one, else (with the chip's peak
    and bandwidth) the roofline ``max(flops / peak, bytes accessed / bandwidth)``; ``estimate_source`` says
    which."""
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - only a memory refusal is a result; anything else is a bug
        refused = _refused(e)
        if refused is None:
            raise
        return None, {"fits": False, "capacity_bytes": capacity, "argument_bytes": None, "output_bytes": None,
                      "flops": None, "estimated_step_s": None, **refused}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    arg, temp, out = int(mem.argument_size_in_bytes), int(mem.temp_size_in_bytes), int(mem.output_size_in_bytes)
    alias = int(mem.alias_size_in_bytes)
    peak = arg + temp + out - alias  # donated state: its outputs reuse the arguments' buffers
    flops = float(cost["flops"]) if "flops" in cost else None
    est, source = cost.get("optimal_seconds"), "compiler"
    if est is None or est <= 0:
        est, source = None, None
        if flops and peak_flops and bandwidth and "bytes accessed" in cost:
            est, source = max(flops / peak_flops, float(cost["bytes accessed"]) / bandwidth), "roofline"
    return compiled, {"fits": peak <= capacity, "argument_bytes": arg, "temp_bytes": temp, "output_bytes": out,
                      "alias_bytes": alias, "peak_bytes": peak, "capacity_bytes": capacity, "flops": flops,
                      "estimated_step_s": None if est is None else float(est), "estimate_source": source}


def _num_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def plan(config, devices, *, programs: tuple[str, ...] = ("train_step", "eval_step", "sampling"),
         capacity: int | None = None) -> dict:
    """Compile the run's programs for ``devices`` (``config``: a ``planning_config``). Returns the report
    (``--json``'s object) with ``"executables"``: the compiled programs (dropped before printing)."""
    c = config
    config_lib.validate_config(c, num_devices=len(devices), process_count=1)
    mesh = make_mesh(c, devices)
    cap, peak_flops, bandwidth, source = device_capacity(devices[0])
    if devices[0].platform == "cpu":  # simulated CPU devices share the host's memory
        cap //= len(devices)
    cap = int(capacity or cap)
    policy, state, shardings, tx, schedule = abstract_state(c, mesh)
    out = {"topology": getattr(devices[0], "device_kind", devices[0].platform), "devices": len(devices),
           "mesh": dict(zip(sharding_lib.AXES, (int(mesh.shape[a]) for a in sharding_lib.AXES))),
           "capacity_source": source, "peak_bf16_flops": peak_flops, "programs": {}, "executables": {}}
    if "train_step" in programs and c.stage != "eval":
        step = steps_lib.make_train_step(c, policy, tx, schedule, mesh, shardings)
        exe, rep = compile_program(step, (state, train_batch(c, mesh)), cap, peak_flops, bandwidth)
        out["programs"]["train_step"], out["executables"]["train_step"] = rep, exe
        _projection(c, rep, state, peak_flops, len(devices))
    if "eval_step" in programs and c.data.eval_path:
        sft = c.stage == "sft" or (c.stage == "eval" and reference_lib.reference_mode(c) == "none")
        step = steps_lib.make_eval_step(c, policy, mesh, sft_data=sft)
        args = (state.params, state.ref_params, eval_batch(c, mesh, sft), state.frozen)
        exe, rep = compile_program(step, args, cap, peak_flops, bandwidth)
        out["programs"]["eval_step"], out["executables"]["eval_step"] = rep, exe
    if "sampling" in programs and c.eval.generation:
        for name, (jitted, args) in sampling_programs(c, policy, state).items():
            exe, rep = compile_program(jitted, args, cap, peak_flops, bandwidth)
            out["programs"][name], out["executables"][name] = rep, exe
    return out


def sampling_programs(config, policy, state) -> dict:
    """The evaluation's sampling programs (``eval.generation``: ``spo_jax.models.generate`` on the held-out
    prompts) at their largest, as ``{name: (jitted, abstract args)}``: one generate call's batch of
    ``min(data.eval_batch_size, eval.num_prompts)`` distinct prompts of ``data.max_length`` tokens (no shared
    prefix), ``sample_prefill`` (the packed prompts' forward that fills the cache) and ``sample_decode`` (one
    chunk of ``DECODE_CHUNK`` decode steps over the whole batch, its cache at its largest: the prompts plus
    ``eval.max_new_tokens`` slots). The parameters keep the trainer's shardings; the cache is planned as
    one array per layer without a sharding of its own (the run's is the prefill's, as XLA lays it out)."""
    from spo_jax.models import generation as gen
    c = config
    mcfg = models.ModelConfig.from_hf(dict(c.model.config))
    B = min(int(c.data.eval_batch_size), int(c.eval.num_prompts))
    L = int(c.data.max_length)
    ids = (np.arange(B * L, dtype=np.int64).reshape(B, L) % max(1, mcfg.vocab_size - 1) + 1).astype(np.int32)
    pack = gen.prompt_pack(mcfg, ids, np.ones_like(ids))
    graphdef, params = policy.eval_graphdef, adapters.full_state(state.params, state.frozen)
    slots = gen.length_bucket(pack.src.shape[1] + int(c.eval.max_new_tokens))
    settings = (jnp.float32(c.eval.temperature), 0, 1.0, tuple(mcfg.eos_token_ids), 0)
    decode = gen.decode_args(mcfg, jnp.dtype(c.model.dtype), graphdef, params,
                             jax.ShapeDtypeStruct((2,), jnp.uint32), B, slots, gen.DECODE_CHUNK, B, settings)
    return {"sample_prefill": (gen._prefill_jit, (graphdef, params, pack.prefix, pack.ids, pack.positions,
                                                  pack.segments)),
            "sample_decode": (gen._decode_jit, decode)}


def _projection(c, rep: dict, state, peak_flops, num_devices: int) -> None:
    """Tokens/s, the run's time and MFU from the compiler's step estimate (when it gives one)."""
    tokens = tokens_per_step(c)
    rep["tokens_per_step"] = tokens
    s = rep.get("estimated_step_s")
    if not s:
        return
    rep["tokens_per_s"] = tokens / s
    rep["run_s"] = s * int(c.train.num_steps)
    n = _num_params(state.params) + _num_params(state.frozen or {})
    ref_n = n if reference_lib.reference_mode(c) == "online" else 0
    if peak_flops:
        rep["mfu"] = mfu(n, tokens, s, peak_flops, num_devices, ref_n)


# --------------------------------------------------------------------------- #
# Search
# --------------------------------------------------------------------------- #


def _factorisations(n: int):
    for data in range(1, n + 1):
        for fsdp in range(1, n // data + 1):
            if n % (data * fsdp) == 0:
                yield data, fsdp, n // (data * fsdp)


def candidates(config, num_devices: int, *, max_tensor: int = 8) -> list[dict]:
    """Flag sets to try: mesh factorisations, micro-batches at the same global batch, remat (and its
    policy) and log-prob chunks; each only where the config's batch splits over it."""
    c = config
    out = []
    k = 1 if c.stage == "sft" else 2
    accums = [a for a in (1, 2, 4, 8, 16, 32) if c.data.batch_size % a == 0]
    remats = [(False, "full"), (True, "full"), (True, "dots_saveable")]
    chunks = sorted({int(c.logprobs.seq_chunk), 128})
    for (data, fsdp, tensor), accum, (remat, policy), chunk in itertools.product(
            _factorisations(num_devices), accums, remats, chunks):
        micro = c.data.batch_size // accum
        if tensor > max_tensor or (k * micro) % (data * fsdp):
            continue
        out.append({"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor, "optim.grad_accum_steps": accum,
                    "model.remat": remat, "model.remat_policy": policy, "logprobs.seq_chunk": chunk})
    return out


def _apply(config, flags: dict):
    c = config.copy_and_resolve_references()
    for key, value in flags.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def search(config, devices, *, limit: int = 24, capacity: int | None = None, log=print,
           keep_mesh: bool = False, first_fit: bool = False) -> list[dict]:
    """Compile the train step for up to ``limit`` candidates (fewest micro-batches first, then meshes
    with more fsdp, no remat before remat) and return the rows, fastest fitting first. Speed: the
    compiler's estimate where it gives one, else fewer FLOPs. ``keep_mesh``: only the config's mesh, and
    only settings that lower memory (remat, then more micro-batches); ``first_fit``: stop at the first
    candidate that fits."""
    cands = candidates(config, len(devices))
    if keep_mesh:
        shape = sharding_lib.resolve_axes((config.mesh.data, config.mesh.fsdp, config.mesh.tensor), len(devices))
        cands = [f for f in cands if (f["mesh.data"], f["mesh.fsdp"], f["mesh.tensor"]) == shape
                 and f["model.remat_policy"] == "full" and f["logprobs.seq_chunk"] == config.logprobs.seq_chunk
                 and (f["model.remat"] or f["optim.grad_accum_steps"] > config.optim.grad_accum_steps)
                 and f["optim.grad_accum_steps"] >= config.optim.grad_accum_steps]
        cands.sort(key=lambda f: (f["optim.grad_accum_steps"], not f["model.remat"]))
    cands = sorted(cands,
                   key=lambda f: (f["optim.grad_accum_steps"], f["model.remat"], f["model.remat_policy"] != "full",
                                  f["mesh.tensor"], -f["mesh.fsdp"],
                                  f["logprobs.seq_chunk"] != config.logprobs.seq_chunk))
    rows = []
    for flags in cands[:limit]:
        try:
            rep = plan(_apply(config, flags), devices, programs=("train_step",), capacity=capacity)
        except ConfigError as e:
            log(f"  skip {flags_text(flags)}: {e}")
            continue
        r = rep["programs"]["train_step"]
        rows.append({"flags": flags, **{k: r.get(k) for k in ("fits", "peak_bytes", "temp_bytes", "flops",
                                                             "estimated_step_s", "needed_bytes")}})
        log(f"  {'fits' if r['fits'] else 'does not fit'}: {flags_text(flags)} peak "
            f"{_gib(r.get('peak_bytes') or r.get('needed_bytes'))}")
        if first_fit and r["fits"]:
            break
    return sorted(rows, key=lambda r: (not r["fits"], r["estimated_step_s"] or math.inf, r["flops"] or math.inf))


def flags_text(flags: dict) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in flags.items())


# --------------------------------------------------------------------------- #
# The trainer's pre-flight
# --------------------------------------------------------------------------- #

PREFLIGHT_MODES = ("stop", "warn", "off")


def _upper_bound(c) -> int:
    """A generous bound on the train step's memory over all devices, from the shapes alone: fp32 parameters,
    gradients and AdamW moments (an online reference's copy too), 64 bytes per token, layer and hidden unit
    of activations and four fp32 logit chunks per sequence (a real step needs less: the step_memory
    benchmark's SmolLM2 peak is ~9 bytes per token, layer and hidden unit)."""
    m = models.ModelConfig.from_hf(dict(c.model.config))
    layer = 4 * m.hidden_size * m.num_attention_heads * m.head_dim + 3 * m.hidden_size * m.intermediate_size
    params = m.num_hidden_layers * layer + m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    state = 16 * params + (4 * params if reference_lib.reference_mode(c) == "online" else 0)
    tokens = tokens_per_step(c) // int(c.optim.grad_accum_steps)
    vocab = min(m.vocab_size, int(c.logprobs.vocab_chunk) or m.vocab_size)
    logits = 16 * (tokens // int(c.data.max_length)) * (int(c.logprobs.seq_chunk) or int(c.data.max_length)) * vocab
    return int(state + 64 * tokens * m.num_hidden_layers * m.hidden_size + logits)


def preflight(config, *, capacity: int | None = None, log=None) -> dict | None:
    """``config.preflight``: compile the train step for the local devices at the config's largest batch and
    compare its memory with what each device has (a CPU: the host's free RAM). A misfit raises
    ``ConfigError`` ("stop": one line with what the step needs, what there is and flags that fit, found
    by compiling a few micro-batch / remat settings) or logs it ("warn"). Returns the report, or None
    ("off", stage eval, a model whose shapes are not known without loading it, e.g. a .gguf file, or a
    step whose generous bound from the shapes, ``_upper_bound``, is under half the memory: no compile)."""
    import logging
    log = log or logging.getLogger("spo_jax.plan")
    if config.preflight == "off" or config.stage == "eval":
        return None
    try:
        c = planning_config(config, hf_config(config, hub=False))
    except ConfigError as e:
        log.info("pre-flight skipped: %s", e)
        return None
    devices = list(jax.devices())
    bound = _upper_bound(c)
    total = int(capacity or device_capacity(devices[0])[0] // (len(devices) if devices[0].platform == "cpu" else 1))
    if bound * 2 < total * len(devices):  # far from the limit: not worth a compile (tests, small models)
        log.info("pre-flight: at most ~%s in all, far below %s per device; not compiled", _gib(bound), _gib(total))
        return None
    rep = plan(c, devices, programs=("train_step",), capacity=capacity)
    rep.pop("executables")
    r = rep["programs"]["train_step"]
    need = r.get("peak_bytes") or r.get("needed_bytes")
    if r["fits"]:
        log.info("pre-flight: the train step needs %s of %s per device", _gib(need), _gib(r["capacity_bytes"]))
        return rep
    fit = None if config.preflight == "warn" else next(
        (row for row in search(c, devices, limit=4, capacity=capacity, log=lambda s: None, keep_mesh=True,
                               first_fit=True)
         if row["fits"]), None)
    msg = (f"config.preflight={config.preflight!r}: the train step needs {_gib(need)} per device at the largest "
           f"batch (data.batch_size={config.data.batch_size}, data.max_length={config.data.max_length}) and "
           f"{devices[0].platform} has {_gib(r['capacity_bytes'])} ({rep['capacity_source']}); "
           + (f"flags that fit: {flags_text(fit['flags'])}" if fit else "more micro-batches or remat "
              "(python -m spo_jax.plan --search), a lower data.batch_size or data.max_length, or more devices")
           + "; --config.preflight=warn runs anyway")
    if config.preflight == "warn":
        log.warning("%s", msg)
        return rep
    raise ConfigError(msg)


# --------------------------------------------------------------------------- #
# Report and command line
# --------------------------------------------------------------------------- #


def _gib(b) -> str:
    if b is None:
        return "?"
    return f"{b / GiB:.2f} GiB" if abs(b) >= GiB / 4 else f"{b / (1 << 20):.1f} MiB"


def format_report(rep: dict) -> str:
    lines = [f"{rep['devices']} x {rep['topology']}, mesh {rep['mesh']}; capacity per device: "
             f"{rep['capacity_source']}"]
    for name, r in rep["programs"].items():
        if r["argument_bytes"] is None:
            lines.append(f"{name}: DOES NOT FIT: the compiler refused it, temporaries {_gib(r.get('needed_bytes'))} "
                         f"of {_gib(r.get('compiler_limit_bytes'))} per device ({r['error']})")
            continue
        lines.append(f"{name}: {'fits' if r['fits'] else 'DOES NOT FIT'} per device: arguments "
                     f"{_gib(r['argument_bytes'])} + temporaries {_gib(r['temp_bytes'])} + outputs "
                     f"{_gib(r['output_bytes'])} - donated {_gib(r['alias_bytes'])} = {_gib(r['peak_bytes'])} of "
                     f"{_gib(r['capacity_bytes'])}")
        extra = [f"{r['flops'] / 1e12:.3g} TFLOP/device" if r.get("flops") else None,
                 f"step estimate {r['estimated_step_s']:.4g} s ({r['estimate_source']})" if r.get("estimated_step_s")
                 else "no step estimate (the compiler gives one for TPU only)",
                 f"{r['tokens_per_s']:.4g} tokens/s" if r.get("tokens_per_s") else None,
                 f"run {r['run_s'] / 3600:.3g} h" if r.get("run_s") else None,
                 f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else None]
        lines.append("    " + ", ".join(x for x in extra if x))
    return "\n".join(lines)


def _seconds(s) -> str:
    return "-" if not s else f"{s:.4g}"


def search_table(rows: list[dict]) -> str:
    lines = ["| data | fsdp | tensor | grad_accum | remat | policy | seq_chunk | fits | peak GiB | step s (estimate) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["flags"]
        peak = r["peak_bytes"] or r["needed_bytes"]
        lines.append(f"| {f['mesh.data']} | {f['mesh.fsdp']} | {f['mesh.tensor']} | {f['optim.grad_accum_steps']} "
                     f"| {f['model.remat']} | {f['model.remat_policy']} | {f['logprobs.seq_chunk']} | "
                     f"{'yes' if r['fits'] else 'no'} | {'?' if peak is None else f'{peak / GiB:.2f}'} | "
                     f"{_seconds(r['estimated_step_s'])} |")
    return "\n".join(lines)


def run(cfg) -> None:
    """The command (``spo_jax.cli.main(command=run)``): plan, optionally search, print / write JSON."""
    from absl import flags
    from ml_collections import config_flags
    f = flags.FLAGS
    devices = topology_devices(f.topology, f.num_slices) if f.topology else list(jax.devices())
    if f.topology:  # a deviceless executable cannot be stored in (or loaded from) the persistent cache
        jax.config.update("jax_enable_compilation_cache", False)
    c = planning_config(cfg, hf_config(cfg, config_flags.get_config_filename(f["config"])))
    rep = plan(c, devices)
    rep.pop("executables")
    if f.topology:
        rep["topology"] = f.topology + (f" x {f.num_slices} slices" if f.num_slices > 1 else "")
    print(format_report(rep))
    if f.search:
        rows = search(c, devices, log=lambda s: print(s, file=sys.stderr))
        print(search_table(rows))
        best = next((r for r in rows if r["fits"]), None)
        print(f"fastest that fits: {flags_text(best['flags'])}" if best else "no candidate fits")
        rep["search"] = rows
    if f.json:
        with open(f.json, "w") as fh:
            json.dump(rep, fh, indent=1, default=str)


def main(argv=None) -> None:
    from absl import flags

    from spo_jax import cli
    flags.DEFINE_string("topology", "", f"TPU topology to compile for ({TOPOLOGY_FORMS}); '' = the local devices")
    flags.DEFINE_integer("num_slices", 1, "TPU slices over DCN (multi-slice)")
    flags.DEFINE_string("json", "", "also write the report as JSON to this file")
    flags.DEFINE_bool("search", False, "search meshes / micro-batches / remat / log-prob chunks for the fastest fit")
    quiet_libtpu()  # before JAX starts its backends
    cli.main(argv, command=run, doc=__doc__)


if __name__ == "__main__":
    main()
