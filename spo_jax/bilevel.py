"""Bilevel SPO solvers: penalty, barrier, unrolled (lax.scan) and implicit (CG).

The bilevel problem (docs/METHOD.md)::

    min_θ f(θ)   s.t.   θ ∈ argmin g,      relaxed to   q(θ) = g(θ) − g* ≤ ε

f is an upper objective, g the lower objective. This module holds the generic
solvers and the settings (``SPOConfig``); ``spo_jax.objectives`` builds f, c and g
for language models (the preference loss, the SPO constraint, the SFT NLL) and
picks the solver for a config.

The solvers take plain callables of ``(params, batch)`` and know nothing about
language models, so they are tested on quadratics with closed-form answers:

- ``gradient_solver(objective)``           d = ∇F (no bilevel structure: "no SPO")
- ``penalty_solver(terms, gamma)``         d = ∇(f + γ·c)
- ``barrier_solver(terms, alpha, delta)``  d = ∇f + λ∇c,  λ = relu((α c − ⟨∇f,∇c⟩)/(‖∇c‖² + δ))
- ``unrolled_solver(objective, lower, …)`` d = ∇_φ F(θ_K(φ)), backprop through ``lax.scan``
- ``implicit_solver(objective, lower, …)`` d = μ (∇²g(θ*) + μI)⁻¹ ∇F(θ*) by CG on HVPs

with the signatures

- ``terms(params, batch) -> ((f, c), metrics)``: upper value f and constraint value
  c ≥ 0 (both scalars), computed from one forward pass;
- ``objective(params, batch) -> (F, metrics)``: a scalar upper objective;
- ``lower(params, batch) -> g``: a scalar lower objective.

Every solver is ``solver(params, batch) -> (direction, metrics)``: the direction is
a pytree shaped like ``params`` (a descent direction: hand it to optax as the
gradient); metrics are fp32 scalars. ``inner_loop`` runs K optimiser steps on the
lower objective in ``jax.lax.scan`` (inner optimiser state carried in the scan).

Everything returned is jit-able; there is no Python branching on traced values
(branches are on config fields and on batch *keys*, which are static).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spo_jax.numerics import at_least_f32, f32_metrics

__all__ = ["SOLVERS", "VALUES", "INNER_OPTIMIZERS", "tree_vdot", "tree_add_scaled", "tree_scale", "inner_loop",
           "make_inner_optimizer", "CGInfo", "conjugate_gradient", "penalized", "gradient_solver",
           "penalty_solver", "barrier_solver", "unrolled_solver", "implicit_solver", "SPOConfig"]

Params = Any
Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]
Terms = Callable[[Params, Batch], tuple[tuple[jax.Array, jax.Array], Metrics]]
Objective = Callable[[Params, Batch], tuple[jax.Array, Metrics]]
Lower = Callable[[Params, Batch], jax.Array]
Solver = Callable[[Params, Batch], tuple[Params, Metrics]]

SOLVERS = ("penalty", "barrier", "unrolled", "implicit")
VALUES = ("reference", "inner_sft")
INNER_OPTIMIZERS = ("sgd", "momentum", "adam")


# --------------------------------------------------------------------------- #
# Pytree arithmetic (accumulation in at least fp32)
# --------------------------------------------------------------------------- #


def tree_vdot(a: Params, b: Params) -> jax.Array:
    """⟨a, b⟩ = Σ over all leaves of Σ a·b, accumulated in (at least) fp32."""
    parts = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.sum(at_least_f32(x) * at_least_f32(y)), a, b))
    return sum(parts[1:], parts[0]) if parts else jnp.zeros((), jnp.float32)


def tree_add_scaled(a: Params, scale: jax.Array, b: Params) -> Params:
    """a + scale·b, leafwise, keeping the leaf dtypes of ``a``."""
    return jax.tree.map(lambda x, y: (x + scale * y).astype(x.dtype), a, b)


def tree_scale(scale: jax.Array, a: Params) -> Params:
    return jax.tree.map(lambda x: (scale * x).astype(x.dtype), a)


# --------------------------------------------------------------------------- #
# Inner loop
# --------------------------------------------------------------------------- #


def inner_loop(
    lower: Lower,
    params: Params,
    batch: Batch,
    *,
    steps: int,
    optimizer: optax.GradientTransformation,
    prox: float = 0.0,
    anchor: Params | None = None,
    remat: bool = True,
) -> tuple[Params, jax.Array]:
    """K optimiser steps on the lower objective, in ``jax.lax.scan``.

    θ_0 = params,  θ_{k+1} = θ_k + u_k,  (u_k, s_{k+1}) = optimizer.update(∇h(θ_k), s_k, θ_k),
    h(θ) = g(θ, batch) + (prox/2)·‖θ − anchor‖²   (anchor defaults to ``params``).

    The optimiser state s_k is carried in the scan; with ``optax.sgd(a)`` this is
    plain gradient descent θ_{k+1} = θ_k − a∇h(θ_k). ``remat=True`` wraps the step
    in ``jax.checkpoint``: differentiating through the scan then stores only the
    carries (θ_k, s_k) per step and recomputes each step's activations.
    Differentiable in ``params`` (and ``anchor``): the unrolled solver relies on it.

    Returns (θ_K, g_k for k = 0..K−1 [K]) — the lower value *before* each step,
    without the proximal term.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"inner_loop: steps={steps!r} must be an int >= 1 (the number of inner steps K)")
    if anchor is None:
        anchor = params

    def h(theta):
        value = lower(theta, batch)
        total = value
        if prox:  # static config value
            diff = jax.tree.map(lambda t, a: t - a, theta, anchor)
            total = total + 0.5 * prox * tree_vdot(diff, diff)
        return total, value

    def step(carry, _):
        theta, state = carry
        (_, value), grad = jax.value_and_grad(h, has_aux=True)(theta)
        updates, state = optimizer.update(grad, state, theta)
        theta = optax.apply_updates(theta, updates)
        return (theta, state), value

    if remat:
        step = jax.checkpoint(step, prevent_cse=True)
    (theta, _), values = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return theta, values


