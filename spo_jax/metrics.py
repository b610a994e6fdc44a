"""Metric writers (JSONL + TensorBoard + tqdm), throughput and MFU.

Only process 0 writes files and shows the progress bar; other processes get a
writer that does nothing, so the loop has no ``if process_index == 0`` branches.

MFU (model FLOPs utilisation), the PaLM definition without the attention term::

    MFU = 6 · N · tokens / step_time / (peak FLOP/s per device · devices)

N = number of parameters (embedding included, an upper bound for tied
embeddings), tokens = non-padding tokens in the step (forward + backward =
6 FLOPs per parameter per token). A frozen online reference forward adds
2·N·tokens, counted when given. ``peak`` comes from the config or from
:func:`measure_peak_flops` (a timed square matmul: an honest *achievable* peak).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

__all__ = ["MetricWriter", "trim_jsonl", "COUNT_KEYS", "pooled_mean", "Progress", "mfu", "measure_peak_flops",
           "PARAM_GROWTH_LIMIT", "DEGENERATE_ACTIONS", "TrainingHealth", "DegenerateTrainingError",
           "NonFiniteLossError", "degenerate_error"]

logger = logging.getLogger("spo_jax.metrics")


def _scalar(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Writes scalar dicts to ``<run_dir>/metrics.jsonl``, TensorBoard ``<run_dir>/tb`` and, with
    ``wandb_project``, Weights & Biases (run id from the run directory, so a resume continues the same
    W&B run; ``<split>/<name>`` keys at the optimizer step; ``wandb_config``: the run's config; its
    local files under ``<run_dir>/wandb``; ``WANDB_MODE=offline`` works without a network).

    Each JSONL line is ``{"step": int, "split": "train"|"eval", <name>: float, ...}``.

    :meth:`start` opens the files for a run that starts at ``step`` (0, or the
    step of the checkpoint it resumed from). Records of a step after ``step`` belong
    to a trajectory that was interrupted after its last checkpoint and is now
    recomputed, so they are removed: the JSONL file is rewritten without them (a
    temporary file renamed over it, so a kill leaves either the old or the new
    file), and TensorBoard gets ``purge_step = step + 1`` (TensorBoard then hides
    every older event from that step on). After any number of resumes each step
    has exactly one record of each split. :meth:`flush` (called before each
    checkpoint) makes every record up to the checkpoint durable, so a resume also
    leaves no gap.
    """

    def __init__(self, run_dir: str, *, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True,
                 wandb_project: str = "", wandb_config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self._want_jsonl, self._want_tb = bool(jsonl), bool(tensorboard)
        self._wandb_project, self._wandb_config = wandb_project, dict(wandb_config or {})
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._started = False

    @property
    def jsonl_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    def start(self, step: int | None) -> None:
        """Open the writers for a run starting after optimizer step ``step``.

        ``step=None`` appends without trimming (a stage that adds records to
        another run's history, e.g. evaluating its checkpoint).
        """
        self._started = True
        if not self.enabled:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        if self._want_jsonl:
            if step is not None:
                dropped = trim_jsonl(self.jsonl_path, int(step))
                if dropped:
                    logger.info("metrics.jsonl: removed %d record(s) after step %d (recomputed by this run)",
                                dropped, step)
            self._jsonl = open(self.jsonl_path, "a", buffering=1)
        if self._want_tb:
            from tensorboardX import SummaryWriter  # optional writer: imported only when asked for
            purge = int(step) + 1 if step is not None and os.path.isdir(os.path.join(self.run_dir, "tb")) else None
            self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"), purge_step=purge)
        if self._wandb_project:
            import wandb  # optional writer (pip install "spo_jax[wandb]"): imported only when asked for
            run_id = hashlib.sha1(os.path.abspath(self.run_dir).encode()).hexdigest()[:16]  # a resume continues it
            self._wandb = wandb.init(project=self._wandb_project, dir=self.run_dir, id=run_id, resume="allow",
                                     name=os.path.basename(os.path.abspath(self.run_dir)), config=self._wandb_config)

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        if not self._started:
            raise RuntimeError("MetricWriter.write before start(step): call start() with the run's first step")
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        if self._jsonl is not None:
            record = {"step": int(step), "split": split}
            record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, int(step))
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=int(step))

    def flush(self) -> None:
        """Push every record written so far to the files (JSONL fsynced)."""
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def trim_jsonl(path: str, step: int) -> int:
    """Remove the records of steps after ``step`` from a metrics JSONL file (and a
    torn last line, which a kill in the middle of a write can leave); returns how
    many lines were removed. Atomic: a temporary file renamed over ``path``."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:  # damaged bytes: a line that does not parse
        for line in f:
            try:
                record = json.loads(line)
                keep_it = line.endswith("\n") and int(record["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep_it = False
            if keep_it:
                keep.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


#: Per-batch counts that ``pooled_mean`` sums (and weights the other metrics by).
COUNT_KEYS = ("num_pairs", "num_seqs")


def pooled_mean(per_batch: list[Mapping[str, Any]]) -> dict[str, float]:
    """Metrics over several evaluation batches: each batch's metric weighted by its
    ``num_pairs`` (preference) or ``num_seqs`` (SFT) count, the counts summed."""
    totals: dict[str, float] = {}
    weight_total = 0.0
    for m in per_batch:
        w = float(m.get("num_pairs", m.get("num_seqs", 1.0)))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + (float(v) if k in COUNT_KEYS else w * float(v))
        weight_total += w
    return {k: (v if k in COUNT_KEYS else v / max(weight_total, 1e-12)) for k, v in totals.items()}


class Progress:
    """tqdm bar over optimizer steps with loss and tokens/s (tqdm shows the ETA)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self._bar = None
        if enabled:
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int, metrics: Mapping[str, Any]) -> None:
        if self._bar is None:
            return
        post = {}
        if "loss" in metrics:
            post["loss"] = f"{_scalar(metrics['loss']):.4f}"
        if "tokens_per_sec" in metrics:
            post["tok/s"] = f"{_scalar(metrics['tokens_per_sec']):.0f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def mfu(num_params: int, tokens: float, seconds: float, peak_flops_per_device: float, num_devices: int,
        extra_forward_params: int = 0) -> float:
    """Model FLOPs utilisation: (6·N + 2·N_ref)·tokens / seconds / (peak · devices)."""
    if seconds <= 0 or peak_flops_per_device <= 0:
        return float("nan")
    flops = (6.0 * num_params + 2.0 * extra_forward_params) * tokens
    return flops / seconds / (peak_flops_per_device * num_devices)


