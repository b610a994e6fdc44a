"""LoRA in the trainer: the ``model.lora.*`` fields, the policy split into trainable adapters and a
frozen base, and the run's LoRA exports.

With ``model.lora.enabled`` the policy is the base model (``model.path`` / ``model.config``) with
``spo_jax.models.lora`` adapters on the targeted projections. The train state's ``params`` are the
adapters only (fp32, whatever the base's dtype; the optimiser state follows them); its ``frozen`` field
holds the base (in ``model.lora.base_dtype``), which is never saved: a resumed run rebuilds it from its
source, so checkpoints hold the adapters and their optimiser state. The reference is the same base with
the adapters off (``Policy.base_graphdef``): no second copy of the weights. The step binds the frozen base
into the log-prob function (``bind``), so every solver differentiates w.r.t. the adapters only.

Without LoRA, ``split_policy`` is ``nnx.split`` (``frozen`` None) and ``bind`` the identity.

Fields (``model.lora.``): ``enabled``; ``rank`` (r >= 1); ``alpha`` (the update is scaled by alpha / r,
or alpha / sqrt(r) with ``use_rslora``); ``dropout`` (on the adapters' input, training only);
``targets`` ("all-linear" or comma-separated PEFT module names: q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj; GPT-2: c_attn, c_proj, c_fc, attn.c_proj, mlp.c_proj); ``base_dtype``
("" = ``model.param_dtype``, "float32" or "bfloat16"); ``init_from`` (a PEFT adapter directory to continue
training; its r, lora_alpha, target_modules and use_rslora are used, and ``rank``/``alpha``/``targets``/
``use_rslora`` must then be left at their defaults or agree with it).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from spo_jax import models
from spo_jax.models import lora
from spo_jax.validation import check_bool, check_int, fail

DEFAULTS = dict(enabled=False, rank=8, alpha=16.0, dropout=0.0, targets="all-linear", use_rslora=False,
                base_dtype="", init_from="")
BASE_DTYPES = ("", "float32", "bfloat16")
ADAPTER_DIR = "adapter_final"  # <run_dir>/adapter_final: the PEFT adapter of the final policy

__all__ = ["DEFAULTS", "default_config", "validate_config", "lora_config", "base_param_dtype", "Policy", "as_policy",
           "split_policy", "bind", "full_state", "with_dropout_key", "export"]


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(DEFAULTS))


def _targets(value: str) -> tuple[str, ...] | str:
    value = value.strip()
    return value if value == "all-linear" else tuple(t.strip() for t in value.split(",") if t.strip())


def validate_config(config) -> None:
    """The ``model.lora.*`` fields, and the reference they allow (``spo_jax.validation.ConfigError``
    naming the field). The family-specific target check runs when the model is built
    (``lora.select_modules``)."""
    lc = config.model.lora
    check_bool(config, "model.lora.enabled", "model.lora.use_rslora")
    if not lc.enabled:
        return
    check_int(config, ("model.lora.rank",), 1, " (the adapters' rank r)")
    if not isinstance(lc.alpha, (int, float)) or not lc.alpha > 0:
        fail("model.lora.alpha", lc.alpha, "must be > 0 (the update is scaled by alpha / rank)")
    if not isinstance(lc.dropout, (int, float)) or not 0.0 <= lc.dropout < 1.0:
        fail("model.lora.dropout", lc.dropout, "must be in [0, 1)")
    known = set(lora.LLAMA_TARGETS) | set(lora.GPT2_TARGETS) | {"attn.c_proj", "mlp.c_proj"}
    targets = _targets(str(lc.targets))
    if not targets:
        fail("model.lora.targets", lc.targets, "'all-linear' or comma-separated PEFT module names")
    if targets != "all-linear":
        for t in targets:
            if t not in known:
                fail("model.lora.targets", lc.targets, f"unknown target {t!r}; PEFT's names: "
                     f"{', '.join(lora.LLAMA_TARGETS)} (Llama, Mistral, Qwen) or {', '.join(lora.GPT2_TARGETS)} "
                     "(GPT-2), or 'all-linear'")
    if lc.base_dtype not in BASE_DTYPES:
        fail("model.lora.base_dtype", lc.base_dtype, f"must be one of {BASE_DTYPES} ('' = model.param_dtype)")
    if lc.init_from:
        if not os.path.isfile(os.path.join(lc.init_from, lora.ADAPTER_CONFIG)):
            fail("model.lora.init_from", lc.init_from, f"not a PEFT adapter directory (no {lora.ADAPTER_CONFIG})")
        try:
            peft_cfg = lora.read_peft_config(lc.init_from)
        except ValueError as e:
            fail("model.lora.init_from", lc.init_from, str(e))
        mine = lora_config(config, from_adapter=False)
        for field, theirs in (("rank", peft_cfg.rank), ("alpha", peft_cfg.alpha), ("targets", peft_cfg.targets),
                              ("use_rslora", peft_cfg.use_rslora)):
            if lc[field] != DEFAULTS[field] and getattr(mine, field) != theirs:
                fail(f"model.lora.{field}", lc[field], f"the adapter in model.lora.init_from has {theirs!r}; "
                     "leave the field at its default or set it to the adapter's value")
    if config.reference.path and config.reference.path != (config.model.path or None):
        fail("reference.path", config.reference.path,
             "with model.lora.enabled the reference is the base model itself (adapters off, the same weights); "
             "leave reference.path empty")


def lora_config(config, *, from_adapter: bool = True) -> lora.LoRAConfig:
    """The ``LoRAConfig`` of ``model.lora.*`` (with ``init_from``: the adapter's, and the config's dropout)."""
    lc = config.model.lora
    if from_adapter and lc.init_from:
        return dataclasses.replace(lora.read_peft_config(lc.init_from), dropout=float(lc.dropout))
    return lora.LoRAConfig(rank=int(lc.rank), alpha=float(lc.alpha), dropout=float(lc.dropout),
                           targets=_targets(str(lc.targets)), use_rslora=bool(lc.use_rslora))


def base_param_dtype(config) -> str:
    """The dtype of the policy's weights as built: the frozen base's under LoRA, else ``model.param_dtype``."""
    lc = config.model.lora
    return (lc.base_dtype or config.model.param_dtype) if lc.enabled else config.model.param_dtype


@dataclasses.dataclass(frozen=True)
class Policy:
    """The policy's graphdefs: ``graphdef`` (training: adapters on, dropout active), ``eval_graphdef``
    (no dropout) and ``base_graphdef`` (adapters off: the LoRA reference; None without LoRA)."""
    graphdef: Any
    eval_graphdef: Any
    base_graphdef: Any = None

    @property
    def lora(self) -> bool:
        return self.base_graphdef is not None


def as_policy(graphdef_or_policy) -> Policy:
    """A ``Policy`` as it is, or a plain graphdef as the policy of a run without LoRA."""
    if isinstance(graphdef_or_policy, Policy):
        return graphdef_or_policy
    return Policy(graphdef_or_policy, graphdef_or_policy)


def split_policy(config, model) -> tuple[Policy, Any, Any]:
    """``(policy, params, frozen)``: without LoRA ``nnx.split(model)`` and None; with LoRA, ``model``
    gets its adapters (fresh, drawn from ``seed``, or ``init_from``'s) and splits into the trainable
    ``nnx.LoRAParam`` state and the frozen base."""
    if not config.model.lora.enabled:
        graphdef, params = nnx.split(model)
        return Policy(graphdef, graphdef), params, None
    rngs = nnx.Rngs(int(config.seed))
    if config.model.lora.init_from:
        lora.load_peft_adapter(model, config.model.lora.init_from, dropout=float(config.model.lora.dropout),
                               rngs=rngs)
    else:
        lora.apply_lora(model, lora_config(config), rngs=rngs)
    base = lora.base_graphdef(model)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, params, frozen = lora.split_adapters(model)
    return Policy(graphdef, eval_graphdef, base), params, frozen


def full_state(params, frozen):
    """The whole model state (for ``nnx.merge`` with any of the policy's graphdefs)."""
    return params if frozen is None else nnx.merge_state(frozen, params)


def bind(logps_fn: Callable, frozen) -> Callable:
    """``logps_fn`` on the trainable ``params`` alone, the frozen base closed over (a constant for
    ``jax.grad``: no gradient, no optimiser state for it)."""
    if frozen is None:
        return logps_fn
    return lambda params, batch: logps_fn(nnx.merge_state(frozen, params), batch)


def with_dropout_key(frozen, rng, step):
    """``frozen`` with the adapters' dropout key of this step (``fold_in(rng, step)``); a resumed run draws
    the same masks. Unchanged without LoRA."""
    if frozen is None:
        return None
    return lora.set_dropout_key(frozen, jax.random.fold_in(rng, step))


def export(policy: Policy, params, frozen, run_dir: str, *, base_source: str | None, tokenizer=None) -> str:
    """Write the final LoRA policy: ``<run_dir>/hf_final`` (adapters merged into a plain HF checkpoint)
    and ``<run_dir>/adapter_final`` (the PEFT adapter, for ``peft.PeftModel.from_pretrained`` on
    ``base_source``). Host arrays expected. Returns the hf_final path."""
    model = nnx.merge(policy.eval_graphdef, full_state(params, frozen))
    hf = os.path.join(run_dir, "hf_final")
    models.save_pretrained(lora.merged_model(model), hf)
    adapter = os.path.join(run_dir, ADAPTER_DIR)
    lora.save_peft_adapter(model, adapter, base_model_name_or_path=base_source)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(hf)
        tokenizer.save_pretrained(adapter)
    return hf