def make_inner_optimizer(
    name: str | optax.GradientTransformation, learning_rate: float
) -> optax.GradientTransformation:
    """The inner optimiser: ``"sgd"`` (plain gradient descent, the default),
    ``"momentum"`` (heavy ball, 0.9), ``"adam"`` (with ``eps_root=1e-8`` so that
    the unrolled solver can differentiate through the square root), or any optax
    GradientTransformation (used as given; ``learning_rate`` is then ignored)."""
    if isinstance(name, optax.GradientTransformation):
        return name
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=0.9)
    if name == "adam":
        return optax.adam(learning_rate, eps_root=1e-8)
    raise ValueError(
        f"inner_optimizer={name!r} is not known; use one of {INNER_OPTIMIZERS} "
        "or pass an optax.GradientTransformation"
    )


# --------------------------------------------------------------------------- #
# Conjugate gradient on pytrees
# --------------------------------------------------------------------------- #


class CGInfo(NamedTuple):
    residual: jax.Array  # ‖b − A x‖ / ‖b‖ (recursive residual; 0 when b = 0)
    iterations: jax.Array  # int32, iterations run
    negative_curvature: jax.Array  # bool: stopped because pᵀAp ≤ 0 (A not PD along p)


def conjugate_gradient(
    matvec: Callable[[Params], Params], b: Params, *, max_iters: int, tol: float
) -> tuple[Params, CGInfo]:
    """Solve A x = b for symmetric positive-definite A given as ``matvec``.

    Standard CG from x_0 = 0 in ``jax.lax.while_loop``; stops after ``max_iters``
    iterations, when ‖r‖ ≤ tol·‖b‖, or when pᵀAp ≤ 0 (negative curvature: the
    last iterate is kept and ``negative_curvature`` is set). Shapes: x like b.
    """
    if not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"conjugate_gradient: max_iters={max_iters!r} must be an int >= 1")
    if not tol > 0:
        raise ValueError(f"conjugate_gradient: tol={tol!r} must be > 0")
    b_sq = tree_vdot(b, b)
    threshold = (tol * tol) * b_sq
    x0 = jax.tree.map(jnp.zeros_like, b)

    def cond(state):
        i, _, _, _, r_sq, neg = state
        return (i < max_iters) & (r_sq > threshold) & jnp.logical_not(neg)

    def body(state):
        i, x, r, p, r_sq, _ = state
        ap = matvec(p)
        p_ap = tree_vdot(p, ap)
        neg = p_ap <= 0
        alpha = jnp.where(neg, 0.0, r_sq / jnp.where(neg, 1.0, p_ap))
        x = tree_add_scaled(x, alpha, p)
        r = tree_add_scaled(r, -alpha, ap)
        r_sq_new = jnp.where(neg, r_sq, tree_vdot(r, r))
        beta = r_sq_new / jnp.where(r_sq > 0, r_sq, 1.0)
        p = tree_add_scaled(r, beta, p)
        return i + 1, x, r, p, r_sq_new, neg

    init = (jnp.zeros((), jnp.int32), x0, b, b, b_sq, jnp.zeros((), bool))
    iters, x, _, _, r_sq, neg = jax.lax.while_loop(cond, body, init)
    residual = jnp.sqrt(r_sq / jnp.where(b_sq > 0, b_sq, 1.0))
    return x, CGInfo(residual, iters, neg)


