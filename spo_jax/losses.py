"""Preference losses on per-sequence statistics: the Bradley–Terry family, SFT, the SPO constraint.

Every loss is a small pure function ``fn(stats, *, hparams) -> (scalar, metrics)``
of a :class:`PairStats` (per-pair summed log-probs and token counts); build a
validated one with :func:`get_loss`. Notation (per pair i, mean over the batch):

    s_w, s_l   policy log-probs of chosen / rejected response (sums over tokens)
    r_w, r_l   reference log-probs;   n_w, n_l   response token counts
    ā = s / n  token-mean log-prob;   Δ = (s_w − r_w) − (s_l − r_l)

All values and metrics are fp32; every batch mean is weighted by ``stats.weight``
(0 for filler pairs of a packed batch). Metric names follow TRL:
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected``. Reference losses report rewards β(s − r);
reference-free ones report TRL's convention, β times the policy log-prob (token-mean
where the loss uses token means).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
LossFn = Callable[["PairStats"], tuple[Array, dict]]


class PairStats(NamedTuple):
    """Per-pair statistics, all [P] float32 (see docs/DESIGN.md, Contract 4)."""

    chosen_logps: Array
    rejected_logps: Array
    chosen_len: Array
    rejected_len: Array
    ref_chosen_logps: Array | None = None
    ref_rejected_logps: Array | None = None
    weight: Array | None = None


def stats_from_sequences(sums_S, counts_S, ref_sums_S=None, seq_valid_S=None) -> PairStats:
    """Split interleaved per-sequence sums (2i chosen, 2i+1 rejected) into :class:`PairStats`."""
    ref = (None, None) if ref_sums_S is None else (ref_sums_S[0::2], ref_sums_S[1::2])
    weight = None if seq_valid_S is None else seq_valid_S[0::2].astype(jnp.float32)
    return PairStats(sums_S[0::2], sums_S[1::2], counts_S[0::2], counts_S[1::2], *ref, weight)


# ----------------------------------------------------------------------------- helpers


def _f32(x):
    """At least fp32 (bf16 inputs are promoted; fp64 under jax x64 is kept for exact tests)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mean(x, weight):
    x = _f32(x)
    if weight is None:
        return jnp.mean(x)
    w = _f32(weight)
    return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1e-8)


def _check_stats(stats: PairStats, needs_reference: bool, name: str) -> None:
    shape = jnp.shape(stats.chosen_logps)
    if len(shape) != 1:
        raise ValueError(f"{name}: stats.chosen_logps must be [P]; got shape {shape}")
    for field in PairStats._fields:
        v = getattr(stats, field)
        if v is not None and jnp.shape(v) != shape:
            raise ValueError(f"{name}: stats.{field} has shape {jnp.shape(v)}, expected {shape} "
                             f"(the shape of stats.chosen_logps)")
    for field in ("chosen_len", "rejected_len"):
        v = getattr(stats, field)
        if not isinstance(v, jax.core.Tracer):
            bad = np.asarray(v) <= 0
            if stats.weight is not None and not isinstance(stats.weight, jax.core.Tracer):
                bad &= np.asarray(stats.weight) > 0
            if np.any(bad):
                raise ValueError(f"{name}: stats.{field} must be > 0 (response token counts); got "
                                 f"{np.asarray(v)[bad][:5].tolist()} — drop empty responses in the data")
    if needs_reference and (stats.ref_chosen_logps is None or stats.ref_rejected_logps is None):
        raise ValueError(f"{name} needs reference log-probs: set stats.ref_chosen_logps and "
                         f"stats.ref_rejected_logps (reference.mode 'online' or 'cached')")


def _pair_metrics(loss, chosen_rewards, rejected_rewards, stats) -> dict:
    w = stats.weight
    return {
        "loss": loss,
        "rewards/chosen": _mean(chosen_rewards, w),
        "rewards/rejected": _mean(rejected_rewards, w),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards, w),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).astype(jnp.float32), w),
        "logps/chosen": _mean(stats.chosen_logps, w),
        "logps/rejected": _mean(stats.rejected_logps, w),
    }


def _delta(stats):
    return (stats.chosen_logps - stats.ref_chosen_logps) - (stats.rejected_logps - stats.ref_rejected_logps)


def _ref_rewards(stats, beta):
    sg = jax.lax.stop_gradient
    return (beta * sg(stats.chosen_logps - stats.ref_chosen_logps),
            beta * sg(stats.rejected_logps - stats.ref_rejected_logps))


