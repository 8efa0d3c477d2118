"""The training protocol's parts that the loop calls: data, batches, optimizer reset, validation.

Each function reads one group of config fields (``configs/common.py`` lists them and
``apply_release`` sets them to the authors' release), so the loop calls one hook per part:

* :func:`load_data`: the splits (``data.release_split``: test = test images 3001-9999);
* :func:`normalization`: ``data.normalization`` (per-channel standardisation or ``x / 255``);
* :func:`steps_per_epoch`, :func:`epoch_plan`, :func:`local_batch`: the order of an epoch
  (``data.order``, ``data.shuffle_buffer``), CutMix partners from a second stream
  (``data.cutmix_partner``) and the partial last batch (``data.drop_remainder``);
* :func:`make_optimizer_reset`: ``optim.reset_every_epoch``, the release's Adam and learning-rate
  schedule created anew at the start of every epoch;
* :func:`evaluate`: validation loss and accuracy, and the CE of the last validation batch
  (``selection.loss="last_batch"``), which the release selects on.

The selection rule and the kept ``best`` weights are in :mod:`sadt_jax.train.selection`; the
checks of these fields are in :mod:`sadt_jax.train.validation`, with every other config check.
Every field is read with ``config.<section>.get(name, default)``, so configs written before a
field existed (an old ``config.json``) mean the project's protocol.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sadt_jax.data import Dataset, load_dataset, normalization_constants, pipeline, release_order

__all__ = [
    "SELECTION_LOSSES",
    "epoch_plan",
    "evaluate",
    "load_data",
    "local_batch",
    "make_optimizer_reset",
    "normalization",
    "steps_per_epoch",
]

CUTMIX_PARTNERS = ("batch", "stream")
SELECTION_LOSSES = ("full", "last_batch")


def field(config: Any, section: str, name: str, default: Any) -> Any:
    group = config.get(section)
    return default if group is None else group.get(name, default)


def uses_partner_stream(config: Any) -> bool:
    """Whether CutMix takes its partners from a second stream (and the augmentation mixes)."""
    mixes = "cutmix" in config.data.augment
    return mixes and field(config, "data", "cutmix_partner", "batch") == "stream"


def load_data(config: Any) -> Dataset:
    """The run's :class:`~sadt_jax.data.Dataset` (``data.release_split`` skips test image 3000)."""
    return load_dataset(
        config.data.name,
        data_dir=config.data.get("data_dir"),
        num_validation=config.data.num_validation,
        max_train_examples=config.data.get("max_train_examples"),
        test_skip=1 if field(config, "data", "release_split", False) else 0,
        max_test_examples=config.data.get("max_test_examples"),
    )


def normalization(config: Any, ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` for :func:`sadt_jax.data.augment.normalize` under ``data.normalization``."""
    return normalization_constants(ds, field(config, "data", "normalization", "standardize"))


def steps_per_epoch(config: Any, num_train: int) -> int:
    """Steps per epoch: the partial last batch counts when ``data.drop_remainder`` is False."""
    drop = field(config, "data", "drop_remainder", True)
    return release_order.num_batches(num_train, config.batch_size, drop_remainder=drop)


def epoch_plan(config: Any, num_train: int, epoch: int) -> list[dict[str, np.ndarray]]:
    """This process's example indices (and CutMix partners) for every step of ``epoch``.

    With the project's fields (a permutation, batch partners, the remainder dropped) the
    indices are :func:`sadt_jax.data.pipeline.train_batch_indices`'s.
    """
    return release_order.epoch_batches(
        num_train,
        config.batch_size,
        seed=config.seed,
        epoch=epoch,
        order=field(config, "data", "order", "permutation"),
        buffer_size=field(config, "data", "shuffle_buffer", 1024),
        partner=uses_partner_stream(config),
        drop_remainder=field(config, "data", "drop_remainder", True),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def local_batch(ds: Dataset, step_plan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The host arrays of one step: images and labels, and the partners' if planned."""
    idx = step_plan["index"]
    batch = {"image": ds.train_images[idx], "label": ds.train_labels[idx]}
    if "partner" in step_plan:
        batch["partner_image"] = ds.train_images[step_plan["partner"]]
        batch["partner_label"] = ds.train_labels[step_plan["partner"]]
    return batch


def make_optimizer_reset(config: Any, sharding: Any):
    """``state -> state`` with a fresh optimizer state, or ``None`` when not resetting.

    With ``optim.reset_every_epoch`` the loop applies it before the first step of every epoch
    (never when resuming mid-epoch, where the checkpoint holds the epoch's optimizer state):
    Adam's moments, its bias-correction count and the learning-rate schedule's count all
    restart, as when the release creates a new Keras optimizer and schedule each epoch. Two
    updates per batch then count two schedule steps within the epoch.
    """
    if not field(config, "optim", "reset_every_epoch", False):
        return None

    def reset(state):
        return state.replace(opt_state=state.tx.init(state.params))

    return jax.jit(reset, donate_argnums=0, out_shardings=sharding)


def evaluate(
    eval_fn, state, images: np.ndarray, labels: np.ndarray, batch_size: int, sharding: Any
) -> dict[str, float]:
    """Loss and accuracy over all examples, and the mean CE of the last batch alone.

    The examples are cut, in order, into batches of ``batch_size`` (the last one partial,
    padded and masked; see :func:`sadt_jax.data.pipeline.eval_batches`).

    Returns:
      ``{"loss", "accuracy", "last_batch_loss"}``; ``{}`` without examples.
    """
    totals, last = None, None
    for batch in pipeline.eval_batches(
        images,
        labels,
        batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    ):
        batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
        last = eval_fn(state, batch)
        totals = last if totals is None else jax.tree.map(jnp.add, totals, last)
    if totals is None:
        return {}
    totals, last = jax.device_get((totals, last))
    n = max(float(totals["count"]), 1.0)
    return {
        "loss": float(totals["loss"]) / n,
        "accuracy": float(totals["correct"]) / n,
        "last_batch_loss": float(last["loss"]) / max(float(last["count"]), 1.0),
    }


def validation_batch_size(config: Any) -> int:
    """Validation batches: the training batch size for ``selection.loss="last_batch"`` (as in
    the release, so "the last batch" is its last batch), else ``eval_batch_size``."""
    if field(config, "selection", "loss", "full") == "last_batch":
        return int(config.batch_size)
    return int(config.eval_batch_size)