# --------------------------------------------------------------------------- #
# Core solvers on generic callables
# --------------------------------------------------------------------------- #


def penalized(terms: Terms, gamma: float) -> Objective:
    """The penalty objective L(θ) = f(θ) + γ·c(θ) of ``terms``, as an ``Objective``.

    Adds metrics spo/objective (L), spo/upper_loss (f) and spo/penalty (c) to the
    metrics of ``terms``.
    """

    def objective(params, batch):
        (f, c), metrics = terms(params, batch)
        value = f + gamma * c
        out = dict(metrics)
        out.update({"spo/objective": value, "spo/upper_loss": f, "spo/penalty": c})
        return value, out

    return objective


def gradient_solver(objective: Objective) -> Solver:
    """d = ∇F(θ) of a scalar objective (plain gradient descent: no bilevel structure);
    metrics: F's own, as fp32."""

    def solver(params, batch):
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, batch)
        return grads, f32_metrics(metrics)

    return solver


def penalty_solver(terms: Terms, gamma: float) -> Solver:
    """``penalty``: d = ∇L,  L(θ) = f(θ) + γ·c(θ)  (one forward, one backward): the
    ``gradient_solver`` of ``penalized(terms, gamma)``.

    Metrics: spo/objective (L), spo/upper_loss (f), spo/penalty (c), spo/grad_norm
    (‖d‖), plus the metrics of ``terms``.
    """
    solve = gradient_solver(penalized(terms, gamma))

    def solver(params, batch):
        grads, metrics = solve(params, batch)
        metrics["spo/grad_norm"] = jnp.sqrt(tree_vdot(grads, grads)).astype(jnp.float32)
        return grads, metrics

    return solver


def barrier_solver(terms: Terms, alpha: float, delta: float) -> Solver:
    """``barrier`` (dynamic barrier): d = ∇f + λ∇c,

        λ = relu((α·c − ⟨∇f, ∇c⟩) / (‖∇c‖² + δ)),

    where c ≥ 0 is the constraint value of ``terms`` (for SPO: the penalty value
    mean_i relu(q_i − ε), or its squared / batch-level variant). Then
    ⟨d, ∇c⟩ = (δ⟨∇f,∇c⟩ + α c ‖∇c‖²)/(‖∇c‖² + δ) whenever λ > 0, i.e. ≈ α·c > 0 for
    δ ≪ ‖∇c‖²: a small step θ − ηd decreases c whenever c > 0; when c = 0 (and
    ∇c = 0) d = ∇f. f and c share one forward pass (``jax.vjp``, two pullbacks).

    Metrics: spo/lambda, spo/objective (= f: the barrier has no scalar objective),
    spo/upper_loss, spo/penalty (c), spo/upper_grad_norm, spo/constraint_grad_norm,
    spo/grad_cos (cosine of ∇f and ∇c), spo/grad_norm (‖d‖), plus ``terms``' metrics.
    """

    def solver(params, batch):
        (f, c), pullback, metrics = jax.vjp(lambda p: terms(p, batch), params, has_aux=True)
        (grad_f,) = pullback((jnp.ones_like(f), jnp.zeros_like(c)))
        (grad_c,) = pullback((jnp.zeros_like(f), jnp.ones_like(c)))
        inner = tree_vdot(grad_f, grad_c)
        c_sq = tree_vdot(grad_c, grad_c)
        f_sq = tree_vdot(grad_f, grad_f)
        lam = jax.nn.relu((alpha * c - inner) / (c_sq + delta))
        direction = tree_add_scaled(grad_f, lam, grad_c)
        cos = inner / jnp.maximum(jnp.sqrt(f_sq * c_sq), 1e-30)
        out = dict(metrics)
        out.update({"spo/lambda": lam, "spo/objective": f, "spo/upper_loss": f, "spo/penalty": c,
                    "spo/upper_grad_norm": jnp.sqrt(f_sq), "spo/constraint_grad_norm": jnp.sqrt(c_sq),
                    "spo/grad_cos": cos, "spo/grad_norm": jnp.sqrt(tree_vdot(direction, direction))})
        return direction, f32_metrics(out)

    return solver


