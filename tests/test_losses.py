"""spo_jax.losses against independent NumPy implementations of the published formulas.

The oracle (float64 NumPy, written from the papers' equations, not from the code)
checks values in fp32 and, under jax x64, gradients w.r.t. the policy log-probs
against NumPy central finite differences. Closed forms: DPO's gradient
−β σ(−βΔ)/P, IPO's minimum at Δ = 1/(2β).
"""

from __future__ import annotations

import re
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spo_jax import losses
from spo_jax.losses import PairStats

P = 6


# --------------------------------------------------------------------------- NumPy oracle


def log_sigmoid(u):
    return -np.logaddexp(0.0, -u)


def wmean(x, w):
    return np.mean(x) if w is None else np.sum(w * x) / np.sum(w)


def np_loss(name, sw, sl, nw, nl, rw, rl, w=None, m_fixed=None, **hp):
    """Per-pair published formula, weighted mean over pairs. All arrays float64 [P]."""
    delta = (sw - rw) - (sl - rl) if rw is not None else None
    aw, al = sw / nw, sl / nl
    if name == "dpo":
        per = -log_sigmoid(hp["beta"] * delta)
    elif name == "cdpo":  # Mitchell 2023
        e, u = hp["label_smoothing"], hp["beta"] * delta
        per = -(1 - e) * log_sigmoid(u) - e * log_sigmoid(-u)
    elif name == "robust":  # Chowdhury et al. 2024, eq. 8
        e, u = hp["label_smoothing"], hp["beta"] * delta
        per = (-(1 - e) * log_sigmoid(u) + e * log_sigmoid(-u)) / (1 - 2 * e)
    elif name == "ipo":
        per = (delta - 1 / (2 * hp["beta"])) ** 2
    elif name == "hinge":
        per = np.maximum(0.0, 1 - hp["beta"] * delta)
    elif name == "dpop":  # Pal et al. 2024, eq. 3
        b, lam = hp["beta"], hp["lam"]
        per = -log_sigmoid(b * (sw - rw) - b * lam * np.maximum(0.0, rw - sw) - b * (sl - rl))
    elif name == "rpo":  # Pang et al. 2024: DPO + lam * token-mean NLL(y_w)
        per = -log_sigmoid(hp["beta"] * delta) + hp["lam"] * (-sw / nw)
    elif name == "rdpo":  # Park et al. 2024
        per = -log_sigmoid(hp["beta"] * delta + hp["alpha"] * nw - hp["alpha"] * nl)
    elif name == "cpo":  # Xu et al. 2024: preference term + lam * NLL(y_w)
        per = -log_sigmoid(hp["beta"] * sw - hp["beta"] * sl) + hp["lam"] * (-sw / nw)
    elif name == "simpo":  # Meng et al. 2024, eq. 6
        per = -log_sigmoid(hp["beta"] / nw * sw - hp["beta"] / nl * sl - hp["gamma"])
    elif name == "alphadpo":
        m = m_fixed if m_fixed is not None else alpha_margin(sw, sl, nw, nl, rw, rl, w, hp["normalize"])
        per = -log_sigmoid(hp["beta"] * (aw - al) - hp["gamma"] - hp["alpha"] * hp["beta"] * m)
    elif name == "orpo":  # Hong et al. 2024: odds = P / (1 - P), P = exp(mean log-prob)
        # log(P / (1 − P)) = log P − log(1 − P), written with log1p for tiny P
        log_odds_ratio = (aw - np.log1p(-np.exp(aw))) - (al - np.log1p(-np.exp(al)))
        per = -aw - hp["lam"] * log_sigmoid(log_odds_ratio)
    elif name == "sft":
        per = -aw
    else:
        raise KeyError(name)
    return wmean(per, w)


def alpha_margin(sw, sl, nw, nl, rw, rl, w, normalize):
    m = (sw / nw - sl / nl) - (rw / nw - rl / nl)
    if normalize:
        mu = wmean(m, w)
        m = (m - mu) / np.sqrt(wmean((m - mu) ** 2, w))
    return m


