"""Preference losses on per-pair statistics: the Bradley–Terry family, SFT, the SPO constraint.

Every loss is a small pure function ``fn(stats, *, hparams) -> (scalar, metrics)``
of a :class:`PairStats` (per-pair summed log-probs and token counts, Contract 4 in
docs/DESIGN.md); :func:`get_loss` returns a validated one. Notation (per pair i;
the loss is the weighted mean over pairs):

    s_w, s_l   policy log-probs of the chosen / rejected response (sums over response tokens)
    r_w, r_l   reference log-probs;   n_w, n_l   response token counts
    ā = s / n  token-mean log-prob;   Δ = (s_w − r_w) − (s_l − r_l);   σ the logistic function

Numerics: values and metrics are at least fp32 (fp64 inputs under ``jax_enable_x64``
stay fp64); −log σ(u) is ``softplus(−u)`` / ``log_sigmoid``, never log(sigmoid),
so margins of ±1e4 give finite values and gradients.

Weights: ``stats.weight`` [P] (0 for the filler pairs of a packed batch, None =
all ones) weights every batch mean, loss and metrics alike (:func:`weighted_mean`).

Metrics follow TRL's names: ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``
(``logps/*`` are the summed policy log-probs). Rewards are β(s − r) for losses
with a reference; reference-free losses report TRL's convention, β times the
policy log-prob (β·ā for SimPO; λ·ā for ORPO, as TRL's ORPOTrainer whose β is
our λ; β·s for CPO, as TRL's CPOTrainer with its default sigmoid loss).

Reference-free losses (``REFERENCE_FREE``: cpo, simpo, orpo, sft) never read
``ref_*``; the others raise a ValueError at trace time when those are None.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spo_jax.numerics import at_least_f32

Array = jax.Array
LossFn = Callable[["PairStats"], tuple[Array, dict]]

__all__ = [
    "PairStats", "pair_stats", "weighted_mean", "LOSSES", "REFERENCE_FREE", "get_loss",
    "uses_reference", "combine", "reference_gap", "constraint_metrics", "spo_penalty",
    "dpo", "cdpo", "robust", "ipo", "hinge", "dpop", "rpo", "rdpo", "cpo", "simpo", "alphadpo", "orpo",
    "sft",
]


class PairStats(NamedTuple):
    """Per-pair statistics, all [P] float (see docs/DESIGN.md, Contract 4).

    chosen_logps, rejected_logps: summed log-probs of the response tokens.
    chosen_len, rejected_len: response token counts (> 0 for every pair of weight > 0).
    ref_chosen_logps, ref_rejected_logps: the reference model's sums; None for reference-free losses.
    weight: pair weights (0 = filler); None = all ones.
    """

    chosen_logps: Array
    rejected_logps: Array
    chosen_len: Array
    rejected_len: Array
    ref_chosen_logps: Array | None = None
    ref_rejected_logps: Array | None = None
    weight: Array | None = None


def pair_stats(sums_S, counts_S, ref_sums_S=None, seq_valid_S=None) -> PairStats:
    """Interleaved per-sequence sums and counts [S] (sequence 2i the chosen, 2i+1 the rejected
    response of pair i; Contract 1) -> :class:`PairStats` [P], at least fp32.

    ``ref_sums_S``: the reference model's sums (None for reference-free losses);
    ``seq_valid_S``: 1 for a real sequence, 0 for a filler (the pair weight is the
    chosen sequence's). Counts are clamped to >= 1 so that filler pairs stay finite.
    """
    if jnp.ndim(sums_S) != 1 or jnp.shape(sums_S)[0] % 2:
        raise ValueError(f"pair_stats: sums_S must be [S] with S = 2P (chosen, rejected interleaved); got "
                         f"shape {jnp.shape(sums_S)}")
    sums = at_least_f32(sums_S)
    counts = jnp.maximum(jnp.asarray(counts_S).astype(sums.dtype), 1.0)
    ref = None if ref_sums_S is None else at_least_f32(ref_sums_S)
    return PairStats(
        chosen_logps=sums[0::2], rejected_logps=sums[1::2],
        chosen_len=counts[0::2], rejected_len=counts[1::2],
        ref_chosen_logps=None if ref is None else ref[0::2],
        ref_rejected_logps=None if ref is None else ref[1::2],
        weight=None if seq_valid_S is None else at_least_f32(seq_valid_S)[0::2],
    )


# ----------------------------------------------------------------------------- helpers


def weighted_mean(x, weight=None):
    """``Σ w_i x_i / Σ w_i`` (plain mean when ``weight`` is None); 0 when every weight is 0."""
    x = at_least_f32(x)
    if weight is None:
        return jnp.mean(x)
    w = at_least_f32(weight)
    x = jnp.where(w != 0, x, 0.0)  # a filler's garbage (inf, NaN) must not poison the sum
    return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), jnp.finfo(w.dtype).tiny)


_mean = weighted_mean


def _is_concrete(x) -> bool:
    return x is not None and not isinstance(x, jax.core.Tracer)


def _check_stats(stats: PairStats, needs_reference: bool, name: str) -> None:
    """Boundary checks (trace time): shapes, positive counts and non-negative weights when concrete,
    reference fields present when needed."""
    if not isinstance(stats, PairStats):
        raise ValueError(f"{name}: expected a PairStats; got {type(stats).__name__}")
    shape = jnp.shape(stats.chosen_logps)
    if len(shape) != 1:
        raise ValueError(f"{name}: stats.chosen_logps must be [P]; got shape {shape}")
    for field in PairStats._fields:
        v = getattr(stats, field)
        if v is not None and jnp.shape(v) != shape:
            raise ValueError(f"{name}: stats.{field} has shape {jnp.shape(v)}, expected {shape} "
                             f"(the shape of stats.chosen_logps)")
    weight = np.asarray(stats.weight) if _is_concrete(stats.weight) else None
    if weight is not None and np.any(weight < 0):
        raise ValueError(f"{name}: stats.weight must be >= 0 (0 = filler pair); got "
                         f"{weight[weight < 0][:5].tolist()}")
    for field in ("chosen_len", "rejected_len"):
        v = getattr(stats, field)
        if _is_concrete(v):
            bad = np.asarray(v) <= 0
            if weight is not None:
                bad &= weight > 0
            if np.any(bad):
                raise ValueError(f"{name}: stats.{field} must be > 0 (response token counts) for every "
                                 f"pair of weight > 0; got {np.asarray(v)[bad][:5].tolist()} — drop empty "
                                 "responses in the data, or give filler pairs weight 0")
    if needs_reference and (stats.ref_chosen_logps is None or stats.ref_rejected_logps is None):
        raise ValueError(f"{name} needs reference log-probs: set stats.ref_chosen_logps and "
                         f"stats.ref_rejected_logps (a reference model's log-prob sums), or use a "
                         f"reference-free loss ({', '.join(sorted(REFERENCE_FREE))})")


def _nls(u):
    """−log σ(u) = softplus(−u), stable for |u| up to the float range."""
    return jax.nn.softplus(-u)


def _metrics(loss, chosen_rewards, rejected_rewards, stats) -> dict:
    """TRL-named metrics; rewards under stop-gradient."""
    w, sg = stats.weight, jax.lax.stop_gradient
    cr, rr = sg(at_least_f32(chosen_rewards)), sg(at_least_f32(rejected_rewards))
    return {
        "loss": loss,
        "rewards/chosen": _mean(cr, w),
        "rewards/rejected": _mean(rr, w),
        "rewards/margins": _mean(cr - rr, w),
        "rewards/accuracies": _mean((cr > rr).astype(cr.dtype), w),
        "logps/chosen": _mean(sg(stats.chosen_logps), w),
        "logps/rejected": _mean(sg(stats.rejected_logps), w),
    }


def _delta(stats):
    """Δ = (s_w − r_w) − (s_l − r_l)."""
    s = at_least_f32
    return (s(stats.chosen_logps) - s(stats.ref_chosen_logps)) - (s(stats.rejected_logps)
                                                                   - s(stats.ref_rejected_logps))


def _ref_rewards(stats, beta):
    """β(s_w − r_w), β(s_l − r_l)."""
    s = at_least_f32
    return (beta * (s(stats.chosen_logps) - s(stats.ref_chosen_logps)),
            beta * (s(stats.rejected_logps) - s(stats.ref_rejected_logps)))


def _safe_len(n):
    """Token counts with 0 (only legal for weight-0 fillers) replaced by 1, so no inf/NaN arises."""
    n = at_least_f32(n)
    return jnp.where(n > 0, n, 1.0)


def _token_means(stats, ref: bool = False):
    """(ā_w, ā_l) of the policy, or of the reference when ``ref``."""
    cw, cl = (stats.ref_chosen_logps, stats.ref_rejected_logps) if ref else (stats.chosen_logps,
                                                                                stats.rejected_logps)
    return at_least_f32(cw) / _safe_len(stats.chosen_len), at_least_f32(cl) / _safe_len(stats.rejected_len)


def _reference_loss(per_pair, stats, beta):
    loss = _mean(per_pair, stats.weight)
    return loss, _metrics(loss, *_ref_rewards(stats, beta), stats)


# ----------------------------------------------------------------------------- losses


def dpo(stats: PairStats, *, beta: float = 0.1):
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7).

    ``L = −log σ(β Δ)``. ∂L/∂s_w = −β σ(−βΔ) per pair (divided by P in the mean).
    """
    _check_stats(stats, True, "dpo")
    return _reference_loss(_nls(beta * _delta(stats)), stats, beta)


def cdpo(stats: PairStats, *, beta: float = 0.1, label_smoothing: float = 0.1):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO").

    ``L = −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)``, ε = ``label_smoothing`` the assumed
    label-flip rate (TRL's ``loss_type="sigmoid"`` with ``label_smoothing``).
    """
    _check_stats(stats, True, "cdpo")
    u = beta * _delta(stats)
    return _reference_loss((1.0 - label_smoothing) * _nls(u) + label_smoothing * _nls(-u),
                           stats, beta)


def robust(stats: PairStats, *, beta: float = 0.1, label_smoothing: float = 0.1):
    """Provably robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 8; TRL ``"robust"``).

    ``L = [(1 − ε) ℓ(βΔ) − ε ℓ(−βΔ)] / (1 − 2ε)`` with ℓ(u) = −log σ(u): an unbiased
    estimate of the clean DPO loss under label-flip rate ε (ε < 1/2).
    """
    _check_stats(stats, True, "robust")
    u = beta * _delta(stats)
    per = ((1.0 - label_smoothing) * _nls(u) - label_smoothing * _nls(-u)) / (1.0 - 2.0 * label_smoothing)
    return _reference_loss(per, stats, beta)


def ipo(stats: PairStats, *, beta: float = 0.1):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17, τ = β): ``L = (Δ − 1/(2β))²``, minimised at Δ = 1/(2β).

    Δ from summed log-probs as in the paper (TRL's ``"ipo"`` uses token means instead).
    """
    _check_stats(stats, True, "ipo")
    return _reference_loss(jnp.square(_delta(stats) - 1.0 / (2.0 * beta)), stats, beta)