def unrolled_solver(
    objective: Objective,
    lower: Lower,
    *,
    steps: int,
    optimizer: optax.GradientTransformation,
    prox: float = 0.0,
    remat: bool = True,
) -> Solver:
    """``unrolled``: hypergradient by differentiating through the inner loop.

    Upper variables φ (= ``params``); θ_K(φ) = ``inner_loop(lower, φ, batch, steps,
    optimizer, prox, anchor=φ)``; d = ∇_φ F(θ_K(φ)) by reverse mode through the
    scan (inner step under ``jax.checkpoint`` when ``remat``). With SGD (rate a),
    prox = 0 and quadratic g: dθ_K/dφ = Π_k (I − a∇²g(θ_k)).

    Metrics: spo/objective (F(θ_K)), spo/hypergrad_norm, spo/grad_norm,
    spo/inner_loss_first (g(θ_0)), spo/inner_loss_last (g(θ_{K−1})), plus the
    metrics of ``objective`` evaluated at θ_K.
    """

    def outer(phi, batch):
        theta, values = inner_loop(lower, phi, batch, steps=steps, optimizer=optimizer,
                                   prox=prox, anchor=phi, remat=remat)
        value, metrics = objective(theta, batch)
        return value, (metrics, values)

    def solver(params, batch):
        (value, (metrics, values)), grads = jax.value_and_grad(outer, has_aux=True)(params, batch)
        norm = jnp.sqrt(tree_vdot(grads, grads))
        out = dict(metrics)
        out.update({"spo/objective": value, "spo/hypergrad_norm": norm, "spo/grad_norm": norm,
                    "spo/inner_loss_first": values[0], "spo/inner_loss_last": values[-1]})
        return grads, f32_metrics(out)

    return solver


