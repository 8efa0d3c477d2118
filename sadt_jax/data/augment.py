"""On-device augmentation in JAX: pure, jittable functions of a PRNG key and a batch.

The SADT paper's only augmentation is CutMix with ``lambda ~ Beta(0.25, 0.25)``
(:func:`cutmix`); :func:`random_crop_flip` is the standard CIFAR augmentation for the
"beyond the release" experiments. All functions work for any ``(B, H, W, C)`` batch (28x28x1
Fashion-MNIST, 32x32x3 CIFAR, ...), keep the input dtype where they move pixels, and draw
per-example randomness from one key, so the same key gives the same batch.

Typical use inside a jitted train step, on the ``uint8`` batch::

  key_crop, key_mix = jax.random.split(jax.random.fold_in(key, step))
  labels = one_hot(batch['label'], num_classes)
  images, labels = cutmix(key_mix, batch['image'], labels, alpha=0.25)
  images = normalize(images, mean, std)

References:
  Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with Localizable
  Features", ICCV 2019, arXiv 1905.04899 (reference code: github.com/clovaai/CutMix-PyTorch).
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (the 4-pixel pad, random
  32x32 crop and horizontal flip used for CIFAR).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Casts images to float32 and standardizes each channel: ``(images - mean) / std``.

    Args:
      images: ``(..., C)`` images, typically ``uint8`` in ``[0, 255]``.
      mean: ``(C,)`` per-channel mean in the same units as ``images`` (``Dataset.mean``).
      std: ``(C,)`` per-channel standard deviation in the same units (``Dataset.std``).

    Returns:
      ``float32`` array of the shape of ``images``.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (jnp.asarray(images).astype(jnp.float32) - mean) / std


def one_hot(labels: jax.Array, num_classes: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """One-hot encodes integer labels.

    Args:
      labels: ``(B,)`` integer labels in ``[0, num_classes)``.
      num_classes: number of classes.
      dtype: output dtype.

    Returns:
      ``(B, num_classes)`` array of zeros and ones.
    """
    return jax.nn.one_hot(labels, num_classes, dtype=dtype)


CUTMIX_BOXES = ("reference", "release")


def cutmix_boxes(
    key: jax.Array, lam: jax.Array, height: int, width: int, *, min_box: bool = False
) -> jax.Array:
    """Samples one CutMix box per example, as in the reference implementation.

    The box has side ``cut = floor(S * sqrt(1 - lam))`` (``S`` = ``H`` for rows, ``W`` for
    columns) around a uniformly drawn pixel ``(cy, cx)``: rows ``[cy - cut // 2, cy + cut // 2)``
    clipped to ``[0, H]``, and the same for columns, so its area is at most
    ``(1 - lam) * H * W``. A side of length 0 (``cut <= 1``, i.e. ``lam > 1 - 4 / S**2``) leaves
    the box empty, unless ``min_box``: then that side gets length 1 starting at its clipped
    start, as in the authors' release (``if w == 0: w = 1``), so every example takes at least
    one pixel from its partner.

    Args:
      key: PRNG key.
      lam: ``(B,)`` mixing ratios in ``[0, 1]``.
      height: image height ``H``.
      width: image width ``W``.
      min_box: the release's rule: a 1-pixel minimum side.

    Returns:
      ``(B, H, W)`` boolean masks, ``True`` inside the box (the pixels taken from the partner).
    """
    key_y, key_x = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cy = jax.random.randint(key_y, lam.shape, 0, height)
    cx = jax.random.randint(key_x, lam.shape, 0, width)
    y1 = jnp.clip(cy - cut_h // 2, 0, height)[:, None, None]
    y2 = jnp.clip(cy + cut_h // 2, 0, height)[:, None, None]
    x1 = jnp.clip(cx - cut_w // 2, 0, width)[:, None, None]
    x2 = jnp.clip(cx + cut_w // 2, 0, width)[:, None, None]
    if min_box:  # y1 <= H - 1 and x1 <= W - 1 always, so the 1-pixel side stays inside
        y2 = jnp.where(y2 == y1, y1 + 1, y2)
        x2 = jnp.where(x2 == x1, x1 + 1, x2)
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    return (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)


def cutmix(
    key: jax.Array,
    images: jax.Array,
    labels_onehot: jax.Array,
    *,
    alpha: float = 0.25,
    partner_images: jax.Array | None = None,
    partner_labels: jax.Array | None = None,
    box: str = "reference",
) -> tuple[jax.Array, jax.Array]:
    r"""Per-example CutMix (Yun et al., 2019).

    Each example ``i`` is paired with example ``perm[i]`` of a random permutation of the batch
    (it may be its own partner, as in the reference code), or, when ``partner_images`` are
    given, with row ``i`` of those (the authors' release pairs every example with one from a
    second, independently shuffled stream); it draws its own
    :math:`\lambda_i \sim \mathrm{Beta}(\alpha, \alpha)` and a box of area about
    :math:`(1 - \lambda_i) H W` (see :func:`cutmix_boxes`), clipped to the image, whose pixels
    are replaced by the partner's. The labels are mixed by the actual pasted fraction
    :math:`r_i = |\mathrm{box}_i| / (H W)`: :math:`(1 - r_i) y_i + r_i y_{\mathrm{perm}[i]}`.

    Args:
      key: PRNG key; the same key gives the same output.
      images: ``(B, H, W, C)`` images of any dtype (``uint8`` before normalization is fine).
      labels_onehot: ``(B, K)`` one-hot (or soft) labels whose rows sum to 1.
      alpha: Beta concentration, a positive Python float (0.25 in the SADT paper; 1.0 gives
        uniform :math:`\lambda`, the ImageNet setting of the CutMix paper).
      partner_images: optional ``(B, H, W, C)`` partners, one per example.
      partner_labels: ``(B, K)`` labels of ``partner_images`` (required with them).
      box: ``"reference"`` (a collapsed box stays empty) or ``"release"`` (a 1x1 minimum box,
        see :func:`cutmix_boxes`).

    Returns:
      ``(images, labels)``: mixed images with the dtype and shape of ``images`` and ``float32``
      soft labels ``(B, K)`` whose rows sum to 1.
    """
    if not alpha > 0:
        raise ValueError(f"cutmix alpha={alpha} must be positive")
    if box not in CUTMIX_BOXES:
        raise ValueError(f"cutmix box={box!r} is not valid; choose one of: {CUTMIX_BOXES}")
    if (partner_images is None) != (partner_labels is None):
        raise ValueError("cutmix: give partner_images and partner_labels together, or neither")
    batch, height, width = images.shape[:3]
    key_perm, key_lam, key_box = jax.random.split(key, 3)
    labels = labels_onehot.astype(jnp.float32)
    if partner_images is None:
        perm = jax.random.permutation(key_perm, batch)
        partner_images, partner_labels = images[perm], labels[perm]
    lam = jax.random.beta(key_lam, alpha, alpha, shape=(batch,))
    lam = jnp.clip(jnp.nan_to_num(lam, nan=1.0), 0.0, 1.0)
    mask = cutmix_boxes(key_box, lam, height, width, min_box=box == "release")
    mixed = jnp.where(mask[..., None], partner_images.astype(images.dtype), images)
    ratio = mask.sum(axis=(1, 2)).astype(jnp.float32) / (height * width)
    partner_labels = partner_labels.astype(jnp.float32)
    labels = (1.0 - ratio)[:, None] * labels + ratio[:, None] * partner_labels
    return mixed, labels


def random_crop_flip(
    key: jax.Array, images: jax.Array, *, padding: int = 4, pad_mode: str = "constant"
) -> jax.Array:
    """Random crop after padding, then a random horizontal flip, per example.

    The standard CIFAR augmentation: pad ``padding`` pixels on each side, crop an ``H x W``
    window at a uniformly random offset, and flip left-right with probability 1/2.
    The default ``pad_mode='constant'`` pads with zeros (torchvision's
    ``RandomCrop(32, padding=4)``); apply it to ``uint8`` images before :func:`normalize` so
    the padding is black. ``pad_mode='reflect'`` mirrors the border instead.

    Args:
      key: PRNG key; the same key gives the same output.
      images: ``(B, H, W, C)`` images of any dtype.
      padding: pixels of padding on each side (``0`` disables the crop).
      pad_mode: ``'constant'`` (zeros) or ``'reflect'``, as in :func:`jax.numpy.pad`.

    Returns:
      Augmented images with the shape and dtype of ``images``.
    """
    if pad_mode not in ("constant", "reflect"):
        raise ValueError(f"pad_mode={pad_mode!r} must be 'constant' or 'reflect'")
    if padding < 0:
        raise ValueError(f"padding={padding} must be non-negative")
    batch, height, width, channels = images.shape
    key_y, key_x, key_flip = jax.random.split(key, 3)
    if padding:
        pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
        padded = jnp.pad(images, pad, mode=pad_mode)
        ys = jax.random.randint(key_y, (batch,), 0, 2 * padding + 1)
        xs = jax.random.randint(key_x, (batch,), 0, 2 * padding + 1)
        crop = lambda image, y, x: jax.lax.dynamic_slice(
            image, (y, x, 0), (height, width, channels)
        )
        images = jax.vmap(crop)(padded, ys, xs)
    flip = jax.random.bernoulli(key_flip, 0.5, (batch,))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)
