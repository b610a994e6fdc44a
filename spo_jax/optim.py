"""The optimizer: AdamW with global-norm clipping and a warm-up + decay schedule (``optim.*``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from spo_jax.validation import check_choice, check_int, fail, is_num

SCHEDULES = ("cosine", "linear", "constant")

__all__ = ["SCHEDULES", "DEFAULT_LEARNING_RATES", "learning_rate", "validate_config", "make_schedule",
           "make_optimizer"]

#: What ``optim.learning_rate = 0`` (the default) means, by what trains. Full fine-tuning: the
#: SimPO repo's SFT recipe (2e-5) and the alignment-handbook / SimPO DPO rate (5e-7), as in
#: ``spo_jax.configs.paper``. LoRA adapters (either stage): 1e-4, the low end of the 1e-4..2e-4 of
#: PEFT / TRL LoRA examples; LoRA needs a rate 10-100x full fine-tuning's (TRL's "LoRA Without
#: Regret" guide, huggingface.co/docs/trl/main/en/lora_without_regret, after Schulman et al. 2025).
DEFAULT_LEARNING_RATES = {"lora": 1e-4, "sft": 2e-5, "preference": 5e-7}


def learning_rate(config) -> float:
    """The peak learning rate of a run: ``optim.learning_rate`` when > 0, else
    :data:`DEFAULT_LEARNING_RATES` for LoRA (``model.lora.enabled``) or the stage."""
    if config.optim.learning_rate > 0:
        return float(config.optim.learning_rate)
    kind = "lora" if config.model.lora.enabled else ("sft" if config.stage == "sft" else "preference")
    return DEFAULT_LEARNING_RATES[kind]


def validate_config(c) -> None:
    """The ``optim.*`` fields and ``train.num_steps`` (``spo_jax.validation.ConfigError`` naming the field)."""
    o = c.optim
    for name in ("learning_rate", "b1", "b2", "eps", "weight_decay", "grad_clip", "min_lr_ratio"):
        if not is_num(o[name]) or o[name] < 0:
            fail(f"optim.{name}", o[name], "must be a finite number >= 0")
    if not o.b1 < 1 or not o.b2 < 1:
        fail("optim.b1/b2", (o.b1, o.b2), "must be in [0, 1)")
    if o.min_lr_ratio > 1:
        fail("optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    check_choice(c, "optim.schedule", SCHEDULES)
    check_int(c, ("optim.warmup_steps",), 0)
    check_int(c, ("optim.grad_accum_steps", "train.num_steps"), 1)
    if o.warmup_steps > c.train.num_steps:
        fail("optim.warmup_steps", o.warmup_steps, f"exceeds train.num_steps={c.train.num_steps}")


def make_schedule(optim, num_steps: int, lr: float | None = None) -> optax.Schedule:
    """Linear warm-up 0 -> lr over ``warmup_steps``, then cosine / linear decay to
    ``lr·min_lr_ratio`` at ``num_steps`` (or constant). ``lr``: the peak (default
    ``optim.learning_rate``; the trainer passes :func:`learning_rate`)."""
    lr, warm = float(optim.learning_rate if lr is None else lr), int(optim.warmup_steps)
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
    """AdamW (decay on matrices only) with global-norm clipping and the schedule.

    Without clipping the chain holds ``optax.identity()`` in its place (the same
    empty state), so a checkpoint resumes with clipping switched on or off."""
    o = config.optim
    schedule = make_schedule(o, int(config.train.num_steps), learning_rate(config))
    parts = [optax.clip_by_global_norm(float(o.grad_clip)) if o.grad_clip > 0 else optax.identity()]
    parts.append(optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
                             weight_decay=float(o.weight_decay), mask=_decay_mask))
    return optax.chain(*parts), schedule
