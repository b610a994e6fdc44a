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
the last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


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
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        """The newest *complete* checkpoint's step (None if there is none)."""
        self.manager.reload()
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, config: dict | None, *,
             force: bool = True) -> bool:
        """Save (asynchronously if configured); returns whether a save started."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_jsonable(data_state or {})),
            config=ocp.args.JsonSave(_jsonable(config or {})),
        )
        return bool(self.manager.save(int(step), args=args, force=force))

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

    def wait(self) -> None:
        """Block until a pending asynchronous save has been committed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _jsonable(x: Any) -> Any:
    """Round-trip through JSON (ConfigDict, tuples, numpy scalars -> plain JSON types)."""
    return json.loads(json.dumps(x, default=_default))


def _default(o):
    import numpy as np
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
