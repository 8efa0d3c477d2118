"""`load_dataset`: one entry point for every dataset, returning in-memory splits.

``'fashion_mnist'`` is read from the Debian package files (no TensorFlow, no network); any
other name is a tensorflow-datasets dataset that must already be prepared.

Splits follow the SADT paper's protocol (Fahim & Boutellier, arXiv 2211.00310): the validation
set is the first ``num_validation`` (3000) images of the test split and the test set is the
rest; the reported model is the checkpoint with the best validation loss. The authors' released
code leaves test image 3000 unused (its test set is images 3001-9999); by default every test
image is in exactly one of the two sets, and ``test_skip=1`` reproduces the release's split.

Scaling: :func:`normalization_constants` gives the ``(mean, std)`` that
:func:`sadt_jax.data.augment.normalize` uses: the training set's per-channel statistics
(``"standardize"``, the default) or ``(0, 255)`` (``"scale"``: ``x / 255`` only, the release).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sadt_jax.data import fashion_mnist, tfds_source
from sadt_jax.data.errors import DatasetError

_STATS_CHUNK = 4096
NORMALIZATIONS = ("standardize", "scale")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """In-memory image classification splits (read-only NumPy arrays).

    Attributes:
      train_images: ``uint8`` ``(N_train, H, W, C)``.
      train_labels: ``int32`` ``(N_train,)``.
      val_images: ``uint8`` ``(N_val, H, W, C)``: the first ``num_validation`` test images.
      val_labels: ``int32`` ``(N_val,)``.
      test_images: ``uint8`` ``(N_test, H, W, C)``: the remaining test images.
      test_labels: ``int32`` ``(N_test,)``.
      num_classes: number of classes; labels lie in ``[0, num_classes)``.
      image_shape: ``(H, W, C)``.
      mean: ``float32`` ``(C,)`` per-channel mean of ``train_images`` in pixel units ``[0, 255]``.
      std: ``float32`` ``(C,)`` per-channel standard deviation of ``train_images``, pixel units.
        Use ``augment.normalize(images, mean, std)``.
      name: the dataset name given to :func:`load_dataset`.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: np.ndarray
    std: np.ndarray
    name: str = ""

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.train_images.shape[0])

    @property
    def num_val(self) -> int:
        """Number of validation examples."""
        return int(self.val_images.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test examples."""
        return int(self.test_images.shape[0])


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of ``(N, H, W, C)`` images, in pixel units.

    Accumulates in float64 over chunks, so 50000 CIFAR images need no 1 GB float copy.

    Args:
      images: ``(N, H, W, C)`` array with ``N > 0``.

    Returns:
      ``(mean, std)``, each ``float32`` of shape ``(C,)``.
    """
    channels = images.shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start : start + _STATS_CHUNK].reshape(-1, channels).astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    num_validation: int = 3000,
    max_train_examples: int | None = None,
    test_skip: int = 0,
    max_test_examples: int | None = None,
) -> Dataset:
    """Loads a dataset into memory with the paper's validation protocol.

    Args:
      name: ``'fashion_mnist'`` (the Debian package's IDX files, read without TensorFlow) or any
        tensorflow-datasets image classification name (``'cifar10'``, ``'cifar100'``, ...).
      data_dir: for ``'fashion_mnist'``, the folder of the IDX files (default
        ``/usr/share/datasets/fashion-mnist``); otherwise the tfds data folder (default: tfds'
        own). Nothing is ever downloaded.
      num_validation: the first ``num_validation`` test images form the validation split and the
        rest the test split; ``0`` means no validation split and the whole test split.
      max_train_examples: if given, keep only the first ``max_train_examples`` training
        examples (for quick runs); ``mean``/``std`` are computed on the kept ones.
      test_skip: test images left out between the validation and the test split: the test
        split is images ``num_validation + test_skip`` onwards (the release: 1, so 3001-9999).
      max_test_examples: if given, keep only the first ``max_test_examples`` images of the
        test split (for quick runs and tests: evaluating all 7,000 test images every epoch
        dominates a run of a few steps). The validation split is unchanged.

    Returns:
      A :class:`Dataset`.

    Raises:
      DatasetError: the data cannot be found or read, the name is unknown, or the requested
        split sizes do not fit the data.
    """
    if num_validation < 0:
        raise DatasetError(f"num_validation={num_validation} is negative: use 0 or more")
    if max_train_examples is not None and max_train_examples <= 0:
        raise DatasetError(
            f"max_train_examples={max_train_examples}: use a positive number, or None for all"
        )
    if max_test_examples is not None and max_test_examples <= 0:
        raise DatasetError(
            f"max_test_examples={max_test_examples}: use a positive number, or None for all"
        )
    if name == "fashion_mnist":
        arrays = fashion_mnist.load_fashion_mnist(data_dir)
        num_classes = fashion_mnist.NUM_CLASSES
    else:
        arrays, num_classes = tfds_source.load_tfds(name, data_dir=data_dir)

    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["test"]
    if max_train_examples is not None:
        train_images = train_images[:max_train_examples]
        train_labels = train_labels[:max_train_examples]
    if train_images.shape[0] == 0:
        raise DatasetError(f"dataset {name!r} has no training examples: check the prepared data")
    if test_skip < 0:
        raise DatasetError(f"test_skip={test_skip} is negative: use 0 or more")
    if num_validation + test_skip >= test_images.shape[0]:
        raise DatasetError(
            f"num_validation={num_validation} (+ test_skip={test_skip}) leaves no test images: "
            f"dataset {name!r} has "
            f"{test_images.shape[0]} test images; set --config.data.num_validation lower"
        )
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise DatasetError(
                f"dataset {name!r}: {split} labels outside [0, {num_classes}): "
                "the prepared data is inconsistent: prepare it again"
            )

    test_split = slice(
        num_validation + test_skip,
        None if max_test_examples is None else num_validation + test_skip + max_test_examples,
    )
    mean, std = channel_stats(train_images)
    std = np.maximum(std, np.float32(1e-6))  # A constant channel must not divide by zero.
    ro = _read_only
    return Dataset(
        train_images=ro(train_images),
        train_labels=ro(train_labels),
        val_images=ro(test_images[:num_validation]),
        val_labels=ro(test_labels[:num_validation]),
        test_images=ro(test_images[test_split]),
        test_labels=ro(test_labels[test_split]),
        num_classes=int(num_classes),
        image_shape=tuple(int(d) for d in train_images.shape[1:]),
        mean=ro(mean),
        std=ro(std),
        name=name,
    )


def normalization_constants(dataset: Dataset, normalization: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``(mean, std)`` to pass to :func:`sadt_jax.data.augment.normalize`.

    Args:
      dataset: the loaded :class:`Dataset`.
      normalization: ``"standardize"`` (per-channel mean and standard deviation of the training
        images) or ``"scale"`` (mean 0, std 255: ``x / 255``, as the release does).

    Returns:
      ``(mean, std)``, ``float32`` arrays of shape ``(C,)`` in pixel units.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization={normalization!r} is not valid; choose one of: "
            f"{', '.join(NORMALIZATIONS)}"
        )
    if normalization == "standardize":
        return dataset.mean, dataset.std
    channels = dataset.image_shape[-1]
    return np.zeros(channels, np.float32), np.full(channels, 255.0, np.float32)
