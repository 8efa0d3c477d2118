"""Which weights a run reports: the selection rule, the kept ``best`` weights, their test.

One rule covers both protocols. Let ``L_e`` be the selection loss after epoch ``e`` (1-based):
the mean validation CE (``selection.loss="full"``) or the CE of the last validation batch only
(``"last_batch"``, the authors' release). There is one slot, holding the *initial* weights
(epoch 0) at the start. After every epoch ``e >= selection.first_epoch`` the slot takes all the
weights (parameters and BatchNorm statistics) if ``L_e < min(L_1, ..., L_{e-1})``: strictly,
with the epochs before ``first_epoch`` counted in the minimum. If the rule never fires, the
initial weights are the selected ones.

* ``first_epoch=1`` is the project's rule: the lowest validation loss of any epoch (epoch 1
  always fires unless its loss is not finite).
* ``first_epoch=4`` with ``"last_batch"`` is the release's rule.

The slot is kept in memory and, with ``ckpt.enabled`` and ``ckpt.keep_best``, on disk in
``workdir/best/<epoch>/`` (orbax, written atomically, the older one removed after the new one
is complete) with a JSON record of its epoch and loss. At the end of the run the slot's weights
are evaluated on the test split (:meth:`Selection.test`) and reported in the summary.

Resuming: the rule is a function of the losses in ``metrics.jsonl``, so the selected epoch is
recomputed from the rows kept on resume, and the weights are read back from ``workdir/best/``
(the initial weights are rebuilt from the init seed).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sadt_jax.train import checkpointing

__all__ = ["Selection", "select_epoch", "selection_loss"]

log = logging.getLogger(__name__)


def selection_loss(config: Any, row: dict[str, Any]) -> float:
    """The loss the rule compares for one ``metrics.jsonl`` row.

    ``val_selection_loss`` (the last validation batch's CE) under ``selection.loss="last_batch"``,
    else ``val_loss``. Never the test loss: a run without a validation split selects nothing.
    """
    group = config.get("selection")
    kind = "full" if group is None else group.get("loss", "full")
    if kind == "last_batch" and "val_selection_loss" in row:
        return float(row["val_selection_loss"])
    return float(row["val_loss"])


def select_epoch(losses: Sequence[float], first_epoch: int = 1) -> tuple[int, float | None]:
    """The selection rule on the losses of epochs ``1..len(losses)``.

    Args:
      losses: ``L_1, L_2, ...``.
      first_epoch: the first (1-based) epoch whose weights may be selected.

    Returns:
      ``(epoch, loss)`` of the selected weights; ``(0, None)`` means the initial weights.
    """
    best_epoch, best_loss, minimum = 0, None, math.inf
    for epoch, loss in enumerate(losses, start=1):
        if epoch >= first_epoch and loss < minimum:
            best_epoch, best_loss = epoch, float(loss)
        minimum = min(minimum, loss)
    return best_epoch, best_loss


def _copy(tree: Any) -> Any:
    return jax.tree.map(jnp.copy, tree)


class Selection:
    """The selection slot of one run: the rule, the weights, the ``best`` checkpoint.

    Args:
      config: the run's config (``selection.*``, ``ckpt.enabled``, ``ckpt.keep_best``).
      workdir: the run's folder; the weights go to ``workdir/best/``.
      has_validation: ``False`` when the run has no validation split: then nothing is
        selected, kept or tested (the test set is never used to select).
    """

    def __init__(self, config: Any, workdir: str, *, has_validation: bool = True):
        self.config = config
        self.enabled = has_validation
        group = config.get("selection")
        self.first_epoch = 1 if group is None else int(group.get("first_epoch", 1))
        self.directory = os.path.join(workdir, "best")
        keep = has_validation and config.ckpt.enabled and config.ckpt.get("keep_best", True)
        self._manager = None
        if keep:
            options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("variables", "meta")
            )
        self.epoch, self.loss, self.minimum = 0, None, math.inf
        self.variables = None
        self.row: dict[str, Any] | None = None

    @staticmethod
    def _variables(state) -> dict[str, Any]:
        return {"params": state.params, "model_state": state.model_state}

    def start(self, state, initial_state_fn, history: Sequence[dict[str, Any]]) -> None:
        """Fills the slot at the start of a run or on resume.

        Args:
          state: the (restored) training state, for the shapes and shardings.
          initial_state_fn: ``() -> TrainState`` rebuilding the initial state.
          history: the ``metrics.jsonl`` rows of the epochs already done.
        """
        if not self.enabled:
            return
        losses = [selection_loss(self.config, r) for r in history]
        self.epoch, self.loss = select_epoch(losses, self.first_epoch)
        self.minimum = min(losses, default=math.inf)
        self.row = history[self.epoch - 1] if self.epoch else None
        if self.epoch == 0:
            self.variables = _copy(self._variables(initial_state_fn()))
            self._save(self.epoch)
            return
        self.variables = self._restore(state)
        if self.variables is None:
            log.warning(
                "the selected weights of epoch %d are not in %s; the summary reports that "
                "epoch's test metrics from metrics.jsonl",
                self.epoch,
                self.directory,
            )

    def update(self, epoch: int, row: dict[str, Any], state) -> bool:
        """Applies the rule after ``epoch`` (1-based); returns whether the slot was replaced."""
        if not self.enabled:
            return False
        loss = selection_loss(self.config, row)
        fired = epoch >= self.first_epoch and loss < self.minimum
        self.minimum = min(self.minimum, loss)
        if fired:
            self.epoch, self.loss, self.row = epoch, loss, row
            self.variables = _copy(self._variables(state))
            self._save(epoch)
        return fired

    def _save(self, epoch: int) -> None:
        if self._manager is None:
            return
        if epoch in self._manager.all_steps():  # the same weights, written before a restart
            return
        for stale in [s for s in self._manager.all_steps() if s > epoch]:
            self._manager.delete(stale)  # written after the checkpoint this run resumed from
        meta = {"epoch": epoch, "selection_loss": self.loss, "first_epoch": self.first_epoch}
        try:
            self._manager.save(
                epoch,
                args=ocp.args.Composite(
                    variables=ocp.args.StandardSave(self.variables), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax wraps OS errors (disk full) in several types
            raise checkpointing.write_failure(epoch, self.directory, e) from e

    def _restore(self, state) -> dict[str, Any] | None:
        if self._manager is None or self.epoch not in self._manager.all_steps():
            return None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            self._variables(state),
        )
        restored = self._manager.restore(
            self.epoch,
            args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.variables

    def test(self, evaluate_fn, state) -> dict[str, Any] | None:
        """Evaluates the selected weights with ``evaluate_fn(state) -> {"loss", "accuracy"}``.

        Returns:
          The summary's ``selected`` entry: epoch (0 = the initial weights), selection loss,
          the test loss and accuracy of the selected weights, and where they are kept;
          ``None`` when the run has no validation split.
        """
        if not self.enabled:
            return None
        out: dict[str, Any] = {
            "epoch": self.epoch,
            "selection_loss": self.loss,
            "first_epoch": self.first_epoch,
            "checkpoint": self.directory if self._manager is not None else None,
        }
        if self.row is not None and "val_accuracy" in self.row:
            out["val_accuracy"] = self.row["val_accuracy"]
        if self.variables is not None:
            v = self.variables
            test = evaluate_fn(state.replace(params=v["params"], model_state=v["model_state"]))
            out.update(test_loss=test["loss"], test_accuracy=test["accuracy"], tested=True)
        elif self.row is not None:
            out.update(
                test_loss=self.row["test_loss"],
                test_accuracy=self.row["test_accuracy"],
                tested=False,
            )
        return out

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
