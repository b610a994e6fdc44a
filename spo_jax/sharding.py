"""Device mesh, partition rules and global batch assembly.

One code path for 1 CPU, N simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``), GPUs and TPU pod slices,
single- or multi-process (``jax.distributed.initialize``).

* ``make_mesh((data, fsdp, tensor))``: a ``jax.sharding.Mesh`` with axes
  ``("data", "fsdp", "tensor")``. Parameters are sharded over ``fsdp`` (ZeRO-3
  style: every weight matrix split along one dimension, gathered for use by XLA)
  and ``tensor`` (Megatron-style column/row splits); the batch is split over
  ``("data", "fsdp")`` and replicated over ``tensor``.
* Partition rules: an ordered list of ``(regex, PartitionSpec)``; the first regex
  that ``re.search``-es the parameter path (``"/"``-joined keys, e.g.
  ``"layers/0/attn/q_proj/kernel"``) gives the spec. A spec shorter than the
  array's rank is left-padded with ``None`` (stacked-layer leading axes); a mesh
  axis that does not divide its dimension is dropped for that dimension (a tiny
  vocabulary is then replicated rather than failing), so every rule set is valid
  on every mesh.
* ``make_global_batch``: each process's local NumPy batch -> global ``jax.Array``
  with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXES", "BATCH_AXES", "LLAMA_RULES", "DEFAULT_RULES", "resolve_axes", "make_mesh", "path_str",
           "spec_for", "param_specs", "param_shardings", "replicated", "batch_spec", "batch_shardings",
           "make_global_batch", "check_batch_divisible", "initialize_distributed"]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Regexes on "/"-joined parameter paths. Column-parallel projections (D -> F):
# [D, F] kernels split D over fsdp and F over tensor; row-parallel (F -> D):
# [F, D] split F over tensor and D over fsdp. Embeddings [V, D]: V over tensor,
# D over fsdp; an untied output head [D, V]: D over fsdp, V over tensor.
# Norm scales and biases are replicated (they are tiny). LoRA adapters (spo_jax.models.lora:
# <proj>/lora/lora_a [in, r], lora_b [r, out]) follow their projection's tensor split and are
# replicated over fsdp (a few MB: sharding them would only add gathers).
LLAMA_RULES: tuple[tuple[str, P], ...] = (
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora/lora_b$", P(None, "tensor")),
    (r"(o_proj|down_proj)/lora/lora_a$", P("tensor", None)),
    (r"/lora/lora_[ab]$", P()),
    (r"(pos_embed|wpe)", P(None, "fsdp")),  # GPT-2's learned positions [P, D]
    (r"(embed|embed_tokens|wte|tok_embeddings)/(embedding|weight|value)?$", P("tensor", "fsdp")),
    (r"(embed|embed_tokens|wte|tok_embeddings)", P("tensor", "fsdp")),
    (r"(lm_head|unembed|output)/(kernel|weight)", P("fsdp", "tensor")),
    (r"(q_proj|k_proj|v_proj|qkv|wq|wk|wv|gate_proj|up_proj|w1|w3|c_attn|c_fc)/kernel", P("fsdp", "tensor")),
    (r"(o_proj|down_proj|wo|w2|c_proj)/kernel", P("tensor", "fsdp")),
    (r"(norm|ln_|layernorm|scale|bias)", P()),
)
DEFAULT_RULES = LLAMA_RULES


def resolve_axes(sizes: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 replaced by the remaining devices."""
    sizes = list(sizes)
    if len(sizes) != 3:
        raise ValueError(f"mesh sizes={sizes!r}: expected 3 sizes (data, fsdp, tensor)")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes={sizes!r}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes={sizes!r}: fixed axes ({known}) do not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(f"mesh sizes={sizes!r}: product {int(np.prod(sizes))} != {num_devices} devices; "
                         "set one axis to -1 or make the product equal the device count")
    return tuple(int(s) for s in sizes)


