"""LoRA adapters on the NNX decoder, interchangeable with Hugging Face PEFT's.

Built on Flax's own blocks: each adapted projection is a ``LoRALinear``, an ``nnx.Linear`` (the base
kernel and bias, the same Variables as before, so their parameter paths, sharding rules and HF name maps
do not change) with an ``nnx.LoRA`` child holding ``lora_a [in, r]`` and ``lora_b [r, out]`` as
``nnx.LoRAParam``s (a subclass of ``nnx.Param``). Flax's ``nnx.LoRALinear`` itself does not fit: it has
no ``alpha / r`` scaling and no dropout (PEFT's ``lora_alpha`` and ``lora_dropout``) and creates a fresh
kernel instead of wrapping the loaded one. The forward is PEFT's::

    y = x @ W + b + (dropout(x) @ A @ B) * scaling,    scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

with A drawn like PEFT's ``kaiming_uniform(a=sqrt(5))`` (uniform in +-1/sqrt(in)) and B = 0, so the adapted
model equals the base at step 0. The branch is :func:`lora_delta` (its gradient written out for XLA:CPU's
layouts; the same values as autodiff). Dropout masks come from one ``LoRADropoutKey`` per model
(``set_dropout_key``; the trainer derives it from the step) and are off after ``model.eval()``. The adapter branch runs in the adapters' dtype (fp32) and is cast back
to the projection's output dtype, as PEFT does.

Targets use PEFT's names and matching rules: a list of names, each matching a module whose HF name is
the name or ends with ``"." + name``; a single string is a regex that must ``fullmatch`` the HF module
name; ``"all-linear"`` is every projection (not the output head). HF module names are those of the
``*ForCausalLM`` model, e.g. ``model.layers.3.self_attn.q_proj`` or ``transformer.h.3.attn.c_attn``.
GPT-2's fused ``c_attn`` (q | k | v along the output axis) is our separate q/k/v projections: their
three ``LoRALinear``s share one ``lora_a`` Variable (PEFT's single ``lora_A``) and each holds its third
of PEFT's ``lora_B``, so the update is the same rank-r matrix. ``c_proj`` names both ``attn.c_proj``
(our ``attn/o_proj``) and ``mlp.c_proj`` (``mlp/down_proj``), as in PEFT; ``attn.c_proj`` or
``mlp.c_proj`` picks one.

Adapters off: ``adapters_enabled(model, False)`` flips a static flag on every ``LoRALinear`` (the
graphdef changes, the state does not), so the base model runs from the same weights, with no second copy
and no adapter compute: that is the LoRA reference model. ``split_adapters`` separates the trainable
``nnx.LoRAParam`` state from the frozen base.

Interchange: ``save_peft_adapter`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained`` loads onto the original HF checkpoint; ``merged_model`` folds the
adapters into a plain ``Decoder`` (``save_pretrained`` then writes an ordinary HF checkpoint);
``load_peft_adapter`` reads a PEFT adapter directory onto a loaded base to continue training.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from spo_jax.models.config import ModelConfig
from spo_jax.models.decoder import Decoder, create_model
from spo_jax.models.paths import ModelError, damaged_file

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def family_targets(model_type: str) -> tuple[str, ...]:
    """PEFT's module names for the projections of one model family."""
    return GPT2_TARGETS if model_type == "gpt2" else LLAMA_TARGETS


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyperparameters with PEFT's meaning (``r``, ``lora_alpha``, ``lora_dropout``,
    ``target_modules``, ``use_rslora``). ``targets``: a tuple of PEFT module names, a regex string, or
    ``"all-linear"`` (the default: attention and MLP projections)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = "all-linear"
    use_rslora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRA rank={self.rank!r}: must be an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha!r}: must be > 0 (the update is scaled by alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r}: must be in [0, 1)")
        if not isinstance(self.targets, str) and (not self.targets or not all(isinstance(t, str) and t
                                                                               for t in self.targets)):
            raise ValueError(f"LoRA targets={self.targets!r}: a non-empty list of module names, a regex "
                             "string or 'all-linear'")


