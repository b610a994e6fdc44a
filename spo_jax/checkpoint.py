"""Orbax checkpoints of the train state, the data-iterator position and the config.

One checkpoint ``<run_dir>/checkpoints/<step>/`` holds three items:

* ``state``: the array pytree (parameters, optimizer state, step, PRNG key),
  saved with ``StandardSave`` (sharded arrays are written by every process,
  restored with the target shardings);
* ``data``: the iterator state (``BatchIterator.get_state()``, JSON);
* ``config``: the run's config (JSON), for the record and for a resume check.

Orbax writes into a temporary directory and renames it when the save is complete
(``CheckpointManager`` finalisation), so a process killed mid-write leaves no
directory that ``latest_step`` would return: resume always reads a complete
checkpoint. Saves are asynchronous when asked (the array copy to host happens
before ``save`` returns; the file writes continue in the background), and only
the last ``keep`` checkpoints are kept (an older one is deleted only after a newer
one is complete).

Failures (each one line, the full Orbax traceback only with ``SPO_JAX_DEBUG=1``):

* a checkpoint that cannot be restored (missing or truncated files, non-finite
  values): :meth:`Checkpointer.restore_latest` names its step and the cause, moves
  it aside to ``<directory>.corrupt/<step>-<time>`` (never deletes it) and falls
  back to the previous complete checkpoint; ``strict=True`` raises
  :class:`CheckpointRestoreError` instead; when no checkpoint can be restored it
  raises too (a run never restarts from scratch silently);
* a save that fails (e.g. the disk is full): :class:`CheckpointSaveError` names the
  step, the cause and the last complete checkpoint, which is left intact; the
  half-written temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import gc
import json
import logging
import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from spo_jax.validation import ConfigError

__all__ = ["ITEMS", "REQUIRED_FILES", "CheckpointError", "CheckpointRestoreError", "CheckpointSaveError",
           "InvalidCheckpoint", "debug_enabled", "describe_error", "all_processes_agree", "Checkpointer",
           "abstract_like", "RESUME_SECTIONS", "check_resume_config"]

ITEMS = ("state", "data", "config")

#: Files every complete checkpoint has (checked before a restore, to name what is missing).
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "data/metadata",
                  "config/metadata")

logger = logging.getLogger("spo_jax.checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or restored (the message is one line)."""


class CheckpointRestoreError(CheckpointError):
    """No usable checkpoint (strict mode, or every checkpoint is bad)."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed; the last complete checkpoint is intact."""


class InvalidCheckpoint(ValueError):
    """A checkpoint failed validation (missing files, non-finite values)."""


def debug_enabled() -> bool:
    """``SPO_JAX_DEBUG=1``: show full tracebacks and library error records."""
    return os.environ.get("SPO_JAX_DEBUG", "") not in ("", "0", "false", "False")


def describe_error(e: BaseException) -> str:
    """One line for an exception chain: the innermost cause's type and first line
    (Orbax wraps TensorStore's error, which names the file, in less useful ones);
    a full disk is said plainly."""
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for x in chain:
        text = str(x)
        if getattr(x, "errno", None) == errno.ENOSPC or "No space left on device" in text \
                or "os_error_code='28'" in text:
            return "no space left on device (ENOSPC)"
    root = chain[-1]
    first = (str(root).strip().splitlines() or [""])[0]
    if len(first) > 300:
        first = first[:297] + "..."
    if isinstance(root, InvalidCheckpoint):
        return first
    return f"{type(root).__name__}: {first}" if first else type(root).__name__