def _token_mean(logps, n):
    return logps / n


def _sft_nll(stats):
    return -_token_mean(stats.chosen_logps, stats.chosen_len)


# ----------------------------------------------------------------------------- losses


def dpo(stats: PairStats, *, beta: float = 0.1):
    """DPO (Rafailov et al. 2023, eq. 7): ``L = −log σ(β Δ)``."""
    _check_stats(stats, True, "dpo")
    per = -jax.nn.log_sigmoid(beta * _delta(stats))
    loss = _mean(per, stats.weight)
    return loss, _pair_metrics(loss, *_ref_rewards(stats, beta), stats)


def cdpo(stats: PairStats, *, beta: float = 0.1, label_smoothing: float = 0.1):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences", eq. 3).

    ``L = −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)`` with ε the label-flip rate.
    """
    _check_stats(stats, True, "cdpo")
    u = beta * _delta(stats)
    per = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(u) - label_smoothing * jax.nn.log_sigmoid(-u)
    loss = _mean(per, stats.weight)
    return loss, _pair_metrics(loss, *_ref_rewards(stats, beta), stats)


def robust(stats: PairStats, *, beta: float = 0.1, label_smoothing: float = 0.1):
    """Provably robust DPO (Chowdhury et al. 2024, eq. 8), unbiased under label-flip rate ε.

    ``L = [−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)``.
    """
    _check_stats(stats, True, "robust")
    u = beta * _delta(stats)
    per = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(u)
           + label_smoothing * jax.nn.log_sigmoid(-u)) / (1.0 - 2.0 * label_smoothing)
    loss = _mean(per, stats.weight)
    return loss, _pair_metrics(loss, *_ref_rewards(stats, beta), stats)


def ipo(stats: PairStats, *, beta: float = 0.1):
    """IPO (Azar et al. 2023, eq. 17): ``L = (Δ − 1/(2β))²`` (Δ from summed log-probs)."""
    _check_stats(stats, True, "ipo")
    per = (_delta(stats) - 1.0 / (2.0 * beta)) ** 2
    loss = _mean(per, stats.weight)
    return loss, _pair_metrics(loss, *_ref_rewards(stats, beta), stats)


def hinge(stats: PairStats, *, beta: float = 0.1):
    """SLiC hinge (Zhao et al. 2023), DPO-parametrised: ``L = relu(1 − βΔ)``."""
    _check_stats(stats, True, "hinge")
    per = jax.nn.relu(1.0 - beta * _delta(stats))
    loss = _mean(per, stats.weight)
    return loss, _pair_metrics(loss, *_ref_rewards(stats, beta), stats)


def dpop(stats: PairStats, *, beta: float = 0.1, lam: float = 50.0):
    """DPO-Positive (Pal et al. 2024, "Smaug", eq. 3).

    ``L = −log σ(β (Δ − λ · relu(r_w − s_w)))``: a penalty once the chosen response
    becomes less likely than under the reference.
    """
    _check_stats(stats, True, "dpop")
    pen = jax.nn.relu(stats.ref_chosen_logps - stats.chosen_logps)
    per = -jax.nn.log_sigmoid(beta * (_delta(stats) - lam * pen))
    loss = _mean(per, stats.weight)
    return loss, _pair_metrics(loss, *_ref_rewards(stats, beta), stats)


def rdpo(stats: PairStats, *, beta: float = 0.1, alpha: float = 0.01):
    """R-DPO (Park et al. 2024, length-regularised DPO, eq. 9).

    ``L = −log σ(βΔ − α (n_w − n_l))``.
    """
    _check_stats(stats, True, "rdpo")
    per = -jax.nn.log_sigmoid(beta * _delta(stats) - alpha * (stats.chosen_len - stats.rejected_len))
    loss = _mean(per, stats.weight)
    return loss, _pair_metrics(loss, *_ref_rewards(stats, beta), stats)


def cpo(stats: PairStats, *, beta: float = 0.1, lam: float = 1.0):
    """CPO (Xu et al. 2024, eq. 6), reference-free.

    ``L = −log σ(β (s_w − s_l)) + λ · NLL(y_w)``, NLL the token-mean negative
    log-likelihood of the chosen response (as TRL's ``cpo_alpha`` term).
    """
    _check_stats(stats, False, "cpo")
    per = -jax.nn.log_sigmoid(beta * (stats.chosen_logps - stats.rejected_logps)) + lam * _sft_nll(stats)
    loss = _mean(per, stats.weight)
    sg = jax.lax.stop_gradient
    m = _pair_metrics(loss, beta * sg(stats.chosen_logps), beta * sg(stats.rejected_logps), stats)
    m["nll_loss"] = _mean(_sft_nll(stats), stats.weight)
    return loss, m


def simpo(stats: PairStats, *, beta: float = 2.0, gamma: float = 1.0):
    """SimPO (Meng et al. 2024, eq. 6), reference-free, length-normalised.

    ``L = −log σ(β (ā_w − ā_l) − γ)`` with ā the token-mean log-prob and γ the target margin.
    """
    _check_stats(stats, False, "simpo")
    aw = _token_mean(stats.chosen_logps, stats.chosen_len)
    al = _token_mean(stats.rejected_logps, stats.rejected_len)
    per = -jax.nn.log_sigmoid(beta * (aw - al) - gamma)
    loss = _mean(per, stats.weight)
    sg = jax.lax.stop_gradient
    return loss, _pair_metrics(loss, beta * sg(aw), beta * sg(al), stats)


def alphadpo(stats: PairStats, *, beta: float = 2.0, gamma: float = 1.0, alpha: float = 0.1):
    """α-DPO (Wu et al. 2024, "α-DPO: Adaptive Reward Margin"), SimPO with an adaptive margin.

    ``L = −log σ(β (ā_w − ā_l) − γ − α β · sg[M])``, with
    ``M = (ā_w − ā_l) − (ā^ref_w − ā^ref_l)`` the policy/reference log-ratio
    difference of token-mean log-probs under stop-gradient (the margin adapts
    per pair; α = 0 recovers SimPO). The released code may also standardise M
    over the batch; we keep it per pair so the loss of a pair does not depend on
    its batch-mates.
    """
    _check_stats(stats, True, "alphadpo")
    aw = _token_mean(stats.chosen_logps, stats.chosen_len)
    al = _token_mean(stats.rejected_logps, stats.rejected_len)
    rw = _token_mean(stats.ref_chosen_logps, stats.chosen_len)
    rl = _token_mean(stats.ref_rejected_logps, stats.rejected_len)
    m = jax.lax.stop_gradient((aw - al) - (rw - rl))
    per = -jax.nn.log_sigmoid(beta * (aw - al) - gamma - alpha * beta * m)
    loss = _mean(per, stats.weight)
    sg = jax.lax.stop_gradient
    return loss, _pair_metrics(loss, beta * sg(aw), beta * sg(al), stats)


def _log_odds(a):
    """log(p / (1 − p)) for p = exp(a), a = token-mean log-prob < 0 (stable near 0)."""
    a = jnp.minimum(a, -1e-6)
    return a - jnp.log(-jnp.expm1(a))


def orpo(stats: PairStats, *, lam: float = 0.1):
    """ORPO (Hong et al. 2024, eqs. 6–7), reference-free.

    ``L = NLL(y_w) − λ log σ(log odds(y_w) − log odds(y_l))``, odds(y) = p/(1 − p)
    with p = exp(ā) the token-mean likelihood; rewards reported as λ·ā (TRL).
    """
    _check_stats(stats, False, "orpo")
    aw = _token_mean(stats.chosen_logps, stats.chosen_len)
    al = _token_mean(stats.rejected_logps, stats.rejected_len)
    ratio = jax.nn.log_sigmoid(_log_odds(aw) - _log_odds(al))
    per = -aw - lam * ratio
    loss = _mean(per, stats.weight)
    sg = jax.lax.stop_gradient
    m = _pair_metrics(loss, lam * sg(aw), lam * sg(al), stats)
    m["nll_loss"] = _mean(-aw, stats.weight)
    m["log_odds_ratio"] = _mean(ratio, stats.weight)
    return loss, m


def sft(stats: PairStats):
    """SFT: token-mean negative log-likelihood of the chosen response, mean over pairs."""
    _check_stats(stats, False, "sft")
    loss = _mean(_sft_nll(stats), stats.weight)
    return loss, {"loss": loss, "sft/nll": loss, "logps/chosen": _mean(stats.chosen_logps, stats.weight)}


# ----------------------------------------------------------------------------- registry

LOSSES: dict[str, Callable] = {
    "dpo": dpo, "cdpo": cdpo, "robust": robust, "ipo": ipo, "hinge": hinge, "dpop": dpop,
    "rdpo": rdpo, "cpo": cpo, "simpo": simpo, "alphadpo": alphadpo, "orpo": orpo, "sft": sft,
}
REFERENCE_FREE = frozenset({"cpo", "simpo", "orpo", "sft"})

_POSITIVE = ("beta",)
_NON_NEGATIVE = ("gamma", "lam", "alpha")


def uses_reference(name: str) -> bool:
    """Whether the named loss needs reference log-probs."""
    _known(name)
    return name not in REFERENCE_FREE


def _known(name: str) -> None:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")


def get_loss(name: str, **hparams) -> LossFn:
    """A validated loss ``stats -> (scalar, metrics)`` from the registry.

    Raises ValueError for an unknown name (listing the known ones), an unknown
    hyperparameter (listing the accepted ones), ``beta <= 0``, ``label_smoothing``
    outside [0, 0.5), or a negative ``gamma`` / ``lam`` / ``alpha``.
    """
    _known(name)
    fn = LOSSES[name]
    accepted = [p for p in inspect.signature(fn).parameters if p != "stats"]
    for k, v in hparams.items():
        if k not in accepted:
            raise ValueError(f"loss {name!r} has no hyperparameter {k!r}; accepted: {accepted or 'none'}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v):
            raise ValueError(f"loss {name!r}: {k} must be a finite number; got {v!r}")
        if k in _POSITIVE and v <= 0:
            raise ValueError(f"loss {name!r}: {k} must be > 0; got {v}")
        if k in _NON_NEGATIVE and v < 0:
            raise ValueError(f"loss {name!r}: {k} must be >= 0; got {v}")
        if k == "label_smoothing" and not 0.0 <= v < 0.5:
            raise ValueError(f"loss {name!r}: label_smoothing must be in [0, 0.5); got {v}")
    out = functools.partial(fn, **{k: float(v) for k, v in hparams.items()})
    out.__name__ = name
    return out


def combine(terms) -> LossFn:
    """A weighted sum of losses, itself a loss: ``combine([(1.0, dpo), (0.5, sft)])``.

    Metrics: the first term's metrics unprefixed, every term's value as
    ``loss/<name>``, and ``loss`` the weighted total (e.g. RPO-style DPO + λ·NLL).
    """
    terms = list(terms)
    if not terms:
        raise ValueError("combine needs at least one (weight, loss) term")
    for w, fn in terms:
        if not callable(fn):
            raise ValueError(f"combine: {fn!r} is not a loss function")
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"combine: weights must be finite and >= 0; got {w}")

    def combined(stats: PairStats):
        total, metrics = 0.0, {}
        for i, (w, fn) in enumerate(terms):
            value, m = fn(stats)
            total = total + w * value
            if i == 0:
                metrics.update(m)
            metrics[f"loss/{getattr(fn, '__name__', i)}"] = value
        metrics["loss"] = total
        return total, metrics

    return combined


# ----------------------------------------------------------------------------- SPO constraint


def reference_gap(stats: PairStats) -> Array:
    """Per-pair SPO constraint value ``q_i = ā_ref(y_w) − ā_θ(y_w)`` (token means), [P].

    q_i > 0: the chosen response became less likely under the policy than under
    the reference/SFT model (METHOD.md, value estimate ``reference``).
    """
    _check_stats(stats, True, "reference_gap")
    return (stats.ref_chosen_logps - stats.chosen_logps) / stats.chosen_len


def spo_penalty(q: Array, epsilon: float = 0.0, per_sample: bool = True, squared: bool = False,
                weight: Array | None = None):
    """The SPO penalty on the constraint ``q ≤ ε`` (METHOD.md, solver ``penalty``).

    ε may be negative (demand that the chosen response improve).
    per_sample: ``mean_i relu(q_i − ε)`` (``relu²`` if squared); batch level:
    ``relu(mean_i q_i − ε)``. Metrics ``spo/constraint`` (mean q),
    ``spo/violation_frac`` (share of pairs with q_i > 0: chosen token-mean
    log-prob below the reference's) and ``spo/penalty``.
    """
    if not np.isfinite(epsilon):
        raise ValueError(f"spo_penalty: epsilon must be finite; got {epsilon}")
    q = _f32(q)
    act = (lambda x: jnp.square(jax.nn.relu(x))) if squared else jax.nn.relu
    value = _mean(act(q - epsilon), weight) if per_sample else act(_mean(q, weight) - epsilon)
    metrics = {
        "spo/constraint": _mean(q, weight),
        "spo/violation_frac": _mean((q > 0).astype(jnp.float32), weight),
        "spo/penalty": value,
    }
    return value, metrics
