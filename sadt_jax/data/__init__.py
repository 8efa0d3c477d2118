"""Input pipeline: in-memory datasets, deterministic host-side batching, on-device augmentation.

- :func:`load_dataset` reads Fashion-MNIST from the Debian package files (no TensorFlow) or any
  prepared tensorflow-datasets image classification dataset into a :class:`Dataset` with the
  SADT paper's validation split (the first 3000 test images).
- :mod:`sadt_jax.data.pipeline`: per-process index batches from ``(seed, epoch)`` for training
  and padded, masked batches for evaluation.
- :mod:`sadt_jax.data.release_order`: the epoch's order, a full permutation or the authors'
  release's 1024-buffer shuffle with CutMix partners from a second stream, the partial last
  batch dropped or kept.
- :mod:`sadt_jax.data.augment`: jittable CutMix, crop+flip, normalization.

Every failure to load data is a :class:`DatasetError` with a one-line fix.
"""

from sadt_jax.data.augment import cutmix, normalize, one_hot, random_crop_flip
from sadt_jax.data.errors import DatasetError
from sadt_jax.data.fashion_mnist import load_fashion_mnist, read_idx
from sadt_jax.data.pipeline import (
    eval_batches,
    num_eval_batches,
    steps_per_epoch,
    train_batch_indices,
    train_batches,
)
from sadt_jax.data.release_order import buffer_shuffle, epoch_batches, epoch_order
from sadt_jax.data.sources import Dataset, channel_stats, load_dataset, normalization_constants
from sadt_jax.data.tfds_source import load_tfds

__all__ = [
    "Dataset",
    "DatasetError",
    "buffer_shuffle",
    "channel_stats",
    "cutmix",
    "epoch_batches",
    "epoch_order",
    "eval_batches",
    "load_dataset",
    "load_fashion_mnist",
    "load_tfds",
    "normalization_constants",
    "normalize",
    "num_eval_batches",
    "one_hot",
    "random_crop_flip",
    "read_idx",
    "steps_per_epoch",
    "train_batch_indices",
    "train_batches",
]
