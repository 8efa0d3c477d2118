"""Checkpoints with one orbax API: ``CheckpointManager`` + ``args.Composite``.

A checkpoint holds two items:

* ``state``: ``{"state": TrainState, "metrics": running train-metric sums}``
  (everything needed to continue bit-exactly, also from the middle of an epoch);
* ``meta``: JSON with the loop's position (epoch, step within the epoch) and
  bookkeeping (best validation loss, wall-clock so far).

Restores go into an abstract target built with ``jax.eval_shape`` so arrays come
back with the right shardings. If the latest checkpoint cannot be read (a
truncated or corrupt write), :meth:`Checkpointer.restore` warns and falls back
to the previous one.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the training loop.

    Args:
      directory: absolute path of the checkpoint folder.
      max_to_keep: how many checkpoints to keep (>= 2 keeps a fallback).
      async_save: write in the background (``wait()`` before reading or exiting).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = False):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            directory, options=options, item_names=("state", "meta")
        )

    def all_steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, tree: Any, meta: dict[str, Any]) -> None:
        """Saves ``tree`` (a pytree of arrays) and ``meta`` (JSON) as checkpoint ``step``."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, abstract_tree: Any) -> tuple[Any, dict[str, Any], int] | None:
        """Restores the newest readable checkpoint into ``abstract_tree``'s structure.

        Returns:
          ``(tree, meta, step)``, or ``None`` when no checkpoint exists.

        Raises:
          RuntimeError: checkpoints exist but none can be read.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_tree), meta=ocp.args.JsonRestore()
                    ),
                )
                return restored.state, dict(restored.meta), step
            except Exception as e:  # noqa: BLE001 - any read failure means "try the previous one"
                msg = (
                    f"checkpoint {step} in {self.directory} is unreadable ({type(e).__name__}: {e})"
                )
                log.warning("%s; falling back to an earlier one", msg.splitlines()[0])
                errors.append(msg.splitlines()[0])
        if steps:
            raise RuntimeError(
                f"no readable checkpoint in {self.directory}: {'; '.join(errors)}. "
                "Delete the folder to start afresh."
            )
        return None

    def wait(self) -> None:
        """Blocks until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct``s (with shardings) mirroring a concrete pytree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
