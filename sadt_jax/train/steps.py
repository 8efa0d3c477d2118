"""The jitted training and evaluation steps used by the loop.

``make_train_step`` wraps :func:`sadt_jax.sadt_update` with on-device input
processing (crop+flip, normalization, one-hot, CutMix) and running sums of the
step's metrics, so the loop never synchronises with the host between logging
intervals. Augmentation randomness is ``fold_in(aug_key, step)``: a resumed
run draws the same augmentations.

``make_gather_train_step`` is the step the loop runs: it also gathers the batch on the
device, from the training set uploaded once per run (replicated) and the epoch's index plan
uploaded once per epoch (sharded over the ``data`` axis like a batch), at the row
``state.step - plan["first_step"]``. The loop then does no per-step host work at all: no
indexing, no copy, not even a step number to transfer. The gathered batch is bit for bit the
host-gathered one, sharded the same way, so both steps train identically.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sadt_jax.algorithm.state import TrainState
from sadt_jax.algorithm.step import SADTConfig, sadt_update
from sadt_jax.data import augment

__all__ = [
    "AUGMENTS",
    "eval_sums",
    "gather_batch",
    "init_metric_sums",
    "make_gather_train_step",
    "make_train_step",
    "preprocess",
]

AUGMENTS = ("none", "cutmix", "crop_flip", "crop_flip_cutmix")
METRIC_KEYS = (
    "loss",
    "ce",
    "kd",
    "accuracy",
    "grad_norm",
    "teacher_grad_norm",
    "update_norm",
    "perturbation_norm",
    "sharpness",
)


def init_metric_sums() -> dict[str, jax.Array]:
    """Zeroed running sums of every step metric, plus the step count."""
    sums = {k: jnp.zeros([], jnp.float32) for k in METRIC_KEYS}
    sums["count"] = jnp.zeros([], jnp.float32)
    return sums


def preprocess(
    key: jax.Array,
    batch: dict[str, jax.Array],
    *,
    augment_name: str,
    mean: np.ndarray,
    std: np.ndarray,
    num_classes: int,
    cutmix_alpha: float,
    cutmix_box: str = "reference",
) -> dict[str, jax.Array]:
    """uint8 images + int labels -> normalized float images + (soft) label vectors.

    A batch with ``partner_image``/``partner_label`` (the release's second stream, see
    :mod:`sadt_jax.data.release_order`) takes its CutMix partners from them.
    """
    k_crop, k_mix = jax.random.split(key)
    images = batch["image"]
    partner = batch.get("partner_image")  # [release protocol] CutMix partners from a stream
    if augment_name in ("crop_flip", "crop_flip_cutmix"):
        images = augment.random_crop_flip(k_crop, images)
        if partner is not None:
            partner = augment.random_crop_flip(jax.random.fold_in(k_crop, 1), partner)
    images = augment.normalize(images, jnp.asarray(mean), jnp.asarray(std))
    labels = augment.one_hot(batch["label"], num_classes)
    if augment_name in ("cutmix", "crop_flip_cutmix"):
        kwargs = {}
        if partner is not None:
            partner = augment.normalize(partner, jnp.asarray(mean), jnp.asarray(std))
            kwargs["partner_images"] = partner
            kwargs["partner_labels"] = augment.one_hot(batch["partner_label"], num_classes)
        images, labels = augment.cutmix(
            k_mix, images, labels, alpha=cutmix_alpha, box=cutmix_box, **kwargs
        )
    return {"image": images, "label": labels}


def _train_step(
    state: TrainState,
    sums: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    *,
    sadt_config: SADTConfig,
    aug_key: jax.Array,
    preprocess_kwargs: dict[str, Any],
):
    key = jax.random.fold_in(aug_key, state.step)
    batch = preprocess(key, batch, **preprocess_kwargs)
    state, metrics = sadt_update(state, batch, config=sadt_config)
    sums = {k: sums[k] + (metrics[k] if k != "count" else 1.0) for k in sums}
    return state, sums


def make_train_step(
    sadt_config: SADTConfig,
    *,
    aug_key: jax.Array,
    state_sharding: Any = None,
    **preprocess_kwargs: Any,
):
    """A jitted ``(state, sums, batch) -> (state, sums)`` with state and sums donated.

    Args:
      sadt_config: the step's :class:`SADTConfig`.
      aug_key: base key of the augmentation stream.
      state_sharding: sharding of the output state and sums (replicated on a mesh).
      **preprocess_kwargs: ``augment_name``, ``mean``, ``std``, ``num_classes``,
        ``cutmix_alpha``, ``cutmix_box`` (see :func:`preprocess`).
    """
    fn = functools.partial(
        _train_step, sadt_config=sadt_config, aug_key=aug_key, preprocess_kwargs=preprocess_kwargs
    )
    out = None if state_sharding is None else (state_sharding, state_sharding)
    return jax.jit(fn, donate_argnums=(0, 1), out_shardings=out)


def gather_batch(
    data: dict[str, jax.Array],
    plan: dict[str, jax.Array],
    position: jax.Array,
    batch_sharding: Any = None,
) -> dict[str, jax.Array]:
    """The batch of one step, gathered on the device from the training set and a plan.

    Args:
      data: ``{"image": (N, H, W, C) uint8, "label": (N,)}``, the whole training set
        (replicated over the mesh).
      plan: ``{"index": (steps, b), "partner": (steps, b)}`` (``"partner"`` only with CutMix
        partners from a stream) ``int32`` example indices, one row per step (sharded over the
        ``data`` axis on the batch dimension); other keys are ignored.
      position: the row of ``plan`` to gather (an ``int32`` scalar; must lie in the plan).
      batch_sharding: the sharding of a global batch; the gathered arrays are constrained to it.

    Returns:
      ``{"image", "label"}`` (plus ``"partner_image"``, ``"partner_label"``) as
      :func:`sadt_jax.train.protocol.local_batch` builds them on the host.
    """

    def rows(key: str) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(plan[key], position, axis=0, keepdims=False)

    idx = rows("index")
    batch = {"image": data["image"][idx], "label": data["label"][idx]}
    if "partner" in plan:
        partner = rows("partner")
        batch["partner_image"] = data["image"][partner]
        batch["partner_label"] = data["label"][partner]
    if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    return batch


def _gather_train_step(state, sums, data, plan, *, batch_sharding, **step_kwargs):
    batch = gather_batch(data, plan, state.step - plan["first_step"], batch_sharding)
    return _train_step(state, sums, batch, **step_kwargs)


def make_gather_train_step(
    sadt_config: SADTConfig,
    *,
    aug_key: jax.Array,
    state_sharding: Any = None,
    batch_sharding: Any = None,
    **preprocess_kwargs: Any,
):
    """A jitted ``(state, sums, data, plan) -> (state, sums)`` that gathers its own batch.

    The step trains on row ``state.step - plan["first_step"]`` of ``plan`` (see
    :func:`gather_batch`), so the caller passes the same device arrays at every step of a
    block of the plan and ``state.step`` selects the batch. Otherwise it is
    :func:`make_train_step`'s step: the same preprocessing, update and metric sums, with state
    and sums donated (``data`` and ``plan`` are not).

    Args:
      sadt_config: the step's :class:`SADTConfig`.
      aug_key: base key of the augmentation stream.
      state_sharding: sharding of the output state and sums (replicated on a mesh).
      batch_sharding: sharding of a global batch (split over the ``data`` axis).
      **preprocess_kwargs: see :func:`make_train_step`.

    Returns:
      The jitted step. ``plan`` holds ``"index"`` (and ``"partner"``) ``(steps, b)`` and
      ``"first_step"``, the value of ``state.step`` at the plan's first row (an ``int32``
      scalar on the devices).
    """
    fn = functools.partial(
        _gather_train_step,
        batch_sharding=batch_sharding,
        sadt_config=sadt_config,
        aug_key=aug_key,
        preprocess_kwargs=preprocess_kwargs,
    )
    out = None if state_sharding is None else (state_sharding, state_sharding)
    return jax.jit(fn, donate_argnums=(0, 1), out_shardings=out)


def eval_sums(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    mean: np.ndarray,
    std: np.ndarray,
) -> dict[str, jax.Array]:
    """Sums of CE, correct predictions and real examples over a masked batch (eval mode)."""
    images = augment.normalize(batch["image"], jnp.asarray(mean), jnp.asarray(std))
    variables = {"params": state.params, **state.model_state}
    logits = state.apply_fn(variables, images, train=False).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(log_p, batch["label"][:, None].astype(jnp.int32), axis=-1)[:, 0]
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {
        "loss": jnp.sum(ce * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }
