"""Image classification datasets from tensorflow-datasets (CIFAR-10/100 and beyond), in memory.

:func:`load_tfds` reads the ``train`` and ``test`` splits of an already prepared tfds dataset
into NumPy arrays. It never downloads: it builds the dataset builder and reads what is under
``data_dir``; a dataset that was not prepared raises :class:`DatasetError` saying how to
prepare it on a machine with network access.

TensorFlow is imported lazily, inside the functions, because importing it takes seconds and
runs that use Fashion-MNIST need no TensorFlow at all. On import, GPUs are hidden from
TensorFlow, so that it neither claims GPU memory nor competes with JAX for the device.

Order: the splits are read without file shuffling, in the order stored by tfds. tfds shuffles
examples when it writes them; where the dataset has an ``id`` feature that numbers the original
examples (``train_00042``, ``test_00007``, as CIFAR-10/100 do), the arrays are put back in that
original order: the order of the original CIFAR batch files, which
``keras.datasets.cifar10.load_data()`` also keeps. This makes "validation = the first 3000 test
images" (SADT paper protocol) the same images as in the authors' Keras code rather than 3000
images picked by tfds' write-time shuffle.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import numpy as np

from sadt_jax.data.errors import DatasetError

# Suggested when a name is unknown to tfds.
SUGGESTED_DATASETS = ("cifar10", "cifar100", "fashion_mnist", "mnist", "svhn_cropped")

_READ_BATCH = 4096
_ID_PATTERN = re.compile(rb"^[A-Za-z]*_?(\d+)$")


def _prepare_hint(name: str) -> str:
    return (
        f"prepare it on a machine with network access with `tfds build {name}` or "
        f"`python -c 'import tensorflow_datasets as tfds; "
        f'tfds.builder("{name}").download_and_prepare()\'`, '
        "then copy its data_dir (default ~/tensorflow_datasets) here and set "
        "--config.data.data_dir (or TFDS_DATA_DIR)"
    )


def import_tfds() -> tuple[Any, Any]:
    """Imports TensorFlow and tensorflow-datasets with GPUs hidden from TensorFlow.

    Returns:
      The modules ``(tensorflow, tensorflow_datasets)``.

    Raises:
      DatasetError: they are not installed.
    """
    try:
        import tensorflow as tf
    except ImportError as e:
        raise DatasetError(
            f"TensorFlow is needed for tfds datasets but cannot be imported ({e}): "
            "`pip install tensorflow-cpu tensorflow-datasets`, or use --config.data.name="
            "fashion_mnist"
        ) from e
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already initialized its devices; too late to hide them.
        pass
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetError(
            f"tensorflow-datasets cannot be imported ({e}): `pip install tensorflow-datasets`, "
            "or use --config.data.name=fashion_mnist"
        ) from e
    return tf, tfds


def _builder(tfds: Any, name: str, data_dir: str | None) -> Any:
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        known = tfds.list_builders(with_community_datasets=False)
        close = difflib.get_close_matches(name, known, n=3)
        suggestions = list(dict.fromkeys(close + list(SUGGESTED_DATASETS)))
        raise DatasetError(
            f"unknown dataset {name!r}: tensorflow-datasets does not know it; "
            f"use one of {', '.join(suggestions)}, ... (`tfds.list_builders()` lists all)"
        ) from e
    except (ValueError, AssertionError) as e:
        message = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(
            f"cannot build tfds dataset {name!r} ({message}); check the name, e.g. "
            "cifar10, cifar100 or cifar10:3.0.2"
        ) from e


def canonical_order(ids: np.ndarray) -> np.ndarray | None:
    """Returns the permutation that sorts examples by the number in their ``id``, if any.

    Args:
      ids: ``(N,)`` array of byte strings, e.g. ``b'test_00042'``.

    Returns:
      ``order`` with ``ids[order]`` numbered ``0, 1, ..., N-1``, or ``None`` when the ids are not
      exactly a numbering of ``0..N-1`` (then the stored order is kept).
    """
    numbers = np.empty(len(ids), dtype=np.int64)
    for i, id_ in enumerate(ids):
        match = _ID_PATTERN.match(bytes(id_))
        if match is None:
            return None
        numbers[i] = int(match.group(1))
    order = np.argsort(numbers, kind="stable")
    if not np.array_equal(numbers[order], np.arange(len(ids))):
        return None
    return order


def _read_split(
    tfds: Any,
    builder: Any,
    split: str,
    image_key: str,
    label_key: str,
    with_id: bool,
    image_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    keys = (image_key, label_key) + (("id",) if with_id else ())
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: {k: ex[k] for k in keys}).batch(_READ_BATCH)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for batch in tfds.as_numpy(ds):
        for k in keys:
            parts[k].append(batch[k])
    if not parts[image_key]:
        return np.zeros((0, *image_shape), np.uint8), np.zeros((0,), np.int32)
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    images, labels = arrays[image_key], arrays[label_key].astype(np.int32)
    if with_id:
        order = canonical_order(arrays["id"])
        if order is not None:
            images, labels = images[order], labels[order]
    return images, labels


def load_tfds(
    name: str,
    *,
    data_dir: str | None = None,
    splits: tuple[str, ...] = ("train", "test"),
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """Loads splits of a prepared tfds image classification dataset into memory.

    Args:
      name: a tfds name, optionally with config and version, e.g. ``'cifar10'``,
        ``'cifar100'``, ``'svhn_cropped'``, ``'cifar10:3.0.2'``.
      data_dir: the tfds data folder (holding ``<name>/<version>/``); ``None`` uses the tfds
        default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      splits: the split names to read.

    Returns:
      ``(arrays, num_classes)``: ``arrays[split] = (images, labels)`` with ``uint8`` images
      ``(N, H, W, C)`` and ``int32`` labels ``(N,)``.

    Raises:
      DatasetError: the name is unknown, the dataset is not prepared under ``data_dir``, or it is
        not a fixed-size ``uint8`` image classification dataset.
    """
    _, tfds = import_tfds()
    builder = _builder(tfds, name, data_dir)
    info = builder.info
    supervised = info.supervised_keys
    if not supervised or len(supervised) != 2 or not all(isinstance(k, str) for k in supervised):
        raise DatasetError(
            f"tfds dataset {name!r} has no (image, label) supervised keys; "
            "use an image classification dataset such as cifar10 or cifar100"
        )
    image_key, label_key = supervised
    image_feature, label_feature = info.features[image_key], info.features[label_key]
    image_shape = tuple(image_feature.shape)
    if len(image_shape) != 3 or None in image_shape or image_feature.np_dtype != np.uint8:
        raise DatasetError(
            f"tfds dataset {name!r}: images of shape {image_shape} and dtype "
            f"{np.dtype(image_feature.np_dtype).name}; the in-memory pipeline needs fixed-size "
            "uint8 images (HWC): use a dataset such as cifar10 or resize it into a new tfds dataset"
        )
    num_classes = getattr(label_feature, "num_classes", None)
    if not num_classes:
        raise DatasetError(
            f"tfds dataset {name!r}: label feature {label_key!r} is not a ClassLabel; "
            "use an image classification dataset such as cifar10 or cifar100"
        )
    known_splits = list(info.splits.keys())
    if known_splits:  # Empty when tfds knows no metadata yet (e.g. under tfds.testing.mock_data).
        absent = [s for s in splits if s not in known_splits]
        if absent:
            raise DatasetError(
                f"tfds dataset {name!r} has no split(s) {', '.join(absent)} "
                f"(it has {', '.join(known_splits)}); choose a dataset with train and test splits"
            )
    with_id = "id" in info.features and isinstance(info.features["id"], tfds.features.Text)

    arrays = {}
    for split in splits:
        try:
            arrays[split] = _read_split(
                tfds, builder, split, image_key, label_key, with_id, image_shape
            )
        except AssertionError as e:  # tfds: "Dataset ...: could not find data in ..."
            raise DatasetError(
                f"tfds dataset {name!r} is not prepared in {builder.data_dir} and this code never "
                f"downloads: {_prepare_hint(name)}"
            ) from e
        images = arrays[split][0]
        if images.shape[1:] != image_shape:
            raise DatasetError(
                f"tfds dataset {name!r}, split {split!r}: images of shape {images.shape[1:]}, "
                f"expected {image_shape}; the prepared data is inconsistent: prepare it again"
            )
    return arrays, int(num_classes)
