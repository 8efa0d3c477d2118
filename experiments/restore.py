"""Rebuild a finished (or interrupted) run's training state from its workdir.

``train_and_evaluate`` writes ``config.json`` and orbax checkpoints of
``{"state": TrainState, "metrics": running sums}``. This module builds the same
abstract tree the loop builds (same model, optimizer, SADT config and shapes;
``jax.eval_shape``, so nothing is initialised) and restores the newest readable
checkpoint into it, so analyses (e.g. :mod:`experiments.sharpness`) see exactly
the parameters and BatchNorm statistics the run ended with.

Example::

  run = restore_run("runs/fashion_mnist/sadt_t1_s0")
  run.state.params, run.state.model_state, run.dataset.train_images

Mirrors ``sadt_jax.train.loop.train_and_evaluate``'s ``init_state``; if that changes,
change this too (a library helper building the state from a config would remove
the duplication).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sadt_jax.algorithm.state import TrainState
from sadt_jax.data import Dataset
from sadt_jax.train import builders, protocol, steps
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
    with open(os.path.join(workdir, "config.json")) as f:
        return ml_collections.ConfigDict(json.load(f))


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
    ds = dataset or protocol.load_data(config)  # the run's split (release_split too)
    sadt_config = builders.resolve_sadt_config(config)
    steps_per_epoch = protocol.steps_per_epoch(config, ds.num_train)
    model = builders.build_model(config, ds.num_classes)
    tx = builders.build_optimizer(config, steps_per_epoch)

    def init_tree():
        state = builders.init_state(config, model, ds.image_shape, tx, sadt_config)
        return {"state": state, "metrics": steps.init_metric_sums()}

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(init_tree),
    )
    ckpt = Checkpointer(ckpt_dir, max_to_keep=int(config.ckpt.max_to_keep))
    try:
        restored = ckpt.restore(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}")
    tree, meta, step = restored
    return RestoredRun(config=config, dataset=ds, state=tree["state"], step=step, meta=meta)