HPARAMS = {
    "dpo": dict(beta=0.3), "cdpo": dict(beta=0.3, label_smoothing=0.2),
    "robust": dict(beta=0.3, label_smoothing=0.2), "ipo": dict(beta=0.3), "hinge": dict(beta=0.3),
    "dpop": dict(beta=0.3, lam=5.0), "rpo": dict(beta=0.3, lam=2.5), "rdpo": dict(beta=0.3, alpha=0.05), "cpo": dict(beta=0.3, lam=0.7),
    "simpo": dict(beta=2.0, gamma=0.8), "alphadpo": dict(beta=2.0, gamma=0.8, alpha=0.3, normalize=True),
    "orpo": dict(lam=0.4), "sft": {},
}


def random_stats(seed, p=P, weight=False):
    """Random float64 NumPy statistics in a realistic range (sums ~ −n · U(0.2, 3))."""
    rng = np.random.default_rng(seed)
    nw = rng.integers(3, 40, p).astype(float)
    nl = rng.integers(3, 40, p).astype(float)
    sw, sl = -nw * rng.uniform(0.2, 3.0, p), -nl * rng.uniform(0.2, 3.0, p)
    rw, rl = sw + rng.normal(0, 2.0, p), sl + rng.normal(0, 2.0, p)
    w = rng.uniform(0.2, 2.0, p) if weight else None
    return dict(sw=sw, sl=sl, nw=nw, nl=nl, rw=rw, rl=rl, w=w)


def to_stats(d, dtype=jnp.float32, ref=True):
    a = lambda x: None if x is None else jnp.asarray(x, dtype)
    return PairStats(a(d["sw"]), a(d["sl"]), a(d["nw"]), a(d["nl"]),
                     a(d["rw"]) if ref else None, a(d["rl"]) if ref else None, a(d["w"]))


def np_fd_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        g[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


# --------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("weighted", [False, True])
def test_value_matches_numpy_formula_fp32(name, weighted):
    d = random_stats(1, weight=weighted)
    value, metrics = jax.jit(losses.get_loss(name, **HPARAMS[name]))(to_stats(d))
    assert value.dtype == jnp.float32 and value.shape == ()
    np.testing.assert_allclose(float(value), np_loss(name, **d, **HPARAMS[name]), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(value))


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_gradient_wrt_policy_logps_matches_numpy_finite_differences(name):
    d = random_stats(2, weight=True)
    hp = HPARAMS[name]
    m_fixed = None
    if name == "alphadpo":  # the margin is under stop-gradient: hold it at the base point
        m_fixed = alpha_margin(d["sw"], d["sl"], d["nw"], d["nl"], d["rw"], d["rl"], d["w"], True)
    fn = losses.get_loss(name, **hp)
    with jax.enable_x64(True):
        def f(sw, sl):
            stats = to_stats(d, jnp.float64)._replace(chosen_logps=sw, rejected_logps=sl)
            return fn(stats)[0]

        gw, gl = jax.grad(f, argnums=(0, 1))(jnp.asarray(d["sw"]), jnp.asarray(d["sl"]))
    fd_w = np_fd_grad(lambda x: np_loss(name, **{**d, "sw": x}, m_fixed=m_fixed, **hp), d["sw"])
    fd_l = np_fd_grad(lambda x: np_loss(name, **{**d, "sl": x}, m_fixed=m_fixed, **hp), d["sl"])
    np.testing.assert_allclose(np.asarray(gw), fd_w, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(gl), fd_l, rtol=1e-5, atol=1e-9)


def test_dpo_gradient_is_minus_beta_sigmoid_of_minus_beta_delta_over_p():
    d = random_stats(3)
    beta = 0.7
    delta = (d["sw"] - d["rw"]) - (d["sl"] - d["rl"])
    gw, gl = jax.grad(lambda sw, sl: losses.dpo(to_stats(d)._replace(chosen_logps=sw, rejected_logps=sl),
                                                beta=beta)[0], argnums=(0, 1))(
        jnp.asarray(d["sw"], jnp.float32), jnp.asarray(d["sl"], jnp.float32))
    expected = -beta / (1 + np.exp(beta * delta)) / P
    np.testing.assert_allclose(np.asarray(gw), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gl), -expected, rtol=1e-5)