def hinge(stats: PairStats, *, beta: float = 0.1):
    """SLiC-style hinge (Zhao et al. 2023, "SLiC-HF"), DPO-parametrised as in TRL: ``L = relu(1 − βΔ)``."""
    _check_stats(stats, True, "hinge")
    return _reference_loss(jax.nn.relu(1.0 - beta * _delta(stats)), stats, beta)


def dpop(stats: PairStats, *, beta: float = 0.1, lam: float = 50.0):
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation
    with DPO-Positive", eq. 3).

    ``L = −log σ(β (Δ − λ · relu(r_w − s_w)))``: an extra penalty once the chosen
    response is less likely than under the reference (paper: λ = 50).
    """
    _check_stats(stats, True, "dpop")
    pen = jax.nn.relu(at_least_f32(stats.ref_chosen_logps) - at_least_f32(stats.chosen_logps))
    return _reference_loss(_nls(beta * (_delta(stats) - lam * pen)), stats, beta)


def rpo(stats: PairStats, *, beta: float = 0.1, lam: float = 1.0):
    """RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 1; TRL's
    ``rpo_alpha``): DPO plus a weighted NLL of the chosen response.

    ``L = −log σ(β Δ) + λ · NLL(y_w)``, NLL(y_w) = −ā_w the token-mean negative
    log-likelihood of the chosen response (the paper normalises by the response
    length). The simplest fix for a falling chosen log-prob, and the baseline SPO
    must beat. Rewards: β(s − r) as DPO. Extra metric ``nll_loss``.
    """
    _check_stats(stats, True, "rpo")
    aw, _ = _token_means(stats)
    loss, m = _reference_loss(_nls(beta * _delta(stats)) - lam * aw, stats, beta)
    m["nll_loss"] = _mean(-aw, stats.weight)
    return loss, m


def rdpo(stats: PairStats, *, beta: float = 0.1, alpha: float = 0.01):
    """R-DPO (Park et al. 2024, "Disentangling Length from Quality in Direct Preference
    Optimization", length-regularised DPO; the form SimPO's Table 3 lists).

    ``L = −log σ(βΔ + α (n_w − n_l))``. The reward is regularised by −α|y|, so the
    Bradley–Terry margin of the true reward gains +α(|y_w| − |y_l|): a pair whose
    chosen response is longer gets a smaller gradient, which stops DPO from buying
    margin with length (the sign docs/METHOD.md writes too).
    """
    _check_stats(stats, True, "rdpo")
    per = _nls(beta * _delta(stats) + alpha * (at_least_f32(stats.chosen_len) - at_least_f32(stats.rejected_len)))
    return _reference_loss(per, stats, beta)


def cpo(stats: PairStats, *, beta: float = 0.1, lam: float = 1.0):
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", eqs. 3–6), reference-free.

    ``L = −log σ(β (s_w − s_l)) + λ · NLL(y_w)``, NLL(y_w) = −ā_w the token-mean
    negative log-likelihood of the chosen response (TRL's ``cpo_alpha`` = λ).
    Rewards: β·s (TRL). Extra metric ``nll_loss``.
    """
    _check_stats(stats, False, "cpo")
    aw, _ = _token_means(stats)
    per = _nls(beta * (at_least_f32(stats.chosen_logps) - at_least_f32(stats.rejected_logps))) - lam * aw
    loss = _mean(per, stats.weight)
    m = _metrics(loss, beta * at_least_f32(stats.chosen_logps), beta * at_least_f32(stats.rejected_logps), stats)
    m["nll_loss"] = _mean(-aw, stats.weight)
    return loss, m


def simpo(stats: PairStats, *, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward", eq. 6), reference-free, length-normalised.

    ``L = −log σ(β (ā_w − ā_l) − γ)``, γ the target reward margin (TRL's
    ``simpo_gamma``; γ/β its ``gamma_beta_ratio``). Rewards: β·ā (TRL).
    """
    _check_stats(stats, False, "simpo")
    aw, al = _token_means(stats)
    loss = _mean(_nls(beta * (aw - al) - gamma), stats.weight)
    return loss, _metrics(loss, beta * aw, beta * al, stats)


def alphadpo(stats: PairStats, *, beta: float = 2.0, gamma: float = 1.0, alpha: float = 0.1,
             normalize: bool = True):
    """AlphaDPO (Wu et al. 2024, "α-DPO: Adaptive Reward Margin is What Direct Preference
    Optimization Needs", arXiv 2410.10148; loss ``alpha-dpo`` of the authors' code).

    The implicit reference π̂_ref ∝ U(y|x)·(π_θ/π_ref)^α turns SimPO's fixed margin
    into a per-pair margin:

        M = (ā_w − ā_l) − (ā^ref_w − ā^ref_l)        (token-mean log-ratio difference)
        L = −log σ(β (ā_w − ā_l) − γ − α β · sg[M̂])

    with sg the stop-gradient and M̂ = M standardised, (M − mean M) / std M. The
    authors' code standardises with exponential moving averages (momentum 0.9) of
    the global batch's mean and std; a pure loss has no state, so we use the
    current batch's weighted mean and (population) std — the stationary limit of
    those averages. ``normalize=False`` uses M itself (the paper's unnormalised
    form). α = 0 is SimPO. Rewards (as the authors' code): β(ā − α(ā − ā^ref)).
    """
    _check_stats(stats, True, "alphadpo")
    aw, al = _token_means(stats)
    rw, rl = _token_means(stats, ref=True)
    m = jax.lax.stop_gradient((aw - al) - (rw - rl))
    if normalize:
        mu = _mean(m, stats.weight)
        sd = jnp.sqrt(_mean(jnp.square(m - mu), stats.weight))
        m = (m - mu) / jnp.maximum(sd, 1e-6)
    loss = _mean(_nls(beta * (aw - al) - gamma - alpha * beta * m), stats.weight)
    metrics = _metrics(loss, beta * (aw - alpha * (aw - rw)), beta * (al - alpha * (al - rl)), stats)
    metrics["alphadpo/margin"] = _mean(m, stats.weight)
    return loss, metrics


def _log_odds(a):
    """log(p / (1 − p)) for p = exp(a), a ≤ 0 a token-mean log-prob: a − log(−expm1(a)).

    a is clamped to ≤ −1e-6 (p = 1 has infinite odds) so value and gradient stay finite.
    """
    a = jnp.minimum(a, -1e-6)
    return a - jnp.log(-jnp.expm1(a))


def orpo(stats: PairStats, *, lam: float = 0.1):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model", eqs. 6–7), reference-free.

    ``L = NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l))``, odds(y) = P/(1 − P)
    with P = exp(ā) the token-mean likelihood and NLL(y_w) = −ā_w (TRL's β = λ).
    Rewards: λ·ā (TRL). Extra metrics ``nll_loss``, ``log_odds_ratio``.
    """
    _check_stats(stats, False, "orpo")
    aw, al = _token_means(stats)
    ratio = jax.nn.log_sigmoid(_log_odds(aw) - _log_odds(al))
    loss = _mean(-aw - lam * ratio, stats.weight)
    m = _metrics(loss, lam * aw, lam * al, stats)
    m["nll_loss"] = _mean(-aw, stats.weight)
    m["log_odds_ratio"] = _mean(jax.lax.stop_gradient(ratio), stats.weight)
    return loss, m


def sft(stats: PairStats):
    """SFT: ``L = −ā_w``, the token-mean negative log-likelihood of the chosen response,
    weighted mean over pairs (a mean of per-sequence means, like docs/METHOD.md's
    lower-level objective g). Its value is the metric ``loss`` (``loss/sft`` inside
    :func:`combine`); ``sft/nll`` is the SFT stage's token-weighted NLL
    (``spo_jax.objectives.sft_objective``), a different normalisation."""
    _check_stats(stats, False, "sft")
    aw, _ = _token_means(stats)
    loss = _mean(-aw, stats.weight)
    return loss, {"loss": loss, "logps/chosen": _mean(jax.lax.stop_gradient(stats.chosen_logps), stats.weight)}


# ----------------------------------------------------------------------------- registry

LOSSES: dict[str, Callable] = {
    "dpo": dpo, "cdpo": cdpo, "robust": robust, "ipo": ipo, "hinge": hinge, "dpop": dpop, "rpo": rpo,
    "rdpo": rdpo, "cpo": cpo, "simpo": simpo, "alphadpo": alphadpo, "orpo": orpo, "sft": sft,
}
REFERENCE_FREE = frozenset({"cpo", "simpo", "orpo", "sft"})

_POSITIVE = frozenset({"beta"})
_NON_NEGATIVE = frozenset({"gamma", "lam", "alpha"})
_BOOL = frozenset({"normalize"})


def _known(name: str) -> None:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")


def uses_reference(name: str) -> bool:
    """Whether the named loss needs reference log-probs."""
    _known(name)
    return name not in REFERENCE_FREE


def _validate(name: str, key: str, value):
    if key in _BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"loss {name!r}: {key} must be True or False; got {value!r}")
        return bool(value)
    if (not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_))
            or not np.isfinite(value)):
        raise ValueError(f"loss {name!r}: {key} must be a finite number; got {value!r}")
    value = float(value)
    if key in _POSITIVE and value <= 0:
        raise ValueError(f"loss {name!r}: {key} must be > 0; got {key}={value}")
    if key in _NON_NEGATIVE and value < 0:
        raise ValueError(f"loss {name!r}: {key} must be >= 0; got {key}={value}")
    if key == "label_smoothing" and not 0.0 <= value < 0.5:
        raise ValueError(f"loss {name!r}: label_smoothing must be in [0, 0.5); got label_smoothing={value}")
    return value


def get_loss(name: str, **hparams) -> LossFn:
    """A validated, pure loss ``stats -> (scalar, metrics)`` from the registry.

    ``get_loss("dpo", beta=0.1)``; omitted hyperparameters take the defaults of
    the function's signature. Raises ValueError for an unknown name (listing the
    known ones), an unknown hyperparameter (naming it and the accepted ones), a
    non-finite value, ``beta <= 0``, ``label_smoothing`` outside [0, 0.5), or a
    negative ``gamma`` / ``lam`` / ``alpha``.
    """
    _known(name)
    fn = LOSSES[name]
    accepted = [p for p in inspect.signature(fn).parameters if p != "stats"]
    clean = {}
    for key, value in hparams.items():
        if key not in accepted:
            raise ValueError(f"loss {name!r} has no hyperparameter {key!r}; accepted: "
                             f"{', '.join(accepted) if accepted else 'none'}")
        clean[key] = _validate(name, key, value)
    out = functools.partial(fn, **clean)
    out.__name__ = name
    out.__doc__ = fn.__doc__
    return out


def combine(terms) -> LossFn:
    """A weighted sum of losses, itself a loss: ``combine([(1.0, dpo_fn), (0.5, sft_fn)])``.

    ``L = Σ_k c_k L_k`` (e.g. RPO-style DPO + λ·NLL). Metrics: every term's
    metrics merged (an earlier term wins a name clash, so the first term's
    ``rewards/*`` are kept), each term's value as ``loss/<name>`` and ``loss`` the
    weighted total. Weights must be finite and >= 0.
    """
    terms = list(terms)
    if not terms:
        raise ValueError("combine needs at least one (weight, loss) term")
    names = []
    for term in terms:
        if not (isinstance(term, (tuple, list)) and len(term) == 2):
            raise ValueError(f"combine: each term must be a (weight, loss_fn) pair; got {term!r}")
        w, fn = term
        if not callable(fn):
            raise ValueError(f"combine: {fn!r} is not a loss function")
        if not isinstance(w, numbers.Real) or isinstance(w, bool) or not np.isfinite(w) or w < 0:
            raise ValueError(f"combine: weights must be finite numbers >= 0; got {w!r}")
        base = getattr(fn, "__name__", "term")
        names.append(base if base not in names else f"{base}_{len(names)}")

    def combined(stats: PairStats):
        total, metrics = 0.0, {}
        for name, (w, fn) in zip(names, terms):
            value, m = fn(stats)
            total = total + float(w) * value
            for k, v in m.items():
                metrics.setdefault(k, v)
            metrics[f"loss/{name}"] = value
        metrics["loss"] = total
        return total, metrics

    combined.__name__ = "+".join(names)
    return combined


# ----------------------------------------------------------------------------- SPO constraint


def reference_gap(stats: PairStats) -> Array:
    """Per-pair SPO constraint value ``q_i = ā_ref(y_w,i) − ā_θ(y_w,i) = (r_w − s_w) / n_w``, [P].

    q_i > 0: the chosen response became less likely (per token) under the policy
    than under the reference/SFT model (docs/METHOD.md, value estimate ``reference``).
    """
    _check_stats(stats, True, "reference_gap")
    return (at_least_f32(stats.ref_chosen_logps) - at_least_f32(stats.chosen_logps)) / _safe_len(stats.chosen_len)


def constraint_metrics(q: Array, weight: Array | None = None) -> dict:
    """Metrics of the per-pair constraint values ``q`` [P]: ``spo/q_mean`` (weighted mean q)
    and ``spo/violation_frac`` (weighted share of pairs with q_i > 0: chosen token-mean
    log-prob below the reference's)."""
    q = jax.lax.stop_gradient(at_least_f32(q))
    return {"spo/q_mean": _mean(q, weight), "spo/violation_frac": _mean((q > 0).astype(q.dtype), weight)}


def spo_penalty(q: Array, epsilon: float = 0.0, per_sample: bool = True, squared: bool = False,
                weight: Array | None = None):
    """The SPO penalty on the constraint ``q ≤ ε`` (docs/METHOD.md, solver ``penalty``). Returns
    ``(penalty, metrics)``.

        per_sample:  c = Σ_i w_i φ(q_i − ε) / Σ_i w_i
        batch level: c = φ(Σ_i w_i q_i / Σ_i w_i − ε)
        φ = relu, or relu² when ``squared``

    Metrics: :func:`constraint_metrics` and ``spo/penalty``. ``epsilon`` may be any
    finite number (a negative slack demands a strict improvement).
    """
    if not isinstance(epsilon, jax.core.Tracer) and not np.isfinite(epsilon):
        raise ValueError(f"spo_penalty: epsilon must be finite; got {epsilon}")
    q = at_least_f32(q)
    if q.ndim != 1:
        raise ValueError(f"spo_penalty: q must be [P]; got shape {q.shape}")
    if weight is not None and jnp.shape(weight) != q.shape:
        raise ValueError(f"spo_penalty: weight must have q's shape {q.shape}; got {jnp.shape(weight)}")
    if _is_concrete(weight) and np.any(np.asarray(weight) < 0):
        raise ValueError("spo_penalty: weight must be >= 0 (0 = filler pair)")

    def act(x):
        return jnp.square(jax.nn.relu(x)) if squared else jax.nn.relu(x)

    value = _mean(act(q - epsilon), weight) if per_sample else act(_mean(q, weight) - epsilon)
    return value, {**constraint_metrics(q, weight), "spo/penalty": value}
