"""The trainer's jitted programs: ``TrainState`` and the train / eval steps.

Pure builders, no I/O: ``spo_jax.train`` (the loop) and ``spo_jax.plan`` (the pre-flight, which compiles
these same programs for a TPU slice or the local devices) both take them from here, so a plan cannot
drift from the run.

* ``TrainState`` (step, params, opt_state, rng, ref_params, frozen): the loop's state, a pytree
* ``make_step_fn(config, graphdef, tx, schedule) -> step(state, batch) -> (state, metrics)`` (pure)
* ``make_train_step(config, graphdef, tx, schedule, mesh, state_shardings)`` -> the jitted step
* ``make_eval_step(config, graphdef, mesh)`` -> jitted ``(params, ref_params, batch, frozen=None) -> metrics``

With ``model.lora.enabled`` (``spo_jax.adapters``) ``params`` are the LoRA adapters, ``frozen`` the base
model, and the step functions take an ``adapters.Policy`` (its graphdefs) where they take a graphdef.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from spo_jax import adapters, objectives
from spo_jax import reference as reference_lib
from spo_jax import sharding as sharding_lib

__all__ = ["TrainState", "make_step_fn", "make_train_step", "make_eval_step"]


class TrainState(struct.PyTreeNode):
    """The loop's state: a pytree (``jax.jit`` argument, donated).

    ``params``: the trainable parameters (``nnx.State``, master dtype);
    ``opt_state``: optax state; ``step``: int32 optimizer steps done; ``rng``: a raw
    uint32 PRNG key (sampling in evaluation); ``ref_params``: frozen reference
    parameters for ``reference.mode="online"`` (None otherwise, and under LoRA, whose reference is
    ``frozen`` with the adapters off; never saved); ``frozen``: the LoRA base (None without LoRA; never
    saved, rebuilt from its source on resume).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ref_params: Any = None
    frozen: Any = None

    def saveable(self) -> dict:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}


def make_step_fn(config, graphdef, tx: optax.GradientTransformation, schedule) -> Callable:
    """The pure step ``step(state, batch) -> (state, metrics)``.

    With ``optim.grad_accum_steps = A > 1`` every batch array has a leading
    micro-batch axis [A, ...]; gradients and metrics are averaged over a
    ``jax.lax.scan`` of the micro-batches and optax updates once.
    Metrics: the solver's (loss, rewards/*, logps/*, spo/*), ``grad_norm`` (of the
    averaged direction, before clipping), ``learning_rate`` (of this update).

    ``batch``: Contract 1, a dict of arrays (``help(spo_jax.data.batching)``): ``input_ids``, ``targets``,
    ``loss_mask``, ``positions``, ``segment_ids``, ``seq_ids`` [R, T]; ``example_index``, ``seq_valid`` [S];
    ``score_index`` [R, N]; preference data interleaves sequence 2i (pair i's chosen) and 2i+1 (its
    rejected); optional ``ref_logps`` [S] (reference sums) and ``sft`` (a nested SFT batch).
    """
    policy = adapters.as_policy(graphdef)
    logps_fn = _logps_fn(config, policy.graphdef)
    ref_logps_fn = _logps_fn(config, policy.base_graphdef) if policy.lora else logps_fn
    accum = int(config.optim.grad_accum_steps) if config.stage != "eval" else 1
    online = reference_lib.reference_mode(config) == "online"

    def micro(params, frozen, ref_params, mb):
        if online:  # under LoRA: the same base with the adapters off
            ref = adapters.full_state(params, frozen) if policy.lora else ref_params
            mb = reference_lib.with_reference(ref_logps_fn, ref, mb)
        return objectives.make_solver(config, adapters.bind(logps_fn, frozen))(params, mb)

    def step(state: TrainState, batch):
        frozen = adapters.with_dropout_key(state.frozen, state.rng, state.step)
        if accum == 1:
            grads, metrics = micro(state.params, frozen, state.ref_params, batch)
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            first = jax.tree.map(lambda x: x[0], batch)
            metric_shapes = jax.eval_shape(lambda b: micro(state.params, frozen, state.ref_params, b)[1], first)
            mzeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)

            def body(carry, mb):
                g_acc, m_acc = carry
                g, m = micro(state.params, frozen, state.ref_params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, m)), None

            (gsum, msum), _ = jax.lax.scan(body, (zeros, mzeros), batch)
            grads = jax.tree.map(lambda g: g / accum, gsum)
            metrics = jax.tree.map(lambda m: m / accum, msum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(params)  # of the updated parameters (checked before a save)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        tokens = jnp.sum(batch["segment_ids"] > 0)  # global, non-padding (and the SFT batch's)
        if "sft" in batch:
            tokens = tokens + jnp.sum(batch["sft"]["segment_ids"] > 0)
        metrics["tokens"] = tokens.astype(jnp.float32)
        rng = jax.random.fold_in(state.rng, state.step)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new, metrics

    return step


def make_train_step(config, graphdef, tx, schedule, mesh, shardings: TrainState) -> Callable:
    """``jax.jit`` of ``make_step_fn`` with state in/out shardings, the batch (and its
    SFT batch ``batch["sft"]``, when present) sharded over ``("data", "fsdp")`` and the
    state donated."""
    step = make_step_fn(config, graphdef, tx, schedule)
    accum = int(config.optim.grad_accum_steps) > 1
    micro = sharding_lib.P(None, sharding_lib.BATCH_AXES) if accum else sharding_lib.P(sharding_lib.BATCH_AXES)
    batch_sharding = jax.sharding.NamedSharding(mesh, micro)
    step = sharding_lib.on_mesh(mesh, step)  # the model's weights gathered where used, activations batch-split
    return jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(config, graphdef, mesh, *, sft_data: bool | None = None) -> Callable:
    """Jitted ``(params, ref_params, batch, frozen=None) -> metrics`` on a held-out batch, no gradient
    (``objectives.make_eval_metrics``; the online reference adds ``ref_logps`` first; ``frozen``: the
    LoRA base, whose adapters-off forward is then the reference).
    ``sft_data`` (default: stage "sft") says whether the batch holds SFT data."""
    policy = adapters.as_policy(graphdef)
    logps_fn = _logps_fn(config, policy.eval_graphdef)
    ref_logps_fn = _logps_fn(config, policy.base_graphdef) if policy.lora else logps_fn
    sft_like = config.stage == "sft" if sft_data is None else bool(sft_data)
    online = reference_lib.reference_mode(config) == "online" and not sft_like

    def step(params, ref_params, batch, frozen=None):
        if online:
            ref = adapters.full_state(params, frozen) if policy.lora else ref_params
            batch = reference_lib.with_reference(ref_logps_fn, ref, batch)
        metrics_fn = objectives.make_eval_metrics(config, adapters.bind(logps_fn, frozen), sft_data=sft_like)
        return metrics_fn(params, batch)

    return jax.jit(sharding_lib.on_mesh(mesh, step), out_shardings=sharding_lib.replicated(mesh))


def _logps_fn(config, graphdef) -> Callable:
    return objectives.make_logps_fn(graphdef, seq_chunk=config.logprobs.seq_chunk,
                                    vocab_chunk=config.logprobs.vocab_chunk)