def test_ipo_is_minimised_at_delta_one_over_two_beta():
    beta = 0.25
    d = random_stats(4, p=1)
    target = 1 / (2 * beta)

    def loss_at(delta):  # move s_w so that Δ = delta
        sw = d["rw"] + (d["sl"] - d["rl"]) + delta
        return losses.ipo(to_stats({**d, "sw": sw}), beta=beta)[0]

    assert float(loss_at(target)) < 1e-6
    grad = jax.grad(lambda x: losses.ipo(to_stats(d)._replace(chosen_logps=x), beta=beta)[0])
    sw_star = jnp.asarray(d["rw"] + (d["sl"] - d["rl"]) + target, jnp.float32)
    assert abs(float(grad(sw_star)[0])) < 1e-4
    for off in (-1.0, -0.1, 0.1, 1.0):
        np.testing.assert_allclose(float(loss_at(target + off)), off ** 2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_extreme_and_zero_margins_are_finite_and_match_numpy(name):
    # pairs with margin (s_w − s_l, Δ, ā_w − ā_l) of −1e4, −1e2, 0, 0, +1e2, +1e4
    m = np.array([-1e4, -1e2, 0.0, 0.0, 1e2, 1e4])
    n = np.full(6, 10.0)
    sw = np.array([-2e4, -300.0, -5.0, -9.0, -100.0, -10.0])
    sl = sw - m  # s_w − s_l = m, ā_w − ā_l = m / 10
    d = dict(sw=sw, sl=sl, nw=n, nl=n, rw=sw.copy(), rl=sl - m, w=None)  # Δ = −m (exactly 0 twice)
    hp = HPARAMS[name]
    fn = losses.get_loss(name, **hp)
    value, grads = jax.value_and_grad(
        lambda sw, sl: fn(to_stats(d)._replace(chosen_logps=sw, rejected_logps=sl))[0], argnums=(0, 1))(
        jnp.asarray(sw, jnp.float32), jnp.asarray(sl, jnp.float32))
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    np.testing.assert_allclose(float(value), np_loss(name, **d, **hp), rtol=1e-5)


def test_reference_free_losses_ignore_and_do_not_need_reference():
    d = random_stats(5, weight=True)
    d2 = {**d, "rw": d["rw"] + 13.0, "rl": d["rl"] - 7.0}
    for name in sorted(losses.REFERENCE_FREE):
        fn = losses.get_loss(name, **HPARAMS[name])

        def vg(stats):
            f = lambda sw, sl: fn(stats._replace(chosen_logps=sw, rejected_logps=sl))[0]
            return jax.value_and_grad(f, argnums=(0, 1))(stats.chosen_logps, stats.rejected_logps)

        (v0, g0), (v1, g1), (v2, g2) = vg(to_stats(d)), vg(to_stats(d2)), vg(to_stats(d, ref=False))
        assert float(v0) == float(v1) == float(v2), name
        for a, b, c in zip(g0, g1, g2):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        assert not losses.uses_reference(name)


@pytest.mark.parametrize("name", sorted(set(losses.LOSSES) - losses.REFERENCE_FREE))
def test_reference_losses_raise_without_reference_even_under_jit(name):
    stats = to_stats(random_stats(6), ref=False)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        jax.jit(losses.get_loss(name))(stats)
    assert losses.uses_reference(name)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_zero_weight_fillers_equal_dropping_them(name):
    d = random_stats(7, weight=True)
    keep = np.array([1, 1, 0, 1, 0, 1], bool)
    padded = {k: (v if v is None else v.copy()) for k, v in d.items()}
    padded["w"] = np.where(keep, d["w"], 0.0)
    # filler garbage: empty responses and absurd log-probs
    padded["nw"][~keep], padded["nl"][~keep] = 0.0, 0.0
    padded["sw"][~keep], padded["rl"][~keep] = -1e30, 1e30
    dropped = {k: (v if v is None else v[keep]) for k, v in d.items()}
    fn = losses.get_loss(name, **HPARAMS[name])
    vf = lambda dd: jax.value_and_grad(lambda sw: fn(to_stats(dd)._replace(chosen_logps=sw))[0])(
        jnp.asarray(dd["sw"], jnp.float32))
    (v_pad, g_pad), (v_drop, g_drop) = vf(padded), vf(dropped)
    np.testing.assert_allclose(float(v_pad), float(v_drop), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_pad)[keep], np.asarray(g_drop), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(g_pad)[~keep], 0.0)
    _, m_pad = fn(to_stats(padded))
    _, m_drop = fn(to_stats(dropped))
    for k in m_drop:
        np.testing.assert_allclose(float(m_pad[k]), float(m_drop[k]), rtol=1e-5, atol=1e-7, err_msg=k)


# --------------------------------------------------------------------------- metrics


