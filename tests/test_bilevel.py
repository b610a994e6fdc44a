"""Tests for spo_jax.bilevel.

Oracles: closed-form hypergradients of quadratic bilevel problems (NumPy),
a Python-loop unroll written here, NumPy linear solves, and central finite
differences (float64) of each solver's own objective on a tiny language model.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spo_jax import bilevel

# --------------------------------------------------------------------------- #
# Quadratic bilevel problems
#   lower g(θ) = ½ θᵀAθ − bᵀθ (A SPD),  upper f(θ) = ½‖Cθ − e‖²
#   θ is a pytree {"u": [3], "v": [n-3]} so the pytree paths are exercised.
# --------------------------------------------------------------------------- #

N = 6


def _split(x):
    return {"u": x[:3], "v": x[3:]}


def _flat(tree):
    return jnp.concatenate([tree["u"], tree["v"]])


def _quadratic(seed, n=N, cond=10.0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eig = np.linspace(1.0, cond, n)
    a = (q * eig) @ q.T
    b = rng.normal(size=n)
    c = rng.normal(size=(n + 2, n))
    e = rng.normal(size=n + 2)
    phi = rng.normal(size=n)
    return a, b, c, e, phi


def _callables(a, b, c, e):
    def lower(params, batch):
        x = _flat(params)
        return 0.5 * x @ (jnp.asarray(a) @ x) - jnp.asarray(b) @ x

    def objective(params, batch):
        r = jnp.asarray(c) @ _flat(params) - jnp.asarray(e)
        return 0.5 * r @ r, {"upper": 0.5 * r @ r}

    return lower, objective


@pytest.mark.parametrize("remat", [True, False])
def test_unrolled_equals_closed_form_for_k_steps_of_gradient_descent(remat):
    with jax.enable_x64(True):
        a, b, c, e, phi = _quadratic(0)
        lr, k = 0.07, 6
        lower, objective = _callables(a, b, c, e)
        solver = bilevel.unrolled_solver(objective, lower, steps=k, optimizer=optax.sgd(lr), remat=remat)
        grads, metrics = jax.jit(solver)(_split(jnp.asarray(phi)), {})

        # NumPy: θ_K = M^K φ + Σ_{j<K} M^j (a b),  M = I − aA;  d = (M^K)ᵀ Cᵀ(Cθ_K − e)
        m = np.eye(N) - lr * a
        mk = np.linalg.matrix_power(m, k)
        theta_k = mk @ phi + sum(np.linalg.matrix_power(m, j) @ (lr * b) for j in range(k))
        residual = c @ theta_k - e
        expected = mk.T @ (c.T @ residual)
        np.testing.assert_allclose(np.asarray(_flat(grads)), expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(float(metrics["spo/objective"]), 0.5 * residual @ residual, rtol=1e-6)
        np.testing.assert_allclose(float(metrics["spo/hypergrad_norm"]), np.linalg.norm(expected), rtol=1e-6)
        g0 = 0.5 * phi @ a @ phi - b @ phi
        np.testing.assert_allclose(float(metrics["spo/inner_loss_first"]), g0, rtol=1e-6)
        assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())


def _python_unroll(lower, phi, batch, steps, optimizer, prox=0.0):
    """Oracle: the inner loop as a plain Python loop."""
    theta, state = phi, optimizer.init(phi)

    def h(t):
        diff = jax.tree.map(lambda x, y: x - y, t, phi)
        return lower(t, batch) + 0.5 * prox * sum(jnp.sum(d * d) for d in jax.tree.leaves(diff))

    for _ in range(steps):
        grad = jax.grad(h)(theta)
        updates, state = optimizer.update(grad, state, theta)
        theta = optax.apply_updates(theta, updates)
    return theta


@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adam"])
def test_scan_unroll_equals_python_loop_value_and_gradient(opt_name):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        w = jnp.asarray(rng.normal(size=(5, N)))
        target = jnp.asarray(rng.normal(size=N))

        def lower(params, batch):  # non-quadratic: log-sum-exp + quartic
            x = _flat(params)
            return jax.nn.logsumexp(w @ x) + 0.1 * jnp.sum(x**4) + batch["s"] * jnp.sum(x)

        def upper(params):
            return jnp.sum(jnp.sin(_flat(params) - target))

        optimizer = bilevel.make_inner_optimizer(opt_name, 0.05)
        batch = {"s": jnp.asarray(0.3)}
        phi = _split(jnp.asarray(rng.normal(size=N)))
        for prox in (0.0, 0.5):
            def scan_objective(p):
                theta, _ = bilevel.inner_loop(lower, p, batch, steps=5, optimizer=optimizer, prox=prox)
                return upper(theta)

            def loop_objective(p):
                return upper(_python_unroll(lower, p, batch, 5, optimizer, prox))

            v_scan, g_scan = jax.value_and_grad(scan_objective)(phi)
            v_loop, g_loop = jax.value_and_grad(loop_objective)(phi)
            np.testing.assert_allclose(float(v_scan), float(v_loop), rtol=1e-12)
            np.testing.assert_allclose(np.asarray(_flat(g_scan)), np.asarray(_flat(g_loop)), rtol=1e-9, atol=1e-12)


def test_implicit_equals_exact_hypergradient_as_cg_converges():
    a, b, c, e, phi = _quadratic(2)
    mu = 0.5
    lr = 1.0 / (np.linalg.eigvalsh(a).max() + mu)
    lower, objective = _callables(a, b, c, e)
    solver = bilevel.implicit_solver(objective, lower, mu=mu, steps=400, optimizer=optax.sgd(lr),
                                     cg_iters=50, cg_tol=1e-6)
    grads, metrics = jax.jit(solver)(_split(jnp.asarray(phi, jnp.float32)), {})

    # θ* = (A + μI)⁻¹(b + μφ);  exact hypergradient μ (A + μI)⁻¹ ∇f(θ*)
    a_mu = a + mu * np.eye(N)
    theta_star = np.linalg.solve(a_mu, b + mu * phi)
    exact = mu * np.linalg.solve(a_mu, c.T @ (c @ theta_star - e))
    got = np.asarray(_flat(grads), np.float64)
    assert np.linalg.norm(got - exact) <= 1e-4 * np.linalg.norm(exact)
    assert float(metrics["spo/cg_residual"]) <= 1e-6
    assert 1 <= int(metrics["spo/cg_iters"]) <= 50
    assert float(metrics["spo/cg_negative_curvature"]) == 0.0

    # A truncated CG reports its true relative residual ‖∇f − (A+μI)v‖/‖∇f‖, v = d/μ.
    short = bilevel.implicit_solver(objective, lower, mu=mu, steps=400, optimizer=optax.sgd(lr),
                                    cg_iters=2, cg_tol=1e-12)
    grads2, metrics2 = jax.jit(short)(_split(jnp.asarray(phi, jnp.float32)), {})
    v = np.asarray(_flat(grads2), np.float64) / mu
    rhs = c.T @ (c @ theta_star - e)
    true_res = np.linalg.norm(rhs - a_mu @ v) / np.linalg.norm(rhs)
    assert int(metrics2["spo/cg_iters"]) == 2
    np.testing.assert_allclose(float(metrics2["spo/cg_residual"]), true_res, rtol=1e-3)
    assert true_res > 1e-3  # two iterations on six distinct eigenvalues do not converge


def test_conjugate_gradient_solves_spd_system_and_flags_negative_curvature():
    rng = np.random.default_rng(3)
    m = rng.normal(size=(8, 8))
    spd = m @ m.T + 0.5 * np.eye(8)
    rhs = rng.normal(size=8)
    x, info = bilevel.conjugate_gradient(lambda v: jnp.asarray(spd, jnp.float32) @ v,
                                         jnp.asarray(rhs, jnp.float32), max_iters=100, tol=1e-6)
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(spd, rhs), rtol=1e-3, atol=1e-4)
    assert float(info.residual) <= 1e-6 and not bool(info.negative_curvature)

    indefinite = np.diag([1.0, -2.0, 3.0])
    _, info = bilevel.conjugate_gradient(lambda v: jnp.asarray(indefinite, jnp.float32) @ v,
                                         jnp.asarray([0.0, 1.0, 0.0], jnp.float32), max_iters=10, tol=1e-6)
    assert bool(info.negative_curvature) and int(info.iterations) == 1

    x, info = bilevel.conjugate_gradient(lambda v: v, jnp.zeros(3), max_iters=5, tol=1e-6)
    assert int(info.iterations) == 0 and float(info.residual) == 0.0 and not np.any(np.asarray(x))


def _constraint_instance(seed):
    """Upper f = ½‖Cθ − e‖², per-sample constraint values q_i(θ) = ½‖P_iθ − t_i‖² − r_i,
    c(θ) = mean_i relu(q_i − ε)."""
    rng = np.random.default_rng(seed)
    _, _, cm, e, theta = _quadratic(seed)
    p = rng.normal(size=(4, 3, N))
    t = rng.normal(size=(4, 3))
    r = rng.uniform(0.0, 3.0, size=4)
    eps = 0.2

    def q_np(x):
        return 0.5 * np.sum((np.einsum("ijk,k->ij", p, x) - t) ** 2, axis=1) - r

    def c_np(x):
        return np.mean(np.maximum(q_np(x) - eps, 0.0))

    def terms(params, batch):
        x = _flat(params)
        res = jnp.asarray(cm) @ x - jnp.asarray(e)
        q = 0.5 * jnp.sum((jnp.einsum("ijk,k->ij", jnp.asarray(p), x) - jnp.asarray(t)) ** 2, axis=1) - r
        return (0.5 * res @ res, jnp.mean(jax.nn.relu(q - eps))), {"q": jnp.mean(q)}

    return terms, c_np, theta, (cm, e, p, t, r, eps)


def test_barrier_direction_decreases_violated_constraint_on_random_instances():
    alpha, delta = 1.0, 1e-12
    violated = 0
    with jax.enable_x64(True):
        for seed in range(20):
            terms, c_np, theta, (cm, e, p, t, r, eps) = _constraint_instance(seed)
            solver = jax.jit(bilevel.barrier_solver(terms, alpha, delta))
            d, metrics = solver(_split(jnp.asarray(theta)), {})
            d = np.asarray(_flat(d))
            c0 = c_np(theta)
            # NumPy gradients and λ
            grad_f = cm.T @ (cm @ theta - e)
            q = 0.5 * np.sum((np.einsum("ijk,k->ij", p, theta) - t) ** 2, axis=1) - r
            active = (q - eps > 0).astype(float)
            grad_c = sum(active[i] * p[i].T @ (p[i] @ theta - t[i]) for i in range(4)) / 4
            lam = max((alpha * c0 - grad_f @ grad_c) / (grad_c @ grad_c + delta), 0.0)
            np.testing.assert_allclose(float(metrics["spo/lambda"]), lam, rtol=1e-5, atol=1e-12)
            np.testing.assert_allclose(d, grad_f + lam * grad_c, rtol=1e-8, atol=1e-10)
            if c0 > 0:
                violated += 1
                assert c_np(theta - 1e-4 * d) < c0
            else:
                np.testing.assert_allclose(d, grad_f, rtol=1e-12)
                assert float(metrics["spo/lambda"]) == 0.0
    assert violated >= 5  # the random instances exercise the violated case


def test_penalty_solver_is_gradient_of_f_plus_gamma_c():
    with jax.enable_x64(True):
        terms, c_np, theta, (cm, e, p, t, r, eps) = _constraint_instance(4)
        gamma = 3.0
        d, metrics = jax.jit(bilevel.penalty_solver(terms, gamma))(_split(jnp.asarray(theta)), {})
        q = 0.5 * np.sum((np.einsum("ijk,k->ij", p, theta) - t) ** 2, axis=1) - r
        active = (q - eps > 0).astype(float)
        grad_c = sum(active[i] * p[i].T @ (p[i] @ theta - t[i]) for i in range(4)) / 4
        expected = cm.T @ (cm @ theta - e) + gamma * grad_c
        np.testing.assert_allclose(np.asarray(_flat(d)), expected, rtol=1e-10)
        f = 0.5 * np.sum((cm @ theta - e) ** 2)
        np.testing.assert_allclose(float(metrics["spo/objective"]), f + gamma * c_np(theta), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["spo/penalty"]), c_np(theta), rtol=1e-6)


# --------------------------------------------------------------------------- #
# Config validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("field,value", [
    ("solver", "newton"), ("value", "oracle"), ("gamma", -1.0), ("epsilon", float("nan")),
    ("inner_steps", 0), ("inner_steps", 2.5), ("inner_lr", 0.0), ("mu", -0.1), ("cg_iters", 0),
    ("cg_tol", 0.0), ("barrier_alpha", 0.0), ("barrier_delta", 0.0), ("per_sample", 1),
    ("squared", "yes"), ("remat", None), ("inner_optimizer", "lbfgs"),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        bilevel.SPOConfig(**{field: value})


def test_config_from_dict_and_cross_field_checks():
    cfg = bilevel.SPOConfig.from_dict({"solver": "implicit", "gamma": 2, "mu": 3})
    assert cfg.gamma == 2.0 and isinstance(cfg.gamma, float) and cfg.mu == 3.0
    with pytest.raises(ValueError, match="gamm"):
        bilevel.SPOConfig.from_dict({"gamm": 1.0})
    with pytest.raises(ValueError, match="value"):
        bilevel.SPOConfig(solver="unrolled", value="inner_sft")
    cfg = bilevel.SPOConfig(inner_optimizer=optax.sgd(0.1))
    assert isinstance(bilevel.make_inner_optimizer(cfg.inner_optimizer, cfg.inner_lr), optax.GradientTransformation)
    # every field is documented in the class docstring (the trainer maps spo.<field> to it)
    for f in dataclasses.fields(bilevel.SPOConfig):
        assert f"``{f.name}``" in bilevel.SPOConfig.__doc__
