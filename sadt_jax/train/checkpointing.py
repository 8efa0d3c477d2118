"""Checkpoints with one orbax API: ``CheckpointManager`` + ``args.Composite``.

A checkpoint holds two items:

* ``state``: ``{"state": TrainState, "metrics": running train-metric sums}``
  (everything needed to continue bit-exactly, also from the middle of an epoch);
* ``meta``: JSON with the loop's position (epoch, step within the epoch),
  bookkeeping (best validation loss, wall-clock so far) and a fingerprint of
  ``state``: one 32-bit checksum per array.

Guarantees:

* :meth:`Checkpointer.save` refuses a tree holding NaN or Inf
  (:class:`NonFiniteStateError`), so no checkpoint on disk is non-finite; a save
  that fails (disk full, permissions) is one :class:`CheckpointError` line, and
  orbax only finalises a checkpoint once it is complete, so earlier ones are intact.
* :meth:`Checkpointer.restore` restores into an abstract target built with
  ``jax.eval_shape`` (arrays come back with the right shardings) and checks the
  result against the saved fingerprint. If the newest checkpoint cannot be read
  or does not match (a truncated, corrupt or half-written save), it warns and
  falls back to the previous one; the damaged checkpoints are moved to
  ``<directory>.unreadable/`` so that training can save those steps again.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "NonFiniteStateError",
    "abstract_like",
    "all_finite",
    "fingerprint",
]

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be restored, or a checkpoint cannot be written."""


_OS_REASONS = re.compile(
    r"No space left on device|Disk quota exceeded|Read-only file system|Permission denied"
)


def write_failure(step: int, directory: str, e: BaseException) -> CheckpointError:
    """A one-line :class:`CheckpointError` for a save that failed (disk full, permissions)."""
    reason = _OS_REASONS.search(str(e))
    return CheckpointError(
        f"cannot write checkpoint {step} in {directory} "
        f"({reason.group(0) if reason else _first_line(e)[:300]}); the checkpoints already "
        "on disk are intact: free space or fix permissions, then rerun the same command to resume"
    )


class NonFiniteStateError(ValueError):
    """A tree with NaN or Inf values was about to be saved; nothing was written."""


def _leaf_report(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(checksum, all finite) of one array.

    The checksum is ``sum_i bits_i * (2 i + 1) mod 2**32`` over the array's 32-bit
    words (16- and 8-bit types are widened): exact integer arithmetic, so it does
    not depend on the device count or reduction order, and any change of a single
    word changes it.
    """
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    bits = bits.reshape(-1)
    weights = 2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32), finite


@jax.jit
def _tree_report(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    reports = [_leaf_report(x) for x in leaves]
    if not reports:
        return jnp.zeros([0], jnp.uint32), jnp.array(True)
    sums = jnp.stack([r[0] for r in reports])
    return sums, jnp.all(jnp.stack([r[1] for r in reports]))


def _report(tree: Any) -> tuple[list[int], bool]:
    sums, finite = jax.device_get(_tree_report(jax.tree.leaves(tree)))
    return [int(s) for s in np.asarray(sums)], bool(finite)


def fingerprint(tree: Any) -> list[int]:
    """One 32-bit checksum per leaf of ``tree`` (in ``jax.tree.leaves`` order)."""
    return _report(tree)[0]


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of ``tree`` is free of NaN and Inf (one device pass)."""
    return _report(tree)[1]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for the training loop.

    Args:
      directory: absolute path of the checkpoint folder.
      max_to_keep: how many checkpoints to keep (>= 2 keeps a fallback).
      async_save: write in the background (``wait()`` before reading or exiting).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = False):
        self.directory = directory
        self._last_saved: int | None = None
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
        """Saves ``tree`` (a pytree of arrays) and ``meta`` (JSON) as checkpoint ``step``.

        Raises:
          NonFiniteStateError: ``tree`` holds NaN or Inf; nothing is written.
        """
        sums, finite = _report(tree)
        if not finite:
            raise NonFiniteStateError(f"refusing to save checkpoint {step}: it holds NaN or Inf")
        self._last_saved = step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree),
                    meta=ocp.args.JsonSave({**meta, "fingerprint": sums}),
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - orbax wraps OS errors in several types
            raise write_failure(step, self.directory, e) from e

    def _restore_step(self, step: int, abstract_tree: Any) -> tuple[Any, dict[str, Any]]:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_tree), meta=ocp.args.JsonRestore()
            ),
        )
        tree, meta = restored.state, dict(restored.meta)
        expected = meta.pop("fingerprint", None)
        sums, finite = _report(tree)
        if expected is not None and sums != list(expected):
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
            bad = [p for p, a, b in zip(paths, sums, expected, strict=False) if a != b]
            raise CheckpointError(
                f"contents do not match the fingerprint saved with them "
                f"({len(bad) or 'all'} of {len(paths)} arrays differ, e.g. {bad[:1] or paths[:1]})"
            )
        if not finite:
            raise CheckpointError("it holds NaN or Inf")
        return tree, meta

    def restore(self, abstract_tree: Any) -> tuple[Any, dict[str, Any], int] | None:
        """Restores the newest good checkpoint into ``abstract_tree``'s structure.

        A checkpoint that cannot be read, or whose arrays do not match the
        fingerprint saved with it, is skipped with a warning; if an older one
        restores, the skipped ones are moved to ``<directory>.unreadable/``.

        Returns:
          ``(tree, meta, step)``, or ``None`` when no checkpoint exists.

        Raises:
          CheckpointError: checkpoints exist but none can be restored (nothing is moved).
        """
        steps = self.all_steps()
        skipped: list[int] = []
        errors: list[str] = []
        for step in reversed(steps):
            try:
                tree, meta = self._restore_step(step, abstract_tree)
            except Exception as e:  # noqa: BLE001 - any failure means "try the previous one"
                errors.append(f"checkpoint {step}: {_first_line(e)}")
                log.warning(
                    "checkpoint %d in %s is damaged or unreadable (%s); trying an earlier one",
                    step,
                    self.directory,
                    _first_line(e),
                )
                skipped.append(step)
                continue
            if skipped:
                self._set_aside(skipped, restored_step=step)
            return tree, meta, step
        if steps:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory} ({'; '.join(errors)}); "
                "if the config changed, use another --workdir; otherwise move the folder away "
                "to start afresh"
            )
        return None

    def _set_aside(self, steps: list[int], *, restored_step: int) -> None:
        aside = f"{self.directory}.unreadable"
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, str(step))
                n = 1
                while os.path.exists(target):
                    target = os.path.join(aside, f"{step}.{n}")
                    n += 1
                os.rename(os.path.join(self.directory, str(step)), target)
                log.warning(
                    "moved damaged checkpoint %d to %s; resuming from checkpoint %d",
                    step,
                    target,
                    restored_step,
                )
        ocp.multihost.sync_global_processes("sadt_jax:set_aside_unreadable_checkpoints")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until background saves are on disk.

        Raises:
          CheckpointError: a background save failed.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise write_failure(self._last_saved, self.directory, e) from e

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct``s (with shardings) mirroring a concrete pytree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