def test_trl_metrics_for_reference_and_reference_free_losses():
    d = random_stats(8, weight=True)
    w = d["w"]
    _, m = losses.dpo(to_stats(d), beta=0.3)
    cr, rr = 0.3 * (d["sw"] - d["rw"]), 0.3 * (d["sl"] - d["rl"])
    expected = {"rewards/chosen": wmean(cr, w), "rewards/rejected": wmean(rr, w),
                "rewards/margins": wmean(cr - rr, w), "rewards/accuracies": wmean((cr > rr) * 1.0, w),
                "logps/chosen": wmean(d["sw"], w), "logps/rejected": wmean(d["sl"], w)}
    for k, v in expected.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, err_msg=k)
    _, m = losses.simpo(to_stats(d, ref=False), beta=2.0, gamma=0.5)  # TRL: beta * mean log-prob
    np.testing.assert_allclose(float(m["rewards/chosen"]), wmean(2.0 * d["sw"] / d["nw"], w), rtol=1e-5)
    np.testing.assert_allclose(float(m["rewards/rejected"]), wmean(2.0 * d["sl"] / d["nl"], w), rtol=1e-5)
    _, m = losses.cpo(to_stats(d, ref=False), beta=0.3, lam=1.0)  # TRL: beta * summed log-prob
    np.testing.assert_allclose(float(m["rewards/margins"]), wmean(0.3 * (d["sw"] - d["sl"]), w), rtol=1e-5)
    np.testing.assert_allclose(float(m["nll_loss"]), wmean(-d["sw"] / d["nw"], w), rtol=1e-5)


# --------------------------------------------------------------------------- registry, validation


def test_registry_has_every_method_loss():
    assert set(losses.LOSSES) == {"dpo", "cdpo", "robust", "ipo", "hinge", "dpop", "rpo", "rdpo", "cpo",
                                  "simpo", "alphadpo", "orpo", "sft"}
    for name, fn in losses.LOSSES.items():
        # the published formula and its citation (author, year) are in the docstring
        assert "L = " in fn.__doc__ and (re.search(r"\w+ (et al\. )?20\d\d", fn.__doc__) or name == "sft"), name