def implicit_solver(
    objective: Objective,
    lower: Lower,
    *,
    mu: float,
    steps: int,
    optimizer: optax.GradientTransformation,
    cg_iters: int,
    cg_tol: float,
) -> Solver:
    """``implicit``: implicit-function hypergradient of a proximal lower problem.

    θ*(φ) = argmin_θ g(θ) + (μ/2)‖θ − φ‖², approximated by ``steps`` inner steps
    from θ_0 = φ (no gradient through them). Stationarity ∇g(θ*) + μ(θ* − φ) = 0
    gives dθ*/dφ = μ(∇²g(θ*) + μI)⁻¹ (symmetric), so

        d = ∇_φ F(θ*(φ)) = μ·v,   (∇²g(θ*) + μI) v = ∇F(θ*),

    v by ``conjugate_gradient`` (``cg_iters`` max, relative tolerance ``cg_tol``)
    on Hessian-vector products ∇²g(θ*)·p = jvp of ∇g (forward-over-reverse,
    ``jax.linearize`` once per step). Requires ∇²g + μI ≻ 0 along the Krylov
    directions; otherwise CG stops early and spo/cg_negative_curvature is 1.

    Metrics: spo/objective (F(θ*)), spo/hypergrad_norm, spo/grad_norm,
    spo/cg_residual (‖∇F − (H+μI)v‖/‖∇F‖), spo/cg_iters, spo/cg_negative_curvature,
    spo/inner_loss_first, spo/inner_loss_last, plus ``objective``'s metrics at θ*.
    """

    def solver(params, batch):
        phi = jax.lax.stop_gradient(params)
        theta, values = inner_loop(lower, phi, batch, steps=steps, optimizer=optimizer,
                                   prox=mu, anchor=phi, remat=False)
        theta = jax.lax.stop_gradient(theta)
        (value, metrics), grad_f = jax.value_and_grad(objective, has_aux=True)(theta, batch)
        _, hvp = jax.linearize(lambda t: jax.grad(lower)(t, batch), theta)

        def matvec(v):
            return tree_add_scaled(hvp(v), mu, v)

        v, info = conjugate_gradient(matvec, grad_f, max_iters=cg_iters, tol=cg_tol)
        hyper = tree_scale(mu, v)
        norm = jnp.sqrt(tree_vdot(hyper, hyper))
        out = dict(metrics)
        out.update({"spo/objective": value, "spo/hypergrad_norm": norm, "spo/grad_norm": norm,
                    "spo/cg_residual": info.residual, "spo/cg_iters": info.iterations,
                    "spo/cg_negative_curvature": info.negative_curvature,
                    "spo/inner_loss_first": values[0], "spo/inner_loss_last": values[-1]})
        return hyper, f32_metrics(out)

    return solver


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class SPOConfig:
    """SPO settings read by ``spo_jax.objectives.make_spo_solver`` (trainer config keys
    ``spo.<field>``; ``spo_jax.config`` takes its defaults from this class).

    Fields (all validated in ``__post_init__``; a bad value raises ValueError
    naming the field, the value and the allowed range):

    - ``solver``: "penalty" | "barrier" | "unrolled" | "implicit".
    - ``gamma`` ≥ 0: penalty weight γ. penalty: L = f + γ·c. unrolled/implicit:
      the upper objective is F = f + γ·c evaluated at θ_K / θ* (γ = 0: F = f).
      Not used by barrier (λ is computed per step).
    - ``epsilon`` (finite): slack ε of the constraint q ≤ ε.
    - ``value``: how g* is estimated. "reference": q_i = ā_ref(y_w,i) − ā_θ(y_w,i)
      (needs ``batch["ref_logps"]``); "inner_sft": q_i = ℓ_i(θ) − ℓ_i(θ_K) with ℓ_i
      the token-mean NLL of lower-level sequence i and θ_K = ``inner_steps`` SFT
      steps from θ under stop_gradient. "inner_sft" is for penalty/barrier only.
    - ``per_sample``: c = mean_i relu(q_i − ε) (True) or relu(mean_i q_i − ε) (False).
    - ``squared``: use relu(·)² instead of relu(·).
    - ``inner_steps`` ≥ 1: K, inner SFT steps (inner_sft value, unrolled, implicit).
    - ``inner_lr`` > 0: inner learning rate.
    - ``inner_optimizer``: "sgd" | "momentum" | "adam" or an optax GradientTransformation.
    - ``mu`` > 0: proximal weight μ of the implicit solver's lower problem.
    - ``cg_iters`` ≥ 1, ``cg_tol`` > 0: conjugate-gradient budget (implicit).
    - ``barrier_alpha`` > 0, ``barrier_delta`` > 0: α and δ of the barrier's λ.
    - ``remat``: ``jax.checkpoint`` the unrolled inner step (memory ~ K·|θ| instead
      of K·activations).
    """

    solver: str = "penalty"
    gamma: float = 10.0
    epsilon: float = 0.0
    value: str = "reference"
    per_sample: bool = True
    squared: bool = False
    inner_steps: int = 4
    inner_lr: float = 1e-2
    inner_optimizer: Any = "sgd"
    mu: float = 1.0
    cg_iters: int = 20
    cg_tol: float = 1e-4
    barrier_alpha: float = 1.0
    barrier_delta: float = 1e-8
    remat: bool = True

    def __post_init__(self):
        def fail(field, why):
            raise ValueError(f"SPOConfig.{field}={getattr(self, field)!r}: {why}")

        if self.solver not in SOLVERS:
            fail("solver", f"must be one of {SOLVERS}")
        if self.value not in VALUES:
            fail("value", f"must be one of {VALUES}")
        for name in ("per_sample", "squared", "remat"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be True or False")
        for name in ("inner_steps", "cg_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(name, "must be an integer >= 1")
        for name, lower, strict in (("gamma", 0.0, False), ("epsilon", -math.inf, False),
                                    ("inner_lr", 0.0, True), ("mu", 0.0, True),
                                    ("cg_tol", 0.0, True), ("barrier_alpha", 0.0, True),
                                    ("barrier_delta", 0.0, True)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                fail(name, "must be a finite number")
            if v < lower or (strict and v == lower):
                fail(name, f"must be {'>' if strict else '>='} {lower}")
            object.__setattr__(self, name, float(v))
        opt = self.inner_optimizer
        if not isinstance(opt, optax.GradientTransformation) and opt not in INNER_OPTIMIZERS:
            fail("inner_optimizer", f"must be one of {INNER_OPTIMIZERS} or an optax.GradientTransformation")
        if self.solver in ("unrolled", "implicit") and self.value != "reference":
            fail("value", f"solver={self.solver!r} uses its own inner loop as the lower level; "
                          "its optional penalty (gamma > 0) needs value='reference'")

    @property
    def constraint_used(self) -> bool:
        """Whether the constraint value c enters the direction: the barrier always
        uses it; the other solvers only with gamma > 0."""
        return self.solver == "barrier" or self.gamma > 0

    @property
    def needs_reference(self) -> bool:
        """Whether the solver reads reference log-probs (value "reference" and a used constraint)."""
        return self.value == "reference" and self.constraint_used

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SPOConfig":
        """Build from a mapping (e.g. an ml_collections ConfigDict ``config.spo``);
        unknown keys raise ValueError listing the valid ones."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"SPOConfig: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**values)
