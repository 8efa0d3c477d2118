"""Rebuild a finished (or interrupted) run's training state from its workdir.

``train_and_evaluate`` writes ``config.json`` and orbax checkpoints of
``{"state": TrainState, "metrics": running sums}``. This module builds the run
exactly as the loop does (:func:`sadt_jax.train.builders.build_run`: same model,
optimizer, SADT config and shapes; ``jax.eval_shape``, so nothing is initialised)
and restores the newest readable checkpoint into it, so analyses (e.g.
:mod:`experiments.sharpness`) see exactly the parameters and BatchNorm statistics
the run ended with.

Example::

  run = restore_run("runs/fashion_mnist/sadt_t1_s0")
  run.state.params, run.state.model_state, run.dataset.train_images
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from sadt_jax import io
from sadt_jax.algorithm.state import TrainState
from sadt_jax.data import Dataset
from sadt_jax.train import builders
from sadt_jax.train.checkpointing import Checkpointer

__all__ = ["RestoredRun", "load_run_config", "restore_run"]


@dataclasses.dataclass
class RestoredRun:
    """A run's config, dataset and restored state.

    Attributes:
      config: the run's config (from ``config.json``).
      dataset: the dataset as the run loaded it (same split and ``max_train_examples``).
      state: the restored :class:`~sadt_jax.TrainState`.
      step: the checkpoint's step.
      meta: the checkpoint's metadata (epoch, step in epoch, best, ...).
    """

    config: ml_collections.ConfigDict
    dataset: Dataset
    state: TrainState
    step: int
    meta: dict[str, Any]


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run stored in ``workdir/config.json``."""
    path = os.path.join(workdir, "config.json")
    stored = io.read_json(path)
    if stored is None:
        raise FileNotFoundError(f"no config.json in {workdir}")
    return ml_collections.ConfigDict(stored)


def restore_run(workdir: str, *, dataset: Dataset | None = None) -> RestoredRun:
    """Restores the newest readable checkpoint of the run in ``workdir``.

    Args:
      workdir: the run's folder (``config.json`` and ``checkpoints/``).
      dataset: the dataset, if already loaded (else loaded as the run did).

    Returns:
      A :class:`RestoredRun` (arrays replicated over all local devices).

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint.
    """
    workdir = os.path.abspath(workdir)
    config = load_run_config(workdir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir}")
    run = builders.build_run(config, dataset=dataset)
    ckpt = Checkpointer(ckpt_dir, max_to_keep=int(config.ckpt.max_to_keep))
    try:
        restored = ckpt.restore(run.abstract_checkpoint())
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    tree, meta, step = restored
    return RestoredRun(
        config=config, dataset=run.dataset, state=tree["state"], step=step, meta=meta
    )