class _DropOrbaxErrors(logging.Filter):
    """Drops Orbax's (absl-logged) error records and asyncio's orphaned-task reports
    while a failure that this module reports itself in one line is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio":
            return False
        return "orbax" not in (record.pathname or "")


@contextlib.contextmanager
def _quiet_failures():
    if debug_enabled():
        yield
        return
    filt = _DropOrbaxErrors()
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio", "")]
    for lg in loggers:
        lg.addFilter(filt)
    try:
        yield
    finally:
        gc.collect()  # orphaned asyncio tasks of a failed read report themselves when collected: here
        for lg in loggers:
            lg.removeFilter(filt)


def _is_closed_loop_noise(exc_type, exc: BaseException | None) -> bool:
    """TensorStore completing a read/write of a failed Orbax operation after Orbax's
    event loop closed: ``RuntimeError('Event loop is closed')``, printed through
    ``sys.excepthook`` once per pending array (dozens per failure)."""
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"


def _install_noise_filter() -> None:
    """Drop that noise from ``sys.excepthook`` and ``sys.unraisablehook`` (TensorStore
    reports it through either, depending on the thread)."""
    previous = sys.excepthook
    if not getattr(previous, "_spo_jax_filter", False):
        def excepthook(exc_type, exc, tb):
            if _is_closed_loop_noise(exc_type, exc) and not debug_enabled():
                return
            previous(exc_type, exc, tb)

        excepthook._spo_jax_filter = True
        sys.excepthook = excepthook
    previous_unraisable = sys.unraisablehook
    if not getattr(previous_unraisable, "_spo_jax_filter", False):
        def unraisablehook(info):
            if _is_closed_loop_noise(info.exc_type, info.exc_value) and not debug_enabled():
                return
            previous_unraisable(info)

        unraisablehook._spo_jax_filter = True
        sys.unraisablehook = unraisablehook


def all_processes_agree(ok: bool) -> bool:
    """True only if ``ok`` on every process (the fallback decision must be the same everywhere)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray([1 if ok else 0], np.int32))
    return bool(np.all(np.asarray(flags)))


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for the trainer.

    Args:
      directory: where the step directories go (created).
      keep: number of most recent checkpoints to keep.
      async_save: write in the background.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep), enable_async_checkpointing=bool(async_save),
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        _install_noise_filter()
        self.async_save = bool(async_save)
        self._pending_step: int | None = None  # an asynchronous save not yet known to be complete
        self._failed = False

    @property
    def corrupt_directory(self) -> str:
        return self.directory + ".corrupt"

    def latest_step(self) -> int | None:
        """The newest *complete* checkpoint's step (None if there is none)."""
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: Any, data_state: dict | None, config: dict | None, *,
             force: bool = True) -> bool:
        """Save (asynchronously if configured); returns whether a save started.
        Raises :class:`CheckpointSaveError` when this save, or the previous
        asynchronous one, failed."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_jsonable(data_state or {})),
            config=ocp.args.JsonSave(_jsonable(config or {})),
        )
        if self._pending_step is not None:  # the previous asynchronous save must have succeeded
            self.wait()
        with self._reporting_save_failure(int(step)):
            started = bool(self.manager.save(int(step), args=args, force=force))
        self._pending_step = int(step) if self.async_save else None
        if started and not self.async_save:
            self._written(int(step))
        return started

    def _written(self, step: int) -> None:
        if jax.process_index() == 0:
            logger.info("checkpoint step %d written: %s", step, os.path.join(self.directory, str(step)))

    @contextlib.contextmanager
    def _reporting_save_failure(self, step: int | None):
        """Turn a failed write of ``step`` into one :class:`CheckpointSaveError`."""
        with _quiet_failures():
            try:
                yield
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any write failure (OSError, TensorStore's ValueError)
                self._failed = True
                self._pending_step = None
                raise CheckpointSaveError(self._save_failure_message(step, e)) from e

    def _save_failure_message(self, step: int | None, e: BaseException) -> str:
        removed = self._remove_partial(step)
        latest = self.latest_step()
        kept = (f"the last complete checkpoint, step {latest} ({os.path.join(self.directory, str(latest))}), is "
                "intact; rerun the same command to resume from it" if latest is not None else
                "there is no complete checkpoint yet; rerunning starts from step 0")
        fix = "free disk space (or lower checkpoint.keep / checkpoint.every)" \
            if "ENOSPC" in describe_error(e) else "fix the cause"
        return (f"checkpoint step {step} could not be written to {self.directory}: {describe_error(e)}"
                f"{' (its partial files were removed)' if removed else ''}; {kept} after you {fix}.")

    def _remove_partial(self, step: int | None) -> bool:
        """Remove the temporary directory a failed save of ``step`` left (never a complete step)."""
        if step is None or jax.process_index() != 0 or not os.path.isdir(self.directory):
            return False
        removed = False
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                removed = True
        return removed

    def wait(self) -> None:
        """Block until a pending asynchronous save has been committed (raises
        :class:`CheckpointSaveError` if it failed)."""
        with self._reporting_save_failure(self._pending_step):
            self.manager.wait_until_finished()
        if self._pending_step is not None:  # an asynchronous save is announced once complete on disk
            self._written(self._pending_step)
        self._pending_step = None

    def close(self) -> None:
        """Wait for a pending save and close. After a failure was already raised,
        Orbax's repeat of it is not raised again."""
        try:
            if not self._failed:
                self.wait()
        finally:
            with _quiet_failures(), contextlib.suppress(Exception):
                self.manager.close()

    # --------------------------------------------------------------- restore

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore ``(state, data_state, config)`` of ``step``; arrays get the shardings
        and dtypes of ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with
        ``sharding`` set, e.g. from ``jax.eval_shape`` + the train-state shardings)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(int(step), args=args)
        return out["state"], dict(out["data"] or {}), dict(out["config"] or {})

    def check_step(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore ``step`` and validate it: its files exist, every array reads back,
        every floating-point value is finite. Raises (:class:`InvalidCheckpoint` or Orbax's
        error) naming the problem."""
        where = os.path.join(self.directory, str(step))
        missing = [f for f in REQUIRED_FILES if not os.path.exists(os.path.join(where, f))]
        if missing:
            raise InvalidCheckpoint(f"missing file(s) {missing}")
        state, data_state, config = self.restore(step, abstract_state)
        bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(state)
               if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.isfinite(x).all())]
        if bad:
            raise InvalidCheckpoint(f"non-finite values in {bad[:3]}{' ...' if len(bad) > 3 else ''}")
        return state, data_state, config

    def restore_latest(self, abstract_state: Any, *, strict: bool = False, check_config=None,
                       step: int | None = None) -> tuple[int, Any, dict, dict] | None:
        """``(step, state, data_state, config)`` of the newest checkpoint that restores
        and validates (:meth:`check_step`); None when the directory has no checkpoint.

        A checkpoint that fails is reported in one line (step and cause), moved to
        ``<directory>.corrupt/`` and the previous one is tried; ``strict`` raises
        :class:`CheckpointRestoreError` at the first bad one instead. If none is
        usable, :class:`CheckpointRestoreError` (never a silent restart from step 0).

        ``check_config(saved_config)`` runs on the newest checkpoint's config before
        any array is read; what it raises (a config mismatch: the user's error, not a
        damaged checkpoint) propagates and nothing is moved.

        ``step``: restore that step only (strict: no fall-back); ``ConfigError`` if there is none.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise ConfigError(f"config.checkpoint.restore_step={step}: {self.directory} has no checkpoint at that "
                                  f"step; its steps are {sorted(steps)} (0 = the latest)")
            steps, strict = [step], True
        if not steps:
            return None
        for i, step in enumerate(steps):
            cause = saved_config = None
            with _quiet_failures():
                try:
                    saved_config = self.manager.restore(step, args=ocp.args.Composite(
                        config=ocp.args.JsonRestore()))["config"]
                except Exception as e:  # noqa: BLE001 - an unreadable config marks the step bad
                    cause = describe_error(e)
            if cause is None and check_config is not None:
                check_config(dict(saved_config or {}))
            with _quiet_failures():
                try:
                    if cause is None:
                        out = self.check_step(step, abstract_state)
                except Exception as e:  # noqa: BLE001 - any failure to read or validate marks the step bad
                    cause = describe_error(e)
            if all_processes_agree(cause is None):
                return (step, *out)
            cause = cause or "another process could not restore it"
            where = os.path.join(self.directory, str(step))
            if strict:
                raise CheckpointRestoreError(
                    f"checkpoint step {step} ({where}) cannot be restored: {cause}. checkpoint.strict_restore=True "
                    "refuses to fall back; set it to False to resume from the previous complete checkpoint (the bad "
                    "one is moved aside), or move the bad one away yourself.")
            dest = self._move_aside(step)
            nxt = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier checkpoint"
            logger.warning("checkpoint step %d cannot be restored: %s; moved to %s; %s", step, cause, dest, nxt)
        raise CheckpointRestoreError(
            f"no checkpoint in {self.directory} can be restored (all moved to {self.corrupt_directory}); to start "
            "over, use a new run_dir or set checkpoint.resume=False")

    def _move_aside(self, step: int) -> str:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest = os.path.join(self.corrupt_directory, f"{step}-{stamp}")
        multi = jax.process_count() > 1
        if multi:  # every process has finished reading before the directory moves
            multihost_utils.sync_global_devices(f"spo_jax checkpoint {step} move")
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_directory, exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), dest)
        if multi:
            multihost_utils.sync_global_devices(f"spo_jax checkpoint {step} moved")
        self.manager.reload()
        return dest