@pytest.mark.parametrize("name,hp,match", [
    ("dpo", dict(beta=0.0), "beta must be > 0; got beta=0.0"),
    ("simpo", dict(beta=-1.0), "beta must be > 0"),
    ("cdpo", dict(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\); got label_smoothing=0.5"),
    ("robust", dict(label_smoothing=-0.1), "label_smoothing must be in"),
    ("simpo", dict(gamma=-0.5), "gamma must be >= 0; got gamma=-0.5"),
    ("cpo", dict(lam=-1), "lam must be >= 0"),
    ("rdpo", dict(alpha=-0.1), "alpha must be >= 0"),
    ("dpo", dict(beta=float("nan")), "beta must be a finite number"),
    ("dpo", dict(beta="0.1"), "beta must be a finite number"),
    ("alphadpo", dict(normalize=1), "normalize must be True or False"),
])
def test_get_loss_rejects_bad_hyperparameters(name, hp, match):
    with pytest.raises(ValueError, match=match):
        losses.get_loss(name, **hp)


def test_get_loss_names_unknown_loss_and_unknown_hyperparameter():
    with pytest.raises(ValueError, match="unknown loss 'dpp'; known losses: alphadpo, cdpo, cpo, dpo"):
        losses.get_loss("dpp")
    with pytest.raises(ValueError, match="loss 'simpo' has no hyperparameter 'label_smoothing'; "
                                         "accepted: beta, gamma"):
        losses.get_loss("simpo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="accepted: none"):
        losses.get_loss("sft", beta=0.1)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.uses_reference("nope")
    # numpy scalars and ints are fine; defaults fill the rest
    fn = losses.get_loss("cdpo", beta=np.float32(0.5), label_smoothing=0)
    d = random_stats(9)
    np.testing.assert_allclose(float(fn(to_stats(d))[0]),
                               np_loss("cdpo", **d, beta=0.5, label_smoothing=0.0), rtol=1e-5)


def test_stats_validation_at_the_boundary():
    d = random_stats(10)
    good = to_stats(d)
    with pytest.raises(ValueError, match=r"stats.rejected_logps has shape \(5,\), expected \(6,\)"):
        losses.dpo(good._replace(rejected_logps=good.rejected_logps[:5]))
    with pytest.raises(ValueError, match=r"stats.chosen_logps must be \[P\]"):
        losses.simpo(good._replace(chosen_logps=good.chosen_logps[None]))
    with pytest.raises(ValueError, match=r"stats.chosen_len must be > 0"):
        losses.simpo(good._replace(chosen_len=good.chosen_len.at[2].set(0.0)))
    with pytest.raises(ValueError, match=r"stats.weight must be >= 0"):
        losses.dpo(good._replace(weight=jnp.full(6, -1.0)))
    with pytest.raises(ValueError, match="expected a PairStats"):
        losses.dpo((good.chosen_logps, good.rejected_logps))
    # a zero count is fine for a weight-0 filler; counts under jit cannot be checked and are not
    losses.simpo(good._replace(chosen_len=good.chosen_len.at[2].set(0.0), weight=jnp.ones(6).at[2].set(0.0)))
    assert np.isfinite(float(jax.jit(losses.simpo)(good)[0]))


def test_bf16_inputs_give_fp32_loss():
    d = random_stats(11, weight=True)
    value, metrics = losses.get_loss("dpo", beta=0.3)(to_stats(d, jnp.bfloat16))
    assert value.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_losses_vmap_over_a_leading_axis():
    ds = [random_stats(20 + i) for i in range(3)]
    batched = PairStats(*[None if ds[0][k] is None else jnp.asarray(np.stack([dd[k] for dd in ds]), jnp.float32)
                          for k in ("sw", "sl", "nw", "nl", "rw", "rl", "w")])
    fn = losses.get_loss("dpo", beta=0.3)
    values = jax.vmap(lambda s: fn(s)[0])(batched)
    np.testing.assert_allclose(np.asarray(values), [np_loss("dpo", **dd, beta=0.3) for dd in ds], rtol=1e-5)


# --------------------------------------------------------------------------- combine


def test_combine_is_a_weighted_sum_with_merged_metrics():
    d = random_stats(12, weight=True)
    dpo_fn, sft_fn = losses.get_loss("dpo", beta=0.3), losses.get_loss("sft")
    rpo = losses.combine([(1.0, dpo_fn), (0.5, sft_fn)])
    value, metrics = jax.jit(rpo)(to_stats(d))
    expected = np_loss("dpo", **d, beta=0.3) + 0.5 * np_loss("sft", **d)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/dpo"]), np_loss("dpo", **d, beta=0.3), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss/sft"]), np_loss("sft", **d), rtol=1e-5)
    assert "rewards/margins" in metrics and "loss/sft" in metrics
    g = jax.grad(lambda sw: rpo(to_stats(d)._replace(chosen_logps=sw))[0])(jnp.asarray(d["sw"], jnp.float32))
    g_parts = [jax.grad(lambda sw, f=f: f(to_stats(d)._replace(chosen_logps=sw))[0])(
        jnp.asarray(d["sw"], jnp.float32)) for f in (dpo_fn, sft_fn)]
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_parts[0] + 0.5 * g_parts[1]), rtol=1e-5)
    # a combination is a loss again, and duplicate names stay apart
    nested = losses.combine([(2.0, rpo), (1.0, dpo_fn)])
    v2, m2 = nested(to_stats(d))
    np.testing.assert_allclose(float(v2), 2 * expected + np_loss("dpo", **d, beta=0.3), rtol=1e-5)
    assert "loss/dpo+sft" in m2 and "loss/dpo" in m2
    twice = losses.combine([(1.0, dpo_fn), (1.0, dpo_fn)])
    assert {"loss/dpo", "loss/dpo_1"} <= set(twice(to_stats(d))[1])


def test_rpo_is_dpo_plus_lambda_sft_and_its_gradient_on_s_w():
    """The named rpo loss equals combine([(1, dpo), (lam, sft)]) (= loss.sft_weight on dpo), and its
    gradient w.r.t. s_w is DPO's closed form minus lam / (n_w P)."""
    d = random_stats(21, weight=False)
    stats = to_stats(d, jnp.float64) if jax.config.jax_enable_x64 else to_stats(d)
    v, m = losses.get_loss("rpo", beta=0.3, lam=2.0)(stats)
    c, _ = losses.combine([(1.0, losses.get_loss("dpo", beta=0.3)), (2.0, losses.get_loss("sft"))])(stats)
    np.testing.assert_allclose(float(v), float(c), rtol=1e-6)
    np.testing.assert_allclose(float(m["nll_loss"]), np.mean(-d["sw"] / d["nw"]), rtol=1e-5)
    g = jax.grad(lambda sw: losses.rpo(stats._replace(chosen_logps=sw), beta=0.3, lam=2.0)[0])(stats.chosen_logps)
    delta = (d["sw"] - d["rw"]) - (d["sl"] - d["rl"])
    want = (-0.3 / (1 + np.exp(0.3 * delta)) - 2.0 / d["nw"]) / P
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4)


