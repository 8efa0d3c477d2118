"""The jitted training and evaluation steps used by the loop.

``make_train_step`` wraps :func:`sadt_jax.sadt_update` with on-device input
processing (crop+flip, normalization, one-hot, CutMix) and running sums of the
step's metrics, so the loop never synchronises with the host between logging
intervals. Augmentation randomness is ``fold_in(aug_key, step)``: a resumed
run draws the same augmentations.
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

__all__ = ["AUGMENTS", "eval_sums", "init_metric_sums", "make_train_step", "preprocess"]

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
