"""Tests for spo_jax.bilevel.

Oracles: closed-form hypergradients of quadratic bilevel problems (NumPy),
a Python-loop unroll written here, NumPy linear solves, and central finite
differences (float64) of each solver's own objective on a tiny language model.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flax import nnx

from spo_jax import bilevel, logprobs, losses, models, objectives
from spo_jax.config import get_default_config

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


def _constraint_terms(params, batch):
    """Upper f = ½‖Cθ − e‖²; per-sample constraint values q_i(θ) = ½‖P_iθ − t_i‖² − r_i;
    c(θ) = mean_i relu(q_i − ε). The instance's arrays travel in ``batch`` (one compile)."""
    x = _flat(params)
    res = batch["c"] @ x - batch["e"]
    q = 0.5 * jnp.sum((jnp.einsum("ijk,k->ij", batch["p"], x) - batch["t"]) ** 2, axis=1) - batch["r"]
    return (0.5 * res @ res, jnp.mean(jax.nn.relu(q - batch["eps"]))), {"q": jnp.mean(q)}


def _constraint_instance(seed):
    rng = np.random.default_rng(seed)
    _, _, cm, e, theta = _quadratic(seed)
    p = rng.normal(size=(4, 3, N))
    t = rng.normal(size=(4, 3))
    r = rng.uniform(0.0, 3.0, size=4)
    eps = 0.2

    def c_np(x):
        q = 0.5 * np.sum((np.einsum("ijk,k->ij", p, x) - t) ** 2, axis=1) - r
        return np.mean(np.maximum(q - eps, 0.0))

    batch = {k: jnp.asarray(v) for k, v in dict(c=cm, e=e, p=p, t=t, r=r, eps=eps).items()}
    return batch, c_np, theta, (cm, e, p, t, r, eps)


def test_barrier_direction_decreases_violated_constraint_on_random_instances():
    alpha, delta = 1.0, 1e-12
    violated = 0
    with jax.enable_x64(True):
        solver = jax.jit(bilevel.barrier_solver(_constraint_terms, alpha, delta))
        for seed in range(20):
            batch, c_np, theta, (cm, e, p, t, r, eps) = _constraint_instance(seed)
            d, metrics = solver(_split(jnp.asarray(theta)), batch)
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
        batch, c_np, theta, (cm, e, p, t, r, eps) = _constraint_instance(4)
        gamma = 3.0
        d, metrics = jax.jit(bilevel.penalty_solver(_constraint_terms, gamma))(_split(jnp.asarray(theta)), batch)
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


# --------------------------------------------------------------------------- #
# A tiny language model written here (independent of spo_jax.models):
# embedding -> causal prefix-mean mixing + one tanh MLP layer (residual) -> unembedding.
# All in float64 so that central finite differences are accurate.
# --------------------------------------------------------------------------- #

V, D, H, T = 11, 6, 10, 7


def _lm_params(seed, scale=0.5):
    rng = np.random.default_rng(seed)
    shapes = {"embed": (V, D), "w1": (D, H), "w2": (H, D), "unembed": (D, V)}
    return {k: jnp.asarray(scale * rng.normal(size=s)) for k, s in shapes.items()}


def _lm_logps(params, batch):
    """(sums_S, counts_S) of response-token log-probs, an independent re-implementation
    of Contract 3 for a padded batch (row r = sequence r)."""
    x = params["embed"][batch["input_ids"]]  # [R, T, D]
    ctx = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]
    h = x + jnp.tanh(ctx @ params["w1"]) @ params["w2"]
    logp = jax.nn.log_softmax(h @ params["unembed"], axis=-1)
    tok = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"]
    num = batch["seq_valid"].shape[0]
    sums = jax.ops.segment_sum((tok * mask).ravel(), batch["seq_ids"].ravel(), num_segments=num)
    counts = jax.ops.segment_sum(mask.ravel(), batch["seq_ids"].ravel(), num_segments=num)
    return sums, counts