def make_mesh(sizes: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` over all (global) devices with axes ``("data", "fsdp", "tensor")``.

    ``sizes`` may contain one ``-1``. Uses ``jax.make_mesh`` (topology-aware device
    order on TPU/GPU); with explicit ``devices``, reshapes them in order.
    """
    devs = list(jax.devices() if devices is None else devices)
    shape = resolve_axes(sizes, len(devs))
    if devices is None:
        try:
            return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
        except TypeError:  # older signature
            return jax.make_mesh(shape, AXES)
    return Mesh(np.asarray(devs, dtype=object).reshape(shape), AXES)


def path_str(path: Sequence[Any]) -> str:
    """``"/"``-joined key path of a pytree leaf (dict keys, attributes, indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Left-pad ``spec`` to ``len(shape)`` and drop mesh axes that do not divide a dimension."""
    entries = list(spec)
    if len(entries) > len(shape):
        # A rule written for a matrix matched a lower-rank leaf: keep the trailing entries.
        entries = entries[len(entries) - len(shape):]
    entries = [None] * (len(shape) - len(entries)) + entries
    out = []
    for dim, entry in zip(shape, entries):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        kept, size = [], 1
        for a in axes:
            n = mesh.shape[a]
            if dim % (size * n) == 0:
                kept.append(a)
                size *= n
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def spec_for(path: str, shape: Sequence[int], rules: Sequence[tuple[str, P]], mesh: Mesh) -> P:
    """The PartitionSpec of one parameter: first matching rule, fitted to the shape and mesh.

    Unmatched parameters of rank >= 2 are split over ``fsdp`` along their largest
    dimension; unmatched vectors and scalars are replicated.
    """
    for pattern, spec in rules:
        if re.search(pattern, path):
            return _fit_spec(spec, shape, mesh)
    if len(shape) >= 2:
        big = int(np.argmax(shape))
        entries = [None] * len(shape)
        entries[big] = "fsdp"
        return _fit_spec(P(*entries), shape, mesh)
    return P()


def param_specs(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> Any:
    """Pytree of PartitionSpecs for ``params`` (arrays or ``jax.ShapeDtypeStruct``s)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(path_str(path), np.shape(x), rules, mesh), params)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = DEFAULT_RULES) -> Any:
    """Pytree of ``NamedSharding``s for ``params``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def on_mesh(mesh: Mesh, fn):
    """``fn`` traced under ``mesh``'s abstract mesh, so that the model's ``gathered`` / ``batch_split``
    constraints apply (the trainer's jitted steps; elsewhere they are no-ops)."""
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(AXES) <= set(mesh.axis_names) else mesh


def gathered(w, spec: P):
    """A weight where it is used: constrained to ``spec`` (its partition rule without ``"fsdp"``), i.e.
    all-gathered over fsdp (ZeRO-3 / FSDP). Its gradient is then a local partial sum, reduce-scattered onto
    the parameter's split: without this XLA may gather the batch-split activations (or their cotangents)
    whole over the batch for a weight gradient instead, so per-device memory stops falling with the
    number of devices. A no-op outside ``on_mesh``."""
    mesh = _context_mesh()
    if mesh is None or mesh.shape["fsdp"] == 1:
        return w
    return jax.lax.with_sharding_constraint(w, _fit_spec(spec, w.shape, mesh))


def batch_split(x):
    """An activation ``[batch, ...]`` constrained to its leading axis over ``("data", "fsdp")`` (a no-op
    outside ``on_mesh``)."""
    mesh = _context_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, _fit_spec(batch_spec(x.ndim), x.shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(ndim: int) -> P:
    """Leading (row / sequence) axis over ``("data", "fsdp")``; the rest replicated."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, leading_micro_axis: bool = False) -> dict:
    """``NamedSharding`` per batch key (nested dicts allowed, e.g. ``batch["sft"]``).

    With ``leading_micro_axis`` every array carries a leading micro-batch axis
    (gradient accumulation) that is not sharded.
    """
    def one(x):
        nd = np.ndim(x)
        if nd == 0:
            return replicated(mesh)
        if leading_micro_axis:
            return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (nd - 2))))
        return NamedSharding(mesh, batch_spec(nd))

    return jax.tree.map(one, dict(batch))


def make_global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, leading_micro_axis: bool = False) -> dict:
    """Assemble global ``jax.Array``s from each process's local NumPy slice.

    Every process passes its own rows/sequences (Contract 1: ``seq_ids`` already
    global); the global leading (row / sequence) dimension is the concatenation
    over processes in process order. Sharded over ``("data", "fsdp")``.

    ``local``: Contract 1, a dict of arrays (``help(spo_jax.data.batching)``): ``input_ids``, ``targets``,
    ``loss_mask``, ``positions``, ``segment_ids``, ``seq_ids`` [R, T]; ``example_index``, ``seq_valid`` [S];
    ``score_index`` [R, N]; preference data interleaves sequence 2i (pair i's chosen) and 2i+1 (its
    rejected); optional ``ref_logps`` [S] (reference sums) and ``sft`` (a nested SFT batch).
    """
    shardings = batch_shardings(local, mesh, leading_micro_axis)
    n = jax.process_count()

    def one(x, sharding):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.make_array_from_process_local_data(sharding, x, ())
        axis = 1 if leading_micro_axis else 0
        global_shape = list(x.shape)
        global_shape[axis] *= n
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return jax.tree.map(one, dict(local), shardings)


def check_batch_divisible(num_rows: int, num_seqs: int, mesh: Mesh) -> None:
    """Raise ValueError if a global batch of ``num_rows`` rows / ``num_seqs`` sequences
    does not split over the ``("data", "fsdp")`` devices."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, n in (("rows", num_rows), ("sequences", num_seqs)):
        if n % shards:
            raise ValueError(f"a global batch of {n} {name} does not split over mesh data*fsdp = {shards} "
                             "devices; change data.batch_size (padded) or data.pack_rows (packed)")


def initialize_distributed(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0,
                           cpu_collectives: str = "gloo") -> bool:
    """``jax.distributed.initialize`` from the config fields; returns whether it ran.

    ``""``: single process (nothing to do). ``"auto"``: no arguments (TPU pods and
    SLURM/Open MPI clusters discover the coordinator). ``"host:port"``: explicit
    ``num_processes`` / ``process_id``; on the CPU backend the cross-process
    collectives implementation is set to ``cpu_collectives`` first. Must run
    before any other JAX call touches the backend; a second call is a no-op.
    """
    if not coordinator_address:
        return False
    if jax.distributed.is_initialized():
        return True
    if coordinator_address == "auto":
        jax.distributed.initialize()
        return True
    try:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except Exception:  # noqa: BLE001 - option absent in some builds; GPU/TPU ignore it anyway
        pass
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=int(num_processes),
                               process_id=int(process_id))
    return True
