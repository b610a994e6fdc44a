"""The training objectives of a language model, from a batch to a solver.

One path, each step defined once (docs/DESIGN.md, Contracts 3-5)::

    batch (Contract 1)
      -> make_logps_fn(graphdef)            (sums_S, counts_S): summed response log-probs, token counts
      -> losses.pair_stats                  PairStats [P] (chosen / rejected interleaved)
      -> upper loss  f                      make_upper_loss: a registered BT loss (+ sft_weight · losses.sft),
                                            + sft_data_weight · g(batch["sft"]) (make_terms)
      -> SPO constraint  c                  make_terms: q from the reference gap or an inner SFT loop,
                                            c = losses.spo_penalty(q)
      -> lower objective  g                 make_lower: mean of per-sequence token-mean NLLs
      -> solver(params, batch) -> (direction, metrics)     make_solver (Contract 5)

Stages: "sft" is ``bilevel.gradient_solver(sft_objective)``; preference without SPO is
``bilevel.gradient_solver`` of the upper objective of the same ``make_terms`` (no
constraint); with SPO, the ``bilevel`` solver named by ``spo.solver``.

Two NLL normalisations, each with one meaning:

- ``sft_objective`` (metric ``sft/nll``): the SFT stage's loss, the token-weighted
  mean −Σ_s sums_s / Σ_s counts_s over the batch. Every response token weighs the
  same, as in the usual language-model loss, so long examples are not down-weighted.
- ``sequence_nll`` / ``make_lower`` (and ``losses.sft``): per-sequence token means
  ℓ_n = −sums_n / counts_n, averaged over sequences. SPO's constraint is per sample
  (q_i compares sequence i's token-mean log-prob with its reference value), so its
  lower objective g weighs every sequence the same, matching q's normalisation.
  The SFT-data term of the upper objective (``loss.sft_data_weight``, metric
  ``sft_data/nll``) is this g on ``batch["sft"]``, so that "DPO + λ·SFT-data NLL" and
  SPO's inner_sft penalty on the same SFT batch measure the same quantity.

The SFT batch ``batch["sft"]`` (Contract 1, one sequence per example; the trainer fills
it from ``data.sft_path`` when ``reads_sft_data``): when present it is the lower level
(g, the inner_sft value's q, the unrolled / implicit inner loop) and the data of the
``sft_data_weight`` term; without it the lower level is the chosen responses.

Everything returned is pure and jit-able.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from spo_jax import bilevel, logprobs, losses, models
from spo_jax.numerics import at_least_f32, f32_metrics
from spo_jax.validation import ConfigError, check_bool, check_int, fail, is_num

Params = Any
Batch = Mapping[str, Any]
LogpsFn = Callable[[Params, Batch], tuple[jax.Array, jax.Array]]

__all__ = [
    "validate_config", "make_logps_fn", "batch_pair_stats", "make_upper_loss", "spo_config", "needs_reference",
    "reads_sft_data",
    "sft_objective", "sequence_nll", "make_lower", "make_terms", "make_spo_solver", "make_solver",
    "make_eval_metrics",
]


# --------------------------------------------------------------------------- #
# Statistics
# --------------------------------------------------------------------------- #


def make_logps_fn(graphdef, *, seq_chunk: int = 128, vocab_chunk: int = 0) -> LogpsFn:
    """``logps_fn(params, batch) -> (sums_S, counts_S)``, at least fp32 [S] (Contract 3).

    hidden = models.apply(graphdef, params, input_ids, positions, segment_ids);
    token log-probs of ``targets`` from the unembedding at the scored positions only
    (``logprobs.scored_sequence_logps`` through ``batch["score_index"]``; chunked, never
    [B, T, V]), summed per sequence over ``loss_mask``. A batch without ``score_index``
    gets one with N = T (every position; correct, no saving).

    ``batch``: Contract 1, a dict of arrays (``help(spo_jax.data.batching)``): ``input_ids``, ``targets``,
    ``loss_mask``, ``positions``, ``segment_ids``, ``seq_ids`` [R, T]; ``example_index``, ``seq_valid`` [S];
    ``score_index`` [R, N]; preference data interleaves sequence 2i (pair i's chosen) and 2i+1 (its
    rejected); optional ``ref_logps`` [S] (reference sums) and ``sft`` (a nested SFT batch).
    """

    def logps_fn(params, batch):
        hidden = models.apply(graphdef, params, batch["input_ids"], batch["positions"], batch["segment_ids"])
        w, b = models.unembedding(graphdef, params)
        num_seqs = batch["seq_valid"].shape[0]
        sums, counts = logprobs.scored_sequence_logps(
            hidden, w, batch["targets"], batch["loss_mask"], batch["seq_ids"], num_seqs,
            score_index_BN=batch.get("score_index"), b_V=b, seq_chunk=int(seq_chunk), vocab_chunk=int(vocab_chunk))
        sums = at_least_f32(sums)
        return sums, counts.astype(sums.dtype)

    return logps_fn


def batch_pair_stats(sums_S: jax.Array, counts_S: jax.Array, batch: Batch) -> losses.PairStats:
    """``losses.pair_stats`` of a preference batch: the reference sums from
    ``batch["ref_logps"]`` and the pair weights from ``batch["seq_valid"]`` (when present)."""
    return losses.pair_stats(sums_S, counts_S, batch.get("ref_logps"), batch.get("seq_valid"))


# --------------------------------------------------------------------------- #
# Settings read from the trainer config (loss.*, spo.*, stage)
# --------------------------------------------------------------------------- #


def make_upper_loss(name: str, hparams: Mapping[str, Any] | None = None, sft_weight: float = 0.0):
    """The preference loss ``loss(PairStats) -> (value, metrics)``: ``losses.get_loss(name,
    **hparams)``, plus ``sft_weight`` times ``losses.sft`` when ``sft_weight > 0``."""
    loss = losses.get_loss(name, **dict(hparams or {}))
    if sft_weight > 0:
        loss = losses.combine([(1.0, loss), (float(sft_weight), losses.get_loss("sft"))])
    return loss


def spo_config(config) -> bilevel.SPOConfig | None:
    """``bilevel.SPOConfig`` of the trainer config's ``spo.*`` block, or None when
    ``spo.enabled`` is False or the stage is "sft"."""
    if config.stage == "sft" or not config.spo.enabled:
        return None
    return bilevel.SPOConfig.from_dict({k: v for k, v in config.spo.items() if k != "enabled"})


def validate_config(config) -> None:
    """The ``loss.*``, ``spo.*`` and ``logprobs.*`` fields: the loss registry checks the
    name and hyperparameters, ``bilevel.SPOConfig`` the SPO fields."""
    c = config
    if c.stage != "sft":
        try:
            losses.get_loss(c.loss.name, **dict(c.loss.hparams))
        except (ValueError, TypeError, KeyError) as e:
            fail("loss", {"name": c.loss.name, "hparams": dict(c.loss.hparams)}, str(e))
    for field in ("loss.sft_weight", "loss.sft_data_weight"):
        value = c.loss[field.split(".")[1]]
        if not is_num(value) or value < 0:
            fail(field, value, "must be a finite number >= 0")
    check_bool(c, "spo.enabled")
    if c.spo.enabled and c.stage == "sft":
        fail("spo.enabled", True, "SPO wraps a preference loss; use stage='preference'")
    try:
        spo_config(c)
    except ValueError as e:
        raise ConfigError(f"config.spo: {e}") from None
    _validate_sft_data(c)
    check_int(c, ("logprobs.seq_chunk", "logprobs.vocab_chunk"), 0, " (0 = no chunking)")


def reads_sft_data(config) -> bool:
    """Whether the objective reads an SFT batch ``batch["sft"]`` when SFT data are given: the
    SFT-data term (``loss.sft_data_weight > 0``), or SPO with a lower level (value
    "inner_sft" with a used constraint, or the unrolled / implicit solvers' inner loop)."""
    if config.stage != "preference":
        return False
    if config.loss.sft_data_weight > 0:
        return True
    spo = spo_config(config)
    return spo is not None and (spo.solver in ("unrolled", "implicit")
                                or (spo.value == "inner_sft" and spo.constraint_used))


def _validate_sft_data(c) -> None:
    """``data.sft_path`` against the objective: SFT data need a reader, the SFT-data term needs data."""
    has = bool(c.data.sft_path)
    if has and c.stage != "preference":
        fail("data.sft_path", c.data.sft_path, f"the SFT batch is for preference training; stage {c.stage!r} "
             "does not read it (stage 'sft' trains on data.train_path): clear data.sft_path")
    if has and not reads_sft_data(c):
        fail("data.sft_path", c.data.sft_path, "nothing reads the SFT data: set loss.sft_data_weight > 0 (preference "
             "loss + λ·NLL of the SFT data) or spo.enabled=True with spo.value='inner_sft' (SPO's lower level on "
             "the SFT data), or clear data.sft_path")
    if c.stage == "preference" and c.loss.sft_data_weight > 0 and not has:
        fail("loss.sft_data_weight", c.loss.sft_data_weight, "the SFT-data NLL term needs SFT data: set "
             "data.sft_path (an SFT dataset: prompt/completion, messages or question/answer rows), or "
             "train(config, sft_data=...); loss.sft_weight is the NLL of the chosen responses instead")


def needs_reference(config) -> bool:
    """Whether the run's objective reads reference log-probs: a preference loss
    with a reference (``losses.uses_reference``), or SPO whose constraint is measured
    against the reference (``SPOConfig.needs_reference``). SFT never does."""
    if config.stage == "sft":
        return False
    spo = spo_config(config)
    return losses.uses_reference(config.loss.name) or (spo is not None and spo.needs_reference)


# --------------------------------------------------------------------------- #
# Objectives
# --------------------------------------------------------------------------- #


def sft_objective(logps_fn: LogpsFn) -> bilevel.Objective:
    """SFT: the token-weighted NLL of the batch, −Σ_s sums_s / Σ_s counts_s (filler
    sequences count 0; see the module docstring for why tokens, not sequences).
    Metrics: ``loss`` = ``sft/nll``, ``sft/tokens`` (response tokens counted)."""

    def objective(params, batch):
        sums, counts = logps_fn(params, batch)
        valid = batch["seq_valid"].astype(jnp.float32)
        tokens = jnp.sum(counts * valid)
        nll = -jnp.sum(sums * valid) / jnp.maximum(tokens, 1.0)
        return nll, {"loss": nll, "sft/nll": nll, "sft/tokens": tokens}

    return objective


def sequence_nll(logps_fn: LogpsFn, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Token-mean NLL ℓ_n = −sums_n / counts_n of the lower-level sequences, and their weights.

    The lower level is ``batch["sft"]`` (an SFT batch, every sequence an example)
    when that key is present, else the chosen responses (sequences 0, 2, 4, ...)
    of the preference batch. Weights are ``seq_valid`` (ones if absent) times
    [counts > 0]. Shapes: [N] and [N].
    """
    if "sft" in batch:
        sub = batch["sft"]
        sums, counts = logps_fn(params, sub)
        valid = sub.get("seq_valid")
    else:
        sums, counts = logps_fn(params, batch)
        sums, counts = sums[0::2], counts[0::2]
        valid = batch.get("seq_valid")
        valid = None if valid is None else jnp.asarray(valid)[0::2]
    sums = at_least_f32(sums)
    counts = counts.astype(sums.dtype)
    weight = (counts > 0).astype(sums.dtype)
    if valid is not None:
        weight = weight * jnp.asarray(valid, sums.dtype)
    return -sums / jnp.maximum(counts, 1.0), weight


def make_lower(logps_fn: LogpsFn) -> bilevel.Lower:
    """g(θ, batch) = weighted mean of ``sequence_nll`` (SPO's lower objective, scalar)."""

    def lower(params, batch):
        nll, weight = sequence_nll(logps_fn, params, batch)
        return losses.weighted_mean(nll, weight)

    return lower


def _upper(logps_fn: LogpsFn, upper_loss, params, batch):
    """One forward: (PairStats, f, the loss's metrics)."""
    sums, counts = logps_fn(params, batch)
    stats = batch_pair_stats(sums, counts, batch)
    f, metrics = upper_loss(stats)
    return stats, f, dict(metrics)


def make_terms(logps_fn: LogpsFn, upper_loss, cfg: bilevel.SPOConfig | None,
               sft_data_weight: float = 0.0) -> bilevel.Terms:
    """terms(θ, batch) -> ((f, c), metrics) for a BT loss and the SPO constraint.

    f = upper_loss(PairStats(θ)), plus ``sft_data_weight`` · g(θ, batch["sft"]) (the
    weighted mean of ``sequence_nll`` on the SFT batch, which must then be present;
    metrics ``sft_data/nll`` = g, ``loss/preference`` = the preference loss alone,
    ``loss`` = f); ``cfg`` None: no constraint (c = 0, the plain preference objective). Otherwise q per ``cfg.value`` (see ``bilevel.SPOConfig``)
    and c, metrics = losses.spo_penalty(q, epsilon, per_sample, squared, weight).
    One model forward for f and c (``inner_sft`` adds K inner steps and one forward
    at θ_K, both without gradient, plus one forward on ``batch["sft"]`` when
    present; the SFT-data term shares that forward). Metrics: the loss's, spo_penalty's, and for inner_sft spo/g_star
    (weighted mean ℓ at θ_K), spo/inner_loss_first, spo/inner_loss_last.

    With value="reference" the batch must carry ``ref_logps``, except when the
    constraint is unused (``not cfg.constraint_used``): c is then 0.
    """
    lower = make_lower(logps_fn)
    optimizer = None if cfg is None else bilevel.make_inner_optimizer(cfg.inner_optimizer, cfg.inner_lr)
    zero = jnp.zeros((), jnp.float32)
    sft_data_weight = float(sft_data_weight)
    inner_sft = cfg is not None and cfg.value == "inner_sft"

    def terms(params, batch):
        stats, f, metrics = _upper(logps_fn, upper_loss, params, batch)
        sft_nll = None  # (ℓ_n, weight) of the SFT batch at θ, when something reads it
        if "sft" in batch and (sft_data_weight > 0 or inner_sft):
            sft_nll = sequence_nll(logps_fn, params, batch)
            metrics["sft_data/nll"] = losses.weighted_mean(*sft_nll)
        if sft_data_weight > 0:
            if sft_nll is None:
                raise ValueError(f"loss.sft_data_weight={sft_data_weight} needs an SFT batch batch['sft'] "
                                 "(the trainer builds it from data.sft_path)")
            metrics["loss/preference"] = f
            f = f + sft_data_weight * metrics["sft_data/nll"]
            metrics["loss"] = f
        if cfg is None:
            return (f, zero), metrics
        if cfg.value == "reference":
            if stats.ref_chosen_logps is None:
                if cfg.needs_reference:
                    raise ValueError(
                        f"SPO value='reference' (solver={cfg.solver!r}, gamma={cfg.gamma}) needs "
                        "batch['ref_logps'] [S] (reference log-prob sums per sequence); add a reference "
                        "model's log-probs to the batch, or use value='inner_sft'")
                return (f, zero), metrics
            q = losses.reference_gap(stats)
            weight = stats.weight
        else:
            theta_k, values = bilevel.inner_loop(lower, jax.lax.stop_gradient(params), batch,
                                                 steps=cfg.inner_steps, optimizer=optimizer, remat=False)
            theta_k = jax.lax.stop_gradient(theta_k)
            nll_k, weight = sequence_nll(logps_fn, theta_k, batch)
            if sft_nll is not None:  # the SFT batch at θ, computed above
                nll, weight = sft_nll
            else:  # the chosen responses: reuse this forward pass
                nll = -stats.chosen_logps / stats.chosen_len
            q = nll - nll_k
            metrics.update({"spo/g_star": losses.weighted_mean(nll_k, weight),
                            "spo/inner_loss_first": values[0], "spo/inner_loss_last": values[-1]})
        penalty, penalty_metrics = losses.spo_penalty(
            q, epsilon=cfg.epsilon, per_sample=cfg.per_sample, squared=cfg.squared, weight=weight)
        metrics.update(penalty_metrics)
        return (f, penalty), metrics

    return terms


def _upper_objective(terms: bilevel.Terms) -> bilevel.Objective:
    def objective(params, batch):
        (f, _), metrics = terms(params, batch)
        return f, metrics

    return objective


# --------------------------------------------------------------------------- #
# Solvers
# --------------------------------------------------------------------------- #


def make_spo_solver(logps_fn: LogpsFn, upper_loss, cfg: bilevel.SPOConfig | Mapping[str, Any],
                    sft_data_weight: float = 0.0) -> bilevel.Solver:
    """``solver(params, batch) -> (direction, metrics)`` of SPO (Contract 5).

    ``logps_fn(params, batch) -> (sums_S, counts_S)``; ``upper_loss(PairStats) ->
    (scalar, metrics)`` (e.g. ``losses.get_loss("dpo", beta=0.1)``); ``cfg`` an
    SPOConfig or a mapping of its fields; ``sft_data_weight``: the SFT-data term of
    the upper objective (``make_terms``). With ``batch["sft"]`` the lower level of
    every solver is the SFT data (inner_sft's q, the unrolled / implicit inner loop). The direction goes to optax as the
    gradient; metrics are fp32 scalars (see the bilevel solvers for the names).
    """
    if not isinstance(cfg, bilevel.SPOConfig):
        cfg = bilevel.SPOConfig.from_dict(cfg)
    terms = make_terms(logps_fn, upper_loss, cfg, sft_data_weight)
    if cfg.solver == "penalty":
        return bilevel.penalty_solver(terms, cfg.gamma)
    if cfg.solver == "barrier":
        return bilevel.barrier_solver(terms, cfg.barrier_alpha, cfg.barrier_delta)
    lower = make_lower(logps_fn)
    optimizer = bilevel.make_inner_optimizer(cfg.inner_optimizer, cfg.inner_lr)
    objective = bilevel.penalized(terms, cfg.gamma)
    if cfg.solver == "unrolled":
        return bilevel.unrolled_solver(objective, lower, steps=cfg.inner_steps, optimizer=optimizer,
                                       remat=cfg.remat)
    return bilevel.implicit_solver(objective, lower, mu=cfg.mu, steps=cfg.inner_steps, optimizer=optimizer,
                                   cg_iters=cfg.cg_iters, cg_tol=cfg.cg_tol)


def make_solver(config, logps_fn: LogpsFn) -> bilevel.Solver:
    """``solver(params, batch) -> (direction, metrics)`` for the config's stage: the
    gradient of the SFT NLL, of the preference loss, or the SPO solver of
    ``spo.solver``. ``metrics["loss"]`` is the objective's value (spo/objective
    under SPO). ``loss.sft_data_weight`` > 0 adds λ·NLL of ``batch["sft"]`` to the
    upper objective (``make_terms``).

    ``batch``: Contract 1, a dict of arrays (``help(spo_jax.data.batching)``): ``input_ids``, ``targets``,
    ``loss_mask``, ``positions``, ``segment_ids``, ``seq_ids`` [R, T]; ``example_index``, ``seq_valid`` [S];
    ``score_index`` [R, N]; preference data interleaves sequence 2i (pair i's chosen) and 2i+1 (its
    rejected); optional ``ref_logps`` [S] (reference sums) and ``sft`` (a nested SFT batch).
    """
    if config.stage == "sft":
        return bilevel.gradient_solver(sft_objective(logps_fn))
    upper = make_upper_loss(config.loss.name, config.loss.hparams, config.loss.sft_weight)
    spo = spo_config(config)
    weight = float(config.loss.sft_data_weight)
    if spo is None:
        return bilevel.gradient_solver(_upper_objective(make_terms(logps_fn, upper, None, weight)))
    solver = make_spo_solver(logps_fn, upper, spo, weight)

    def with_loss(params, batch):
        grads, metrics = solver(params, batch)
        metrics["loss"] = metrics["spo/objective"]
        return grads, metrics

    return with_loss


def make_eval_metrics(config, logps_fn: LogpsFn, *, sft_data: bool) -> Callable[[Params, Batch], dict]:
    """``metrics(params, batch)`` on held-out data, no gradient. SFT data: ``sft_objective``'s
    metrics and ``num_seqs``. Preference data: the upper loss's metrics, the constraint
    metrics (``losses.constraint_metrics`` of the reference gap) when the batch has
    reference log-probs, and ``num_pairs`` (held-out batches carry no SFT batch: the
    ``loss.sft_data_weight`` term is a training metric, ``sft_data/nll``, only).

    ``batch``: Contract 1, a dict of arrays (``help(spo_jax.data.batching)``): ``input_ids``, ``targets``,
    ``loss_mask``, ``positions``, ``segment_ids``, ``seq_ids`` [R, T]; ``example_index``, ``seq_valid`` [S];
    ``score_index`` [R, N]; preference data interleaves sequence 2i (pair i's chosen) and 2i+1 (its
    rejected); optional ``ref_logps`` [S] (reference sums) and ``sft`` (a nested SFT batch).
    """
    if sft_data:
        objective = sft_objective(logps_fn)

        def sft_metrics(params, batch):
            _, metrics = objective(params, batch)
            return f32_metrics({**metrics, "num_seqs": jnp.sum(batch["seq_valid"])})

        return sft_metrics
    upper = make_upper_loss(config.loss.name, config.loss.hparams, config.loss.sft_weight)

    def preference_metrics(params, batch):
        stats, _, metrics = _upper(logps_fn, upper, params, batch)
        if stats.ref_chosen_logps is not None:
            metrics.update(losses.constraint_metrics(losses.reference_gap(stats), stats.weight))
        metrics["num_pairs"] = jnp.sum(batch["seq_valid"][0::2])
        return f32_metrics(metrics)

    return preference_metrics