def _lm_batch(seed, num_seqs, filler=0):
    """Padded batch: prompt of 2 tokens, response of 2..T-1 tokens; the last ``filler``
    sequences have seq_valid 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, size=(num_seqs, T)).astype(np.int32)
    lengths = rng.integers(4, T + 1, size=num_seqs)
    targets = np.zeros_like(ids)
    mask = np.zeros((num_seqs, T))
    for r, n in enumerate(lengths):
        ids[r, n:] = 0
        targets[r, : n - 1] = ids[r, 1:n]
        mask[r, 1 : n - 1] = 1.0  # targets at positions 1.. are response tokens (prompt = 2 tokens)
    seq_ids = np.repeat(np.arange(num_seqs, dtype=np.int32)[:, None], T, axis=1) * (ids > 0)
    valid = np.ones(num_seqs)
    if filler:
        valid[-filler:] = 0.0
    return {"input_ids": jnp.asarray(ids), "targets": jnp.asarray(targets), "loss_mask": jnp.asarray(mask),
            "seq_ids": jnp.asarray(seq_ids), "seq_valid": jnp.asarray(valid)}


def _pref_batch(seed=10, pairs=4, with_sft=False):
    batch = _lm_batch(seed, 2 * pairs, filler=2)  # the last pair is a filler
    # reference = another random model: some chosen responses violate q <= ε, some do not
    ref_params = _lm_params(5)
    ref_sums, _ = _lm_logps(ref_params, batch)
    batch["ref_logps"] = ref_sums
    if with_sft:
        batch["sft"] = _lm_batch(seed + 1, 3)
    return batch


def _oracle_stats(params, batch):
    s, n = _lm_logps(params, batch)
    r = batch["ref_logps"]
    return losses.PairStats(chosen_logps=s[0::2], rejected_logps=s[1::2], chosen_len=n[0::2],
                            rejected_len=n[1::2], ref_chosen_logps=r[0::2], ref_rejected_logps=r[1::2],
                            weight=batch["seq_valid"][0::2])


def _oracle_lower(params, batch):
    """g = weighted mean token-mean NLL of the lower-level sequences (NumPy-style, here)."""
    sub = batch.get("sft")
    if sub is None:
        s, n = _lm_logps(params, batch)
        s, n, w = s[0::2], n[0::2], batch["seq_valid"][0::2]
    else:
        s, n = _lm_logps(params, sub)
        w = sub["seq_valid"]
    return jnp.sum(w * (-s / n)) / jnp.sum(w)


def _random_direction(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)


def _central_difference(fn, params, direction, h=1e-5):
    plus = fn(jax.tree.map(lambda p, v: p + h * v, params, direction))
    minus = fn(jax.tree.map(lambda p, v: p - h * v, params, direction))
    return (float(plus) - float(minus)) / (2 * h)


def _assert_directional(direction, fn, params, seeds, rtol, atol=1e-7, h=1e-5):
    for seed in seeds:
        v = _random_direction(params, seed)
        fd = _central_difference(fn, params, v, h)
        got = float(bilevel.tree_vdot(direction, v))
        assert abs(got - fd) <= rtol * abs(fd) + atol, (seed, got, fd)


def _trainer_config(stage="preference", loss="dpo", hparams=None, spo=None):
    c = get_default_config()
    c.stage, c.loss.name = stage, loss
    c.loss.hparams = ml_collections.ConfigDict(hparams if hparams is not None else {"beta": 0.5})
    if spo is not None:
        c.spo.enabled = True
        for k, v in spo.items():
            c.spo[k] = v
    return c


def test_make_solver_without_spo_is_the_gradient_of_the_loss_and_sft_of_the_token_nll():
    """No SPO is the plain gradient of the same objective path (no spo/* metrics); SFT is the
    gradient of the token-weighted NLL −Σ sums / Σ counts over real sequences."""
    with jax.enable_x64(True):
        params, batch = _lm_params(0), _pref_batch()
        grads, metrics = jax.jit(objectives.make_solver(_trainer_config(), _lm_logps))(params, batch)
        dpo = losses.get_loss("dpo", beta=0.5)
        value, expected = jax.value_and_grad(lambda p: dpo(_oracle_stats(p, batch))[0])(params)
        np.testing.assert_allclose(float(metrics["loss"]), float(value), rtol=1e-6)
        assert not [k for k in metrics if k.startswith("spo/")]
        for k in params:
            np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(expected[k]), rtol=1e-9, atol=1e-12)

        sft_batch = _lm_batch(3, 5, filler=1)
        grads, metrics = jax.jit(objectives.make_solver(_trainer_config("sft"), _lm_logps))(params, sft_batch)

        def token_nll(p):
            sums, counts = _lm_logps(p, sft_batch)
            valid = sft_batch["seq_valid"]
            return -jnp.sum(sums * valid) / jnp.sum(counts * valid)

        value, expected = jax.value_and_grad(token_nll)(params)
        np.testing.assert_allclose(float(metrics["sft/nll"]), float(value), rtol=1e-6)
        for k in params:
            np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(expected[k]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("stage,loss,spo,want", [
    ("sft", "dpo", None, False),
    ("preference", "dpo", None, True),
    ("preference", "simpo", None, False),
    ("preference", "simpo", dict(solver="penalty", value="reference", gamma=1.0), True),
    ("preference", "simpo", dict(solver="penalty", value="reference", gamma=0.0), False),
    ("preference", "simpo", dict(solver="barrier", value="reference", gamma=0.0), True),
    ("preference", "simpo", dict(solver="penalty", value="inner_sft", gamma=1.0), False),
    ("eval", "dpo", None, True),
])
def test_needs_reference_one_rule_for_loss_and_spo(stage, loss, spo, want):
    hparams = {"beta": 2.0} if loss == "simpo" else {"beta": 0.1}
    assert objectives.needs_reference(_trainer_config(stage, loss, hparams, spo)) is want


SPO = dict(gamma=4.0, epsilon=0.01)


@pytest.mark.parametrize("per_sample,squared", [(True, False), (False, True)])
def test_penalty_reference_equals_f_plus_gamma_spo_penalty_on_tiny_lm(per_sample, squared):
    with jax.enable_x64(True):
        params, batch = _lm_params(0), _pref_batch()
        upper = losses.get_loss("dpo", beta=0.5)
        cfg = bilevel.SPOConfig(solver="penalty", value="reference", per_sample=per_sample, squared=squared, **SPO)
        grads, metrics = jax.jit(objectives.make_spo_solver(_lm_logps, upper, cfg))(params, batch)

        def oracle(p):
            stats = _oracle_stats(p, batch)
            q = losses.reference_gap(stats)
            pen, _ = losses.spo_penalty(q, epsilon=SPO["epsilon"], per_sample=per_sample, squared=squared,
                                        weight=stats.weight)
            return upper(stats)[0] + SPO["gamma"] * pen

        value, expected = jax.value_and_grad(oracle)(params)
        assert float(metrics["spo/penalty"]) > 0  # the constraint is active on this batch
        np.testing.assert_allclose(float(metrics["spo/objective"]), float(value), rtol=1e-6)
        for k in params:
            np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(expected[k]), rtol=1e-9, atol=1e-12)
        _assert_directional(grads, jax.jit(oracle), params, seeds=(1, 2), rtol=1e-5)
        assert 0.0 < float(metrics["spo/violation_frac"]) <= 1.0


@pytest.mark.parametrize("with_sft", [False, True])
def test_penalty_inner_sft_matches_finite_differences_with_frozen_value(with_sft):
    with jax.enable_x64(True):
        params, batch = _lm_params(0), _pref_batch(with_sft=with_sft)
        upper = losses.get_loss("dpo", beta=0.5)
        cfg = bilevel.SPOConfig(solver="penalty", value="inner_sft", inner_steps=3, inner_lr=0.5,
                                epsilon=-0.05, gamma=4.0)
        grads, metrics = jax.jit(objectives.make_spo_solver(_lm_logps, upper, cfg))(params, batch)

        theta_k = _python_unroll(_oracle_lower, params, batch, 3, optax.sgd(0.5))

        def per_seq_nll(p):
            sub = batch.get("sft")
            if sub is None:
                s, n = _lm_logps(p, batch)
                return -s[0::2] / n[0::2], batch["seq_valid"][0::2]
            s, n = _lm_logps(p, sub)
            return -s / n, sub["seq_valid"]

        def oracle(p):  # θ_K frozen: the value estimate carries no gradient
            nll, w = per_seq_nll(p)
            pen, _ = losses.spo_penalty(nll - per_seq_nll(theta_k)[0], epsilon=-0.05, weight=w)
            return upper(_oracle_stats(p, batch))[0] + 4.0 * pen

        np.testing.assert_allclose(float(metrics["spo/objective"]), float(oracle(params)), rtol=1e-6)
        np.testing.assert_allclose(float(metrics["spo/g_star"]), float(_oracle_lower(theta_k, batch)), rtol=1e-6)
        assert float(metrics["spo/g_star"]) < float(metrics["spo/inner_loss_first"])  # SFT steps lower g
        assert float(metrics["spo/penalty"]) > 0
        _assert_directional(grads, jax.jit(oracle), params, seeds=(3, 4), rtol=1e-5)


@pytest.mark.parametrize("spo", [False, True])
def test_sft_data_weight_adds_lambda_nll_of_the_sft_batch(spo):
    """loss.sft_data_weight = λ: F = DPO + λ·g(batch["sft"]); with SPO's inner_sft penalty at ε = 0
    and every q_i > 0 on the SFT batch, the direction is ∇DPO + (λ + γ)·∇g (docs/METHOD.md)."""
    with jax.enable_x64(True):
        params, batch = _lm_params(0), _pref_batch(with_sft=True)
        lam, gamma = 0.7, 2.0
        cfg = _trainer_config(spo=dict(solver="penalty", value="inner_sft", gamma=gamma, epsilon=0.0,
                                       inner_steps=2, inner_lr=0.5) if spo else None)
        cfg.loss.sft_data_weight = lam
        grads, metrics = jax.jit(objectives.make_solver(cfg, _lm_logps))(params, batch)
        upper = losses.get_loss("dpo", beta=0.5)
        weight = lam + (gamma if spo else 0.0)

        def oracle(p):
            return upper(_oracle_stats(p, batch))[0] + weight * _oracle_lower(p, batch)

        np.testing.assert_allclose(float(metrics["sft_data/nll"]), float(_oracle_lower(params, batch)), rtol=1e-6)  # metrics are fp32
        if spo:
            assert float(metrics["spo/violation_frac"]) == 1.0  # every q_i > 0: the relu is the identity
            np.testing.assert_allclose(float(metrics["spo/upper_loss"]), float(
                upper(_oracle_stats(params, batch))[0] + lam * _oracle_lower(params, batch)), rtol=1e-6)
        else:
            np.testing.assert_allclose(float(metrics["loss"]), float(
                upper(_oracle_stats(params, batch))[0] + lam * _oracle_lower(params, batch)), rtol=1e-6)
            _, expected = jax.value_and_grad(oracle)(params)
            for k in params:
                np.testing.assert_allclose(np.asarray(grads[k]), np.asarray(expected[k]), rtol=1e-9, atol=1e-12)
        _assert_directional(grads, jax.jit(oracle), params, seeds=(11, 12), rtol=1e-5)
        with pytest.raises(ValueError, match="needs an SFT batch"):
            objectives.make_solver(cfg, _lm_logps)(params, {k: v for k, v in batch.items() if k != "sft"})


def test_implicit_inner_loop_trains_on_the_sft_batch_when_present():
    """With batch["sft"] the implicit solver's lower level g is the SFT batch's NLL (the unrolled
    solver's: test_unrolled_hypergradient_matches_finite_differences_on_tiny_lm): the first inner
    value is g(φ) on it, and the inner steps lower it."""
    with jax.enable_x64(True):
        params, batch = _lm_params(0), _pref_batch(with_sft=True)
        cfg = bilevel.SPOConfig(solver="implicit", inner_steps=2, inner_lr=0.5, mu=2.0, cg_iters=3, gamma=0.0)
        _, metrics = jax.jit(objectives.make_spo_solver(_lm_logps, losses.get_loss("dpo", beta=0.5), cfg))(
            params, batch)
        np.testing.assert_allclose(float(metrics["spo/inner_loss_first"]), float(_oracle_lower(params, batch)),
                                   rtol=1e-6)
        chosen = {k: v for k, v in batch.items() if k != "sft"}
        assert abs(float(_oracle_lower(params, batch)) - float(_oracle_lower(params, chosen))) > 1e-3
        assert float(metrics["spo/inner_loss_last"]) < float(metrics["spo/inner_loss_first"])


def test_barrier_direction_matches_finite_differences_on_tiny_lm():
    with jax.enable_x64(True):
        params, batch = _lm_params(0), _pref_batch()
        upper = losses.get_loss("dpo", beta=0.5)
        alpha, delta = 2.0, 1e-10
        cfg = bilevel.SPOConfig(solver="barrier", barrier_alpha=alpha, barrier_delta=delta, epsilon=SPO["epsilon"])
        d, metrics = jax.jit(objectives.make_spo_solver(_lm_logps, upper, cfg))(params, batch)

        def f(p):
            return upper(_oracle_stats(p, batch))[0]

        def c(p):
            stats = _oracle_stats(p, batch)
            return losses.spo_penalty(losses.reference_gap(stats), epsilon=SPO["epsilon"], weight=stats.weight)[0]

        f, c = jax.jit(f), jax.jit(c)
        gf, gc = jax.jit(jax.grad(f))(params), jax.jit(jax.grad(c))(params)
        dot = lambda a, b: sum(float(jnp.sum(a[k] * b[k])) for k in a)  # noqa: E731
        lam = max((alpha * float(c(params)) - dot(gf, gc)) / (dot(gc, gc) + delta), 0.0)
        assert lam > 0  # violated and conflicting on this batch: the barrier is active
        np.testing.assert_allclose(float(metrics["spo/lambda"]), lam, rtol=1e-6)
        for seed in (5, 6):
            v = _random_direction(params, seed)
            fd = _central_difference(f, params, v) + lam * _central_difference(c, params, v)
            np.testing.assert_allclose(float(bilevel.tree_vdot(d, v)), fd, rtol=1e-5, atol=1e-7)
        # the constraint value decreases along −d
        step = jax.tree.map(lambda p, g: p - 1e-4 * g, params, d)
        assert float(c(step)) < float(c(params))


def test_unrolled_hypergradient_matches_finite_differences_on_tiny_lm():
    with jax.enable_x64(True):
        params, batch = _lm_params(0), _pref_batch(with_sft=True)
        upper = losses.get_loss("dpo", beta=0.5)
        cfg = bilevel.SPOConfig(solver="unrolled", inner_steps=3, inner_lr=0.5, **SPO)
        grads, metrics = jax.jit(objectives.make_spo_solver(_lm_logps, upper, cfg))(params, batch)

        def oracle(phi):  # F(θ_K(φ)) with a Python-loop inner SFT on batch["sft"]
            theta = _python_unroll(_oracle_lower, phi, batch, 3, optax.sgd(0.5))
            stats = _oracle_stats(theta, batch)
            pen, _ = losses.spo_penalty(losses.reference_gap(stats), epsilon=SPO["epsilon"], weight=stats.weight)
            return upper(stats)[0] + SPO["gamma"] * pen

        np.testing.assert_allclose(float(metrics["spo/objective"]), float(oracle(params)), rtol=1e-6)
        _assert_directional(grads, oracle, params, seeds=(7, 8), rtol=1e-5)


def test_implicit_hypergradient_matches_finite_differences_of_converged_prox_loop():
    with jax.enable_x64(True):
        params, batch = _lm_params(0), _pref_batch()
        upper = losses.get_loss("dpo", beta=0.5)
        mu, lr, k = 2.0, 0.3, 150
        cfg = bilevel.SPOConfig(solver="implicit", mu=mu, inner_steps=k, inner_lr=lr, cg_iters=100,
                                cg_tol=1e-10, gamma=0.0)
        grads, metrics = jax.jit(objectives.make_spo_solver(_lm_logps, upper, cfg))(params, batch)
        assert float(metrics["spo/cg_residual"]) <= 1e-10
        assert float(metrics["spo/cg_negative_curvature"]) == 0.0

        @jax.jit
        def oracle(phi):  # f(θ_K(φ)), θ_K = K steps on g + (μ/2)‖θ − φ‖² (converged)
            theta, _ = bilevel.inner_loop(_oracle_lower, phi, batch, steps=k, optimizer=optax.sgd(lr), prox=mu)
            return upper(_oracle_stats(theta, batch))[0]

        _assert_directional(grads, oracle, params, seeds=(9, 10), rtol=1e-4)



# --------------------------------------------------------------------------- #
# The same checks through the production path: spo_jax.models' Llama decoder
# (1 layer, float64) and the trainer's chunked log-prob function.
# --------------------------------------------------------------------------- #


def _decoder_setup():
    cfg = models.ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False))
    model = models.create_model(cfg, rngs=nnx.Rngs(3), dtype=jnp.float64, param_dtype=jnp.float64)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p: p * 5.0, params)  # N(0, 0.1²) weights: non-trivial log-probs
    logps_fn = objectives.make_logps_fn(graphdef, seq_chunk=4, vocab_chunk=4)  # chunked on both axes

    def oracle_logps(p, batch):  # unchunked: [B, T, V] log-softmax, then segment sums
        hidden = models.apply(graphdef, p, batch["input_ids"], batch["positions"], batch["segment_ids"])
        w, b = models.unembedding(graphdef, p)
        tok = logprobs.naive_token_logps(hidden, w, batch["targets"], b)
        mask, num = batch["loss_mask"], batch["seq_valid"].shape[0]
        return (jax.ops.segment_sum((tok * mask).ravel(), batch["seq_ids"].ravel(), num_segments=num),
                jax.ops.segment_sum(mask.ravel(), batch["seq_ids"].ravel(), num_segments=num))

    batch = _lm_batch(10, 8, filler=2)
    batch["positions"] = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (8, T))
    batch["segment_ids"] = (batch["input_ids"] > 0).astype(jnp.int32)
    batch["ref_logps"] = oracle_logps(jax.tree.map(lambda p: p * 0.8, params), batch)[0]
    return params, batch, logps_fn, oracle_logps


@pytest.mark.parametrize("solver", ["penalty", "barrier", "unrolled"])
def test_solvers_on_llama_decoder_match_finite_differences_of_their_objective(solver):
    with jax.enable_x64(True):
        params, batch, logps_fn, oracle_logps = _decoder_setup()
        upper = losses.get_loss("simpo", beta=2.0, gamma=0.5)
        cfg = bilevel.SPOConfig(solver=solver, inner_steps=2, inner_lr=0.05, gamma=4.0, epsilon=-0.5,
                                barrier_alpha=500.0)  # large enough that λ > 0 here
        d, metrics = jax.jit(objectives.make_spo_solver(logps_fn, upper, cfg))(params, batch)

        def stats_of(p):
            s, n = oracle_logps(p, batch)
            r = batch["ref_logps"]
            return losses.PairStats(chosen_logps=s[0::2], rejected_logps=s[1::2], chosen_len=n[0::2],
                                    rejected_len=n[1::2], ref_chosen_logps=r[0::2], ref_rejected_logps=r[1::2],
                                    weight=batch["seq_valid"][0::2])

        def f(p):
            return upper(stats_of(p))[0]

        def c(p):
            st = stats_of(p)
            return losses.spo_penalty(losses.reference_gap(st), epsilon=-0.5, weight=st.weight)[0]

        def lower(p, b):
            s, n = oracle_logps(p, b)
            w = b["seq_valid"][0::2]
            return jnp.sum(w * (-s[0::2] / n[0::2])) / jnp.sum(w)

        if solver == "penalty":
            objective = lambda p: f(p) + 4.0 * c(p)  # noqa: E731
        elif solver == "barrier":
            gf, gc = jax.jit(jax.grad(f))(params), jax.jit(jax.grad(c))(params)
            lam = max((cfg.barrier_alpha * float(jax.jit(c)(params)) - float(bilevel.tree_vdot(gf, gc))) /
                      (float(bilevel.tree_vdot(gc, gc)) + cfg.barrier_delta), 0.0)
            assert lam > 0
            np.testing.assert_allclose(float(metrics["spo/lambda"]), lam, rtol=1e-6)
            objective = lambda p: f(p) + lam * c(p)  # noqa: E731
        else:
            def objective(phi):
                theta = _python_unroll(lower, phi, batch, 2, optax.sgd(0.05))
                return f(theta) + 4.0 * c(theta)
        assert float(metrics["spo/penalty"]) > 0  # the constraint is active on this batch
        # h = 1e-6: the unrolled objective is strongly curved (FD with h = 1e-5 is off by 1e-4)
        _assert_directional(d, jax.jit(objective), params, seeds=(11, 12), rtol=1e-5, h=1e-6)