def measure_peak_flops(dtype: str = "float32", size: int | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of one device on a square matmul (2·n³ FLOPs), best of ``repeats``.

    ``size`` defaults to 4096 on accelerators and 512 on CPU (keeps start-up fast).
    """
    dev = jax.local_devices()[0]
    n = size or (512 if dev.platform == "cpu" else 4096)
    a = jax.device_put(jnp.ones((n, n), dtype), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


#: A global parameter norm this many times the initial one counts as exploding.
PARAM_GROWTH_LIMIT = 1e3

DEGENERATE_ACTIONS = ("stop", "warn")


class TrainingHealth:
    """Detects degenerate training from each step's host-side metrics.

    ``check(step, metrics)`` returns ``None`` or ``(kind, description)``:

    * ``non_finite``: loss, gradient norm or parameter norm is NaN/Inf;
    * ``exploding``: the parameter norm exceeds :data:`PARAM_GROWTH_LIMIT` times
      the initial model's (a learning rate far too high);
    * ``zero_grad``: the gradient norm is exactly 0 for ``patience`` consecutive
      steps (saturated outputs: nothing can learn any more);
    * ``frozen_loss``: the loss is bitwise the same for ``patience`` consecutive
      steps (and the one before them).

    ``first_bad_step`` is the first step of the run of bad steps that triggered it
    (for zero_grad / frozen_loss the problem began before it was detected).
    """

    def __init__(self, initial_param_norm: float, patience: int):
        self.initial_param_norm = float(initial_param_norm)
        self.patience = int(patience)
        self._zero_since: int | None = None
        self._frozen_since: int | None = None
        self._last_loss: float | None = None
        self.first_bad_step: int | None = None

    def check(self, step: int, m: Mapping[str, float]) -> tuple[str, str] | None:
        loss, grad, pnorm = m.get("loss", 0.0), m.get("grad_norm", 1.0), m.get("param_norm", 1.0)
        if not (math.isfinite(loss) and math.isfinite(grad) and math.isfinite(pnorm)):
            self.first_bad_step = step
            return "non_finite", f"non-finite values at step {step}: loss={loss}, grad_norm={grad}, param_norm={pnorm}"
        limit = PARAM_GROWTH_LIMIT * max(self.initial_param_norm, 1e-12)
        if pnorm > limit:
            self.first_bad_step = step
            return "exploding", (f"parameters exploding at step {step}: parameter norm {pnorm:.3g} is "
                                 f"{pnorm / max(self.initial_param_norm, 1e-12):.3g}x the initial "
                                 f"{self.initial_param_norm:.3g} (limit {PARAM_GROWTH_LIMIT:g}x)")
        self._zero_since = (self._zero_since or step) if grad == 0.0 else None
        if self._zero_since is not None and step - self._zero_since + 1 >= self.patience:
            self.first_bad_step = self._zero_since
            return "zero_grad", (f"gradient norm exactly 0 at steps {self._zero_since}-{step}: the model no longer "
                                 "learns (saturated outputs, e.g. after a learning rate far too high)")
        frozen = self._last_loss is not None and loss == self._last_loss
        self._frozen_since = (self._frozen_since or step - 1) if frozen else None
        self._last_loss = loss
        if self._frozen_since is not None and step - self._frozen_since >= self.patience:
            self.first_bad_step = self._frozen_since
            return "frozen_loss", (f"loss frozen at {loss!r} at steps {self._frozen_since}-{step}: the model no longer "
                                   "changes")
        return None


class DegenerateTrainingError(FloatingPointError):
    """Training degenerated (:class:`TrainingHealth`): non-finite or exploding
    parameters, a gradient norm of exactly 0 or a frozen loss for several steps.
    The message names the step, what happened, and the last good checkpoint."""


class NonFiniteLossError(DegenerateTrainingError):
    """Training produced a NaN/Inf loss, gradient norm or parameter norm."""


def degenerate_error(problem: tuple[str, str], good_steps: list[int], directory: str) -> DegenerateTrainingError:
    """The error for a :meth:`TrainingHealth.check` problem: what happened, the last good
    checkpoint among ``good_steps`` (those before the first bad step) and how to resume."""
    kind, what = problem
    where = (f"The last good checkpoint is step {good_steps[-1]} ({os.path.join(directory, str(good_steps[-1]))})"
             if good_steps else "No checkpoint was written before it (a rerun starts from step 0)")
    fix = ("Resume from it with a lower optim.learning_rate (and optim.grad_clip > 0): rerun with those and "
           "checkpoint.allow_optim_change=True" if good_steps else "Rerun with a lower optim.learning_rate (and "
           "optim.grad_clip > 0) in a new run_dir")
    cls = NonFiniteLossError if kind == "non_finite" else DegenerateTrainingError
    more = "" if kind == "non_finite" else "; train.on_degenerate='warn' continues instead"
    return cls(f"{what}; this state was not saved. {where}. {fix}, or check the data{more}.")