def hf_modules(cfg: ModelConfig) -> dict[str, tuple[tuple, ...]]:
    """HF module name (as PEFT sees it in the ``*ForCausalLM``) -> the paths of our ``nnx.Linear``s
    it covers (three for GPT-2's fused c_attn), in the order of its output axis."""
    out = {}
    for i in range(cfg.num_hidden_layers):
        attn, mlp = ("layers", i, "attn"), ("layers", i, "mlp")
        if cfg.model_type == "gpt2":
            p = f"transformer.h.{i}."
            out[p + "attn.c_attn"] = tuple((*attn, f"{n}_proj") for n in "qkv")
            out[p + "attn.c_proj"] = ((*attn, "o_proj"),)
            out[p + "mlp.c_fc"] = ((*mlp, "up_proj"),)
            out[p + "mlp.c_proj"] = ((*mlp, "down_proj"),)
            continue
        p = f"model.layers.{i}."
        for n in "qkvo":
            out[p + f"self_attn.{n}_proj"] = ((*attn, f"{n}_proj"),)
        for n in ("gate", "up", "down") if cfg.gated_mlp else ("up", "down"):
            out[p + f"mlp.{n}_proj"] = ((*mlp, f"{n}_proj"),)
    return out


def _matches(targets, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for ``target_modules`` (no layers_to_transform)."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def select_modules(cfg: ModelConfig, targets) -> list[str]:
    """The HF module names that ``targets`` adapts; a clear error for a target that names nothing."""
    names = list(hf_modules(cfg))
    known = ", ".join(family_targets(cfg.model_type))
    if isinstance(targets, str):
        chosen = [n for n in names if _matches(targets, n)]
        if not chosen:
            raise ValueError(f"LoRA targets regex {targets!r} matches no projection of this {cfg.model_type} "
                             f"model (HF module names look like {names[0]!r}); PEFT's names: {known}")
        return chosen
    for t in targets:
        if not any(_matches([t], n) for n in names):
            raise ValueError(f"unknown LoRA target {t!r} for a {cfg.model_type} model; PEFT's names for its "
                             f"projections: {known}")
    return [n for n in names if _matches(targets, n)]


def _lora_a_init():
    """PEFT's ``kaiming_uniform_(a=sqrt(5))`` on ``lora_A.weight [r, in]``: uniform in +-1/sqrt(in)."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRADropoutKey(nnx.Variable):
    """The PRNG key of the adapters' input dropout: one Variable shared by every ``LoRALinear`` of a
    model (not a parameter: it sits in the frozen part of ``split_adapters``). ``set_dropout_key``
    replaces it, e.g. once per training step; each projection folds in its own index."""


class LoRALinear(nnx.Linear):
    """An ``nnx.Linear`` plus Flax's ``nnx.LoRA`` branch, scaled and with input dropout (PEFT's forward).

    Built from an existing ``nnx.Linear``: its Variables and settings are taken over as they are (no
    new kernel), so the base parameters keep their paths and values. Dropout (``nnx.Dropout``, off
    after ``model.eval()``) draws its mask from ``fold_in(dropout_key, index)``: the same mask for
    every call under one key, so an objective evaluated several times in one step (SPO's solvers) sees
    one function.
    """

    def __init__(self, base: nnx.Linear, config: LoRAConfig, *, index: int, dropout_key: LoRADropoutKey,
                 rngs: nnx.Rngs):
        for k, v in vars(base).items():
            if not k.startswith("_"):  # nnx bookkeeping (_pytree__*) is set up by the metaclass
                setattr(self, k, v)
        self.lora = nnx.LoRA(base.in_features, config.rank, base.out_features, param_dtype=jnp.float32,
                             a_initializer=_lora_a_init(), rngs=rngs)
        self.config = config
        self.scaling = float(config.scaling)
        self.dropout = nnx.Dropout(config.dropout) if config.dropout > 0 else None
        self.dropout_key = dropout_key
        self.index = int(index)
        self.adapter_enabled = True

    def __call__(self, x, out_sharding=None):
        y = super().__call__(x, out_sharding=out_sharding)
        if not self.adapter_enabled:
            return y
        h = x
        if self.dropout is not None:
            h = self.dropout(x, rngs=jax.random.fold_in(self.dropout_key[...], self.index))
        a, b = self.lora.lora_a[...], self.lora.lora_b[...]
        h = h.astype(jnp.promote_types(h.dtype, a.dtype))  # the branch in the adapters' dtype (nnx.LoRA's)
        return (y + lora_delta(h, a, b, self.scaling)).astype(y.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x, a, b, scaling: float):
    """The adapter branch ``((x @ a) * scaling) @ b`` (``x [..., in]``, ``a [in, r]``, ``b [r, out]``): PEFT's
    ``(x @ A @ B) * scaling`` with the scaling applied in the rank-r space, where it costs nothing.

    Its gradient is written out (the same values autodiff gives) for XLA:CPU's sake: autodiff's
    ``dA = x^T @ g_u`` is a dot with output ``[in, r]``, for which XLA:CPU copies the activation ``x``
    ``[tokens, in]`` into transposed layout (for the MLP's down projection, recomputing ``silu(gate) * up``
    in that order: the largest single instruction of a SmolLM2 LoRA layer's backward). Here the dot
    is ``(g_u^T @ x)``, output ``[r, in]``, which takes ``x`` as it is, and only the small result is
    transposed (behind an optimization barrier, else XLA folds the transpose back into the dot).
    Forward-over-reverse (the implicit solver's HVPs) works: the backward is ordinary JAX."""
    return _lora_delta_fwd(x, a, b, scaling)[0]


def _lora_delta_fwd(x, a, b, scaling):
    u = (x @ a) * scaling
    return u @ b, (x, a, b, u)


def _lora_delta_bwd(scaling, res, g):
    x, a, b, u = res
    g = g.astype(u.dtype)
    gu = (g @ b.T) * scaling  # d/d(x @ a): [..., r]
    tokens = (tuple(range(x.ndim - 1)),) * 2  # contract every leading (batch, position) axis
    db = jnp.tensordot(u, g, tokens)  # [r, out]
    da = jax.lax.optimization_barrier(jnp.tensordot(gu, x, tokens)).T  # [r, in] -> [in, r]
    return (gu @ a.T).astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def _get(model, path):
    node = model
    for k in path:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def _set(model, path, value):
    parent = _get(model, path[:-1])
    setattr(parent, path[-1], value)


def apply_lora(model: Decoder, config: LoRAConfig, *, rngs: nnx.Rngs | None = None) -> list[str]:
    """Replace the targeted projections of ``model`` (in place) by ``LoRALinear``s; returns the HF module
    names adapted. fp32 adapters whatever the base's dtype; ``rngs`` draws A (and dropout masks)."""
    config.validate()
    if any(isinstance(m, LoRALinear) for _, m in nnx.iter_graph(model)):
        raise ValueError("the model already has LoRA adapters")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    chosen = select_modules(model.config, config.targets)
    mods = hf_modules(model.config)
    key = LoRADropoutKey(jax.random.PRNGKey(0))
    index = 0
    for name in chosen:
        adapted = []
        for path in mods[name]:
            adapted.append(LoRALinear(_get(model, path), config, index=index, dropout_key=key, rngs=rngs))
            index += 1
            _set(model, path, adapted[-1])
        for other in adapted[1:]:  # a fused HF projection: one A shared by its parts (PEFT's one lora_A)
            other.lora.lora_a = adapted[0].lora.lora_a
    return chosen


def adapted_modules(model: Decoder) -> dict[str, list[LoRALinear]]:
    """HF module name -> its ``LoRALinear``s, for every adapted projection of ``model``."""
    out = {}
    for name, paths in hf_modules(model.config).items():
        mods = [_get(model, p) for p in paths]
        if isinstance(mods[0], LoRALinear):
            out[name] = mods
    return out


def lora_config_of(model: Decoder) -> LoRAConfig:
    """The ``LoRAConfig`` of an adapted model, with ``targets`` the shortest PEFT list that selects
    exactly its adapted modules (leaf names, then ``parent.leaf`` names, then full names)."""
    adapted = adapted_modules(model)
    if not adapted:
        raise ValueError("the model has no LoRA adapters")
    chosen, names = set(adapted), list(hf_modules(model.config))
    for depth in (1, 2, None):
        targets = tuple(sorted({".".join(n.split(".")[-depth:]) if depth else n for n in chosen}))
        if {n for n in names if _matches(targets, n)} == chosen:
            break
    return dataclasses.replace(next(iter(adapted.values()))[0].config, targets=targets)


def adapters_enabled(model: Decoder, on: bool) -> None:
    """Switch every adapter on or off (a static flag: off runs the base model, with no adapter compute)."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, LoRALinear):
            m.adapter_enabled = bool(on)


def set_dropout_key(model_or_state, key):
    """Set the adapters' dropout key: in a model (in place) or in a state (returns the new state)."""
    if isinstance(model_or_state, nnx.Module):
        for _, m in nnx.iter_graph(model_or_state):
            if isinstance(m, LoRALinear):
                m.dropout_key[...] = key
                return None
        raise ValueError("the model has no LoRA adapters")
    flat = [(p, v.replace(key) if isinstance(v, LoRADropoutKey) else v)
            for p, v in nnx.to_flat_state(model_or_state)]
    return nnx.from_flat_state(flat)


def base_graphdef(model: Decoder):
    """The graphdef of ``model`` with its adapters off: ``nnx.merge`` it with the same state to run the
    base model (the LoRA reference) from the same weights."""
    adapters_enabled(model, False)
    try:
        return nnx.graphdef(model)
    finally:
        adapters_enabled(model, True)


def split_adapters(model: Decoder):
    """``(graphdef, adapters, base)``: the trainable ``nnx.LoRAParam`` state and the frozen rest."""
    return nnx.split(model, nnx.LoRAParam, ...)


def _delta(mods: Sequence[LoRALinear]) -> np.ndarray:
    """The fused update ``scaling * A @ B`` [in, out] of one HF projection (parts concatenated)."""
    a = np.asarray(jax.device_get(mods[0].lora.lora_a[...]), np.float32)
    b = np.concatenate([np.asarray(jax.device_get(m.lora.lora_b[...]), np.float32) for m in mods], axis=-1)
    return mods[0].scaling * (a @ b)


def merged_model(model: Decoder) -> Decoder:
    """A plain fp32 ``Decoder`` (no adapters) whose kernels are ``W + scaling * A @ B``; ``model`` is
    not changed. ``save_pretrained(merged_model(m), dir)`` writes the merged HF checkpoint."""
    cfg = model.config
    plain = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0), dtype=model.dtype))
    base = dict(nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
    new = {path: np.asarray(jax.device_get(base[path][...]), np.float32)
           for path, _ in nnx.to_flat_state(nnx.state(plain))}
    for name, mods in adapted_modules(model).items():
        delta, col = _delta(mods), 0
        for path, m in zip(hf_modules(cfg)[name], mods):
            new[(*path, "kernel")] = new[(*path, "kernel")] + delta[:, col:col + m.out_features]
            col += m.out_features
    flat = nnx.to_flat_state(nnx.state(plain))
    nnx.update(plain, nnx.from_flat_state({p: v.replace(jnp.asarray(new[p])) for p, v in flat}))
    return plain


def save_peft_adapter(model: Decoder, path: str, *, base_model_name_or_path: str | None = None) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format (adapter "default")."""
    cfg = lora_config_of(model)
    tensors = {}
    for name, mods in adapted_modules(model).items():
        a = np.asarray(jax.device_get(mods[0].lora.lora_a[...]), np.float32)
        b = np.concatenate([np.asarray(jax.device_get(m.lora.lora_b[...]), np.float32) for m in mods], axis=-1)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.T)  # [r, in]
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.T)  # [out, r]
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.use_rslora,
        "target_modules": list(cfg.targets) if not isinstance(cfg.targets, str) else cfg.targets,
        "bias": "none", "fan_in_fan_out": model.config.model_type == "gpt2",  # GPT-2's Conv1D is [in, out]
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(peft_cfg, f, indent=2)


def read_peft_config(path: str) -> LoRAConfig:
    """The ``LoRAConfig`` of a PEFT adapter directory; options spo_jax does not implement are refused."""
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(file):
        raise ModelError(f"{path}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter directory)")
    with damaged_file(file), open(file, encoding="utf-8") as f:
        d = json.load(f)
    if d.get("peft_type") != "LORA":
        raise ModelError(f"{file}: peft_type={d.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {"use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                   "rank_pattern": {}, "alpha_pattern": {}, "target_parameters": None, "exclude_modules": None}
    for k, ok in unsupported.items():
        v = d.get(k, ok)
        if v != ok and not (ok in (None, {}) and not v):
            raise ModelError(f"{file}: {k}={v!r} is not supported (spo_jax implements plain LoRA with "
                             f"{k}={ok!r})")
    targets = d.get("target_modules")
    if targets is None:
        raise ModelError(f"{file}: target_modules is null (PEFT's per-architecture default); list the modules")
    return LoRAConfig(rank=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                      targets=targets if isinstance(targets, str) else tuple(targets),
                      use_rslora=bool(d.get("use_rslora", False)))


def load_peft_adapter(model: Decoder, path: str, *, dropout: float | None = None,
                      rngs: nnx.Rngs | None = None) -> LoRAConfig:
    """Adapt ``model`` (a loaded base, in place) with the PEFT adapter in directory ``path``;
    ``dropout`` (a training choice) replaces the adapter's ``lora_dropout`` when given."""
    cfg = read_peft_config(path)
    if dropout is not None:
        cfg = dataclasses.replace(cfg, dropout=float(dropout))
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise ModelError(f"{path}: no {ADAPTER_WEIGHTS} (PEFT's safetensors adapter weights; re-save a .bin "
                         "adapter with safe_serialization=True)")
    with damaged_file(file):
        raw = load_file(file)
    bad = [k for k, v in raw.items() if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise ModelError(f"{file}: tensor(s) {bad[:3]} hold non-finite values (NaN/Inf); the adapter is damaged or "
                         "was saved from a diverged run")
    tensors = {k.removeprefix(_PEFT_PREFIX).replace(".default.", "."): v for k, v in raw.items()}
    chosen = apply_lora(model, cfg, rngs=rngs)
    wanted = {f"{n}.lora_{x}.weight" for n in chosen for x in "AB"}
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or extra:
        raise ModelError(f"{file}: the weights do not match adapter_config.json's targets on this "
                         f"{model.config.model_type} model: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, mods in adapted_modules(model).items():
        a, b = tensors[f"{name}.lora_A.weight"].T, tensors[f"{name}.lora_B.weight"].T
        out = sum(m.out_features for m in mods)
        if a.shape != (mods[0].in_features, cfg.rank) or b.shape != (cfg.rank, out):
            raise ModelError(f"{file}: {name} has lora_A {a.T.shape}, lora_B {b.T.shape}; expected "
                             f"({cfg.rank}, {mods[0].in_features}) and ({out}, {cfg.rank})")
        mods[0].lora.lora_a[...] = jnp.asarray(a, jnp.float32)
        col = 0
        for m in mods:
            m.lora.lora_b[...] = jnp.asarray(b[:, col:col + m.out_features], jnp.float32)
            col += m.out_features
    return cfg