def test_combine_rejects_bad_terms():
    with pytest.raises(ValueError, match="at least one"):
        losses.combine([])
    with pytest.raises(ValueError, match="weights must be finite numbers >= 0; got -0.5"):
        losses.combine([(-0.5, losses.get_loss("sft"))])
    with pytest.raises(ValueError, match="is not a loss function"):
        losses.combine([(1.0, "dpo")])


# --------------------------------------------------------------------------- SPO constraint


def test_reference_gap_is_token_mean_gap_of_chosen():
    d = random_stats(13)
    q = losses.reference_gap(to_stats(d))
    np.testing.assert_allclose(np.asarray(q), d["rw"] / d["nw"] - d["sw"] / d["nw"], rtol=1e-5)
    with pytest.raises(ValueError, match="needs reference"):
        losses.reference_gap(to_stats(d, ref=False))


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("epsilon", [0.0, 0.15, -0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_spo_penalty_matches_numpy(per_sample, squared, epsilon, weighted):
    rng = np.random.default_rng(14)
    q = rng.normal(0, 0.5, 9)
    w = rng.uniform(0, 2, 9) * (rng.uniform(size=9) > 0.3) if weighted else None
    phi = (lambda x: np.maximum(x, 0) ** 2) if squared else (lambda x: np.maximum(x, 0))
    f_np = (lambda q: wmean(phi(q - epsilon), w)) if per_sample else (lambda q: phi(wmean(q, w) - epsilon))

    def f(q):
        return losses.spo_penalty(q, epsilon=epsilon, per_sample=per_sample, squared=squared,
                                  weight=None if w is None else jnp.asarray(w))

    value, metrics = jax.jit(f)(jnp.asarray(q, jnp.float32))
    np.testing.assert_allclose(float(value), f_np(q), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["spo/q_mean"]), wmean(q, w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["spo/violation_frac"]), wmean((q > 0) * 1.0, w), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["spo/penalty"]), float(value))
    with jax.enable_x64(True):
        g = jax.grad(lambda x: f(x)[0])(jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(g), np_fd_grad(f_np, q), rtol=1e-6, atol=1e-9)


def test_spo_penalty_validation():
    with pytest.raises(ValueError, match="epsilon must be finite"):
        losses.spo_penalty(jnp.zeros(3), epsilon=float("inf"))
    with pytest.raises(ValueError, match=r"q must be \[P\]"):
        losses.spo_penalty(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="weight must have q's shape"):
        losses.spo_penalty(jnp.zeros(3), weight=jnp.ones(4))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        losses.spo_penalty(jnp.zeros(3), weight=-jnp.ones(3))


def test_pair_stats_splits_interleaved_sums_and_clamps_counts():
    sums = jnp.arange(8.0)
    stats = losses.pair_stats(sums, sums + 1, sums * 2, jnp.array([1, 1, 1, 1, 0, 0, 1, 1.0]))
    np.testing.assert_array_equal(np.asarray(stats.chosen_logps), [0, 2, 4, 6])
    np.testing.assert_array_equal(np.asarray(stats.rejected_len), [2, 4, 6, 8])
    np.testing.assert_array_equal(np.asarray(stats.ref_rejected_logps), [2, 6, 10, 14])
    np.testing.assert_array_equal(np.asarray(stats.weight), [1, 1, 0, 1])
    filler = losses.pair_stats(sums, jnp.zeros(8))  # fillers have 0 tokens: counts clamp to 1
    np.testing.assert_array_equal(np.asarray(filler.chosen_len), [1, 1, 1, 1])
    assert filler.ref_chosen_logps is None and filler.weight is None
    with pytest.raises(ValueError, match="S = 2P"):
        losses.pair_stats(jnp.zeros(3), jnp.ones(3))
