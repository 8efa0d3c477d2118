r"""Losses used by SADT and its baselines.

Every loss here is summed over classes and averaged over the batch (optionally
with a per-example ``mask``, so padded evaluation batches count only real
examples). Probabilities are always formed with ``log_softmax`` for stability.

The distillation losses follow the two directions the released SADT code uses
(docs/algorithm.md, step 4):

* ``kl_divergence(teacher_logits, student_logits)`` is :math:`\mathrm{KL}(q \| p)`
  with :math:`q` the teacher's distribution (T1, T2);
* swapping the arguments gives :math:`\mathrm{KL}(p \| q)` (T3).

References:
  Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"
  (arXiv 1503.02531), for the temperature and its :math:`\tau^2` scaling.
  Szegedy et al., 2016 (arXiv 1512.00567), for label smoothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "cross_entropy",
    "distillation",
    "kl_divergence",
    "masked_mean",
    "smooth_labels",
    "soft_cross_entropy",
    "accuracy",
]


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of per-example ``values``, counting only examples where ``mask`` is 1.

    Args:
      values: per-example values, shape ``(batch,)``.
      mask: optional weights of shape ``(batch,)`` (1 = real, 0 = padding).

    Returns:
      A scalar. With an all-zero mask the result is 0, not NaN.
    """
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Turns integer or soft labels into (smoothed) probability vectors.

    Args:
      labels: integer labels ``(batch,)`` or probability vectors ``(batch, num_classes)``.
      num_classes: number of classes.
      smoothing: label-smoothing mass spread uniformly over classes, in ``[0, 1)``.

    Returns:
      Float32 targets of shape ``(batch, num_classes)`` whose rows sum to 1.
    """
    if labels.ndim == 1:
        targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    else:
        targets = labels.astype(jnp.float32)
    if smoothing:
        targets = targets * (1.0 - smoothing) + smoothing / num_classes
    return targets


def soft_cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    r"""Cross-entropy :math:`-\sum_c t_c \log \mathrm{softmax}(z)_c`, batch-averaged.

    Args:
      logits: ``(batch, num_classes)``; computed in float32 whatever their dtype.
      targets: probability vectors ``(batch, num_classes)`` (e.g. CutMix labels).
      mask: optional per-example weights ``(batch,)``.

    Returns:
      Scalar mean cross-entropy.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return masked_mean(-jnp.sum(targets * log_p, axis=-1), mask)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Cross-entropy for integer labels ``(batch,)`` or soft labels ``(batch, C)``.

    Args:
      logits: ``(batch, num_classes)``.
      labels: integer class ids or probability vectors.
      label_smoothing: uniform smoothing mass in ``[0, 1)``.
      mask: optional per-example weights.

    Returns:
      Scalar mean cross-entropy.

    Example:
      >>> import jax.numpy as jnp
      >>> from sadt_jax import losses
      >>> float(losses.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3])))  # log 4
      1.386...
    """
    targets = smooth_labels(labels, logits.shape[-1], label_smoothing)
    return soft_cross_entropy(logits, targets, mask)


def kl_divergence(
    target_logits: jax.Array,
    logits: jax.Array,
    *,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
    clip: float = 0.0,
) -> jax.Array:
    r"""Batch-averaged :math:`\mathrm{KL}(a \| b) = \sum_c a_c (\log a_c - \log b_c)`.

    ``a = softmax(target_logits / temperature)`` and
    ``b = softmax(logits / temperature)``. Gradients flow through both arguments;
    wrap one in ``jax.lax.stop_gradient`` to hold it constant, as SADT does with the
    clean prediction. The :math:`\tau^2` factor of Hinton et al. is *not* applied
    here (the caller decides).

    Args:
      target_logits: logits of the first distribution ``a``.
      logits: logits of the second distribution ``b``.
      temperature: softmax temperature, > 0.
      mask: optional per-example weights.
      clip: if > 0, clip both probability vectors to ``[clip, 1]`` before the KL, as
        Keras' ``KLDivergence`` does (with ``clip=1e-7``); 0 (default) computes it
        exactly from log-probabilities.

    Returns:
      Scalar mean KL divergence (nats).
    """
    if clip:
        a = jnp.clip(jax.nn.softmax(target_logits.astype(jnp.float32) / temperature), clip, 1.0)
        b = jnp.clip(jax.nn.softmax(logits.astype(jnp.float32) / temperature), clip, 1.0)
        return masked_mean(jnp.sum(a * jnp.log(a / b), axis=-1), mask)
    log_a = jax.nn.log_softmax(target_logits.astype(jnp.float32) / temperature, axis=-1)
    log_b = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    per_example = jnp.sum(jnp.exp(log_a) * (log_a - log_b), axis=-1)
    return masked_mean(per_example, mask)


def distillation(
    teacher_logits: jax.Array,
    student_logits: jax.Array,
    *,
    reverse: bool = False,
    temperature: float = 1.0,
    weight: float = 1.0,
    clip: float = 0.0,
) -> jax.Array:
    r"""SADT's distillation loss :math:`w \tau^2 \mathrm{KL}`.

    ``reverse=False``: :math:`\mathrm{KL}(q \| p)` with :math:`q` the teacher's and
    :math:`p` the student's (clean) distribution (SADT-T1, T2); ``reverse=True``:
    :math:`\mathrm{KL}(p \| q)` (SADT-T3). Bind the options with ``functools.partial``
    to get a method's loss as a value.

    Args:
      teacher_logits: the teacher pass's logits (differentiated).
      student_logits: the clean pass's logits (hold them constant with
        ``jax.lax.stop_gradient``).
      reverse: the direction, see above.
      temperature: :math:`\tau` (> 0); the loss is scaled by :math:`\tau^2` (Hinton et al.).
      weight: :math:`w`.
      clip: probability clip of :func:`kl_divergence` (0: off).

    Returns:
      The scalar loss.
    """
    a, b = (student_logits, teacher_logits) if reverse else (teacher_logits, student_logits)
    return weight * temperature**2 * kl_divergence(a, b, temperature=temperature, clip=clip)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Top-1 accuracy against integer labels, or against the argmax of soft labels."""
    if labels.ndim > 1:
        labels = jnp.argmax(labels, axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return masked_mean(correct, mask)