def _jsonable(x: Any) -> Any:
    """Round-trip through JSON (ConfigDict, tuples, numpy scalars -> plain JSON types)."""
    return json.loads(json.dumps(x, default=_default))


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` pytree of ``tree`` carrying ``shardings`` (restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


#: Config sections that must match a checkpoint to resume from it (they shape the state or the data order).
RESUME_SECTIONS = ("model", "data", "loss", "spo", "optim", "stage")
#: ... and to evaluate it (stage "eval" restores the parameters with their optimizer state).
EVAL_SECTIONS = ("model", "optim")
#: Fields of those sections that only the held-out evaluation reads: free to change on a resume.
EVAL_ONLY_FIELDS = ("data.eval_path", "data.eval_split", "data.eval_batch_size")


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def check_resume_config(saved: dict, now: dict, directory: str, *, allow_optim_change: bool = False,
                        sections: tuple[str, ...] = RESUME_SECTIONS, defaults: dict | None = None) -> None:
    """Raise ``ConfigError`` when the checkpoint's config (``saved``) differs from the run's
    (``now``) in one of ``sections``, naming each changed field with its old and new value
    and what a resume accepts; ``optim`` may change with ``allow_optim_change`` (logged: e.g.
    resuming a diverged run with a lower learning rate). A field the checkpoint predates (absent
    from ``saved``) that has its value in ``defaults`` (the default config) counts as unchanged."""
    changed = {}
    for section in sections:
        if saved.get(section) is None:
            continue
        old, new = _flat(saved.get(section), f"{section}."), _flat(now.get(section), f"{section}.")
        default = _flat((defaults or {}).get(section), f"{section}.")
        old.update({k: v for k, v in new.items() if k not in old and k in default and default[k] == v})
        changed.update({k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
                        if old.get(k, "<absent>") != new.get(k, "<absent>") and k not in EVAL_ONLY_FIELDS})
    optim = {k: v for k, v in changed.items() if k.startswith("optim.")}
    if allow_optim_change and optim:
        logger.warning("resuming with changed optimizer settings (checkpoint.allow_optim_change=True): %s",
                       ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in optim.items()))
        changed = {k: v for k, v in changed.items() if k not in optim}
    if not changed:
        return
    fields = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8])
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    hint = (" optim.* may change with checkpoint.allow_optim_change=True (e.g. a lower learning rate after a "
            "divergence).") if optim and not allow_optim_change else ""
    raise ConfigError(
        f"the checkpoints in {directory} were written with other settings: {fields}{more}. Resuming keeps "
        f"{', '.join(s if s == 'stage' else s + '.*' for s in sections)} as saved; train.num_steps, data.eval_*, "
        f"eval.*, checkpoint.*, metrics.*, mesh.* may change.{hint} Undo these changes to resume, or start a "
        "new run with them in a new run_dir (--config.run_dir=...)"
        + ("; to evaluate this run, add --config.stage=eval" if "stage" in changed else ""))
