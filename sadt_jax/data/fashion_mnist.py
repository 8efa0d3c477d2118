"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, read without TensorFlow.

The package installs the four original IDX files, gzip-compressed, under
``/usr/share/datasets/fashion-mnist``. Their gzip headers differ from the upstream downloads,
so tensorflow-datasets' checksums reject them; this module parses them directly with
:mod:`gzip` and NumPy instead, and checks every header (magic number, rank, dimensions) and that
the payload length matches the header, so a truncated or corrupt file fails loudly.

IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, one byte with the
element type (``0x08`` = unsigned byte), one byte with the rank ``n``, ``n`` big-endian uint32
dimensions, then the row-major payload.

References:
  Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine
  Learning Algorithms", arXiv 1708.07747, 2017.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from sadt_jax.data.errors import DatasetError

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)

# split -> (images file, labels file), without the ".gz" suffix.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_INSTALL_HINT = (
    "install them with `sudo apt-get install dataset-fashion-mnist` or set --config.data.data_dir"
)
_REINSTALL_HINT = (
    "the file is corrupt or incomplete: reinstall it with "
    "`sudo apt-get install --reinstall dataset-fashion-mnist` or replace it with a good copy"
)

# IDX element-type byte -> NumPy dtype (multi-byte types are big-endian).
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot decompress ({e}); {_REINSTALL_HINT}") from e
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e}); check the file and its permissions") from e


def read_idx(path: str, *, expected_magic: int | None = None) -> np.ndarray:
    """Reads one IDX file (optionally gzip-compressed) into a NumPy array.

    Args:
      path: file name; a name ending in ``.gz`` is decompressed with :mod:`gzip`.
      expected_magic: if given, the 32-bit magic number the file must start with, e.g.
        ``0x00000803`` for a rank-3 uint8 array (images) or ``0x00000801`` for a rank-1 uint8
        array (labels).

    Returns:
      The array, with the shape from the header and the element type in native byte order.

    Raises:
      DatasetError: the file cannot be read or decompressed, its header is invalid or not the
        expected one, or the payload is shorter or longer than the header says; the message
        names the file.
    """
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX file ({len(data)} bytes); {_REINSTALL_HINT}")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
        raise DatasetError(
            f"{path}: not an IDX file (magic number {magic:#010x}); {_REINSTALL_HINT}"
        )
    if expected_magic is not None and magic != expected_magic:
        raise DatasetError(
            f"{path}: unexpected IDX magic number {magic:#010x} (expected {expected_magic:#010x}); "
            "the file holds another kind of array: check that the file names are not swapped"
        )
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: truncated IDX header; {_REINSTALL_HINT}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes in"
        raise DatasetError(
            f"{path}: {what} IDX file: header says shape {shape} ({expected} bytes of payload) "
            f"but the file has {actual}; {_REINSTALL_HINT}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _find(data_dir: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    return None


def load_fashion_mnist(data_dir: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Loads the Fashion-MNIST train and test splits into memory.

    Args:
      data_dir: folder with the four IDX files (``train-images-idx3-ubyte.gz``,
        ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
        ``t10k-labels-idx1-ubyte.gz``; uncompressed copies without ``.gz`` also work).
        Defaults to ``/usr/share/datasets/fashion-mnist``, where the Debian package
        ``dataset-fashion-mnist`` installs them.

    Returns:
      ``{'train': (images, labels), 'test': (images, labels)}`` with images ``uint8`` of shape
      ``(N, 28, 28, 1)`` and labels ``int32`` of shape ``(N,)`` in ``[0, 10)``; N is 60000 for
      train and 10000 for test, in the order of the files.

    Raises:
      DatasetError: a file is missing, unreadable, truncated or inconsistent.
    """
    data_dir = DEFAULT_DATA_DIR if data_dir is None else os.fspath(data_dir)
    stems = [stem for pair in FILES.values() for stem in pair]
    paths = {stem: _find(data_dir, stem) for stem in stems}
    missing = [stem + ".gz" for stem, path in paths.items() if path is None]
    if len(missing) == len(stems):
        raise DatasetError(f"Fashion-MNIST files not found in {data_dir}: {_INSTALL_HINT}")
    if missing:
        raise DatasetError(
            f"Fashion-MNIST files missing in {data_dir}: {', '.join(missing)}; {_INSTALL_HINT}"
        )

    splits = {}
    for split, (images_stem, labels_stem) in FILES.items():
        images_path, labels_path = paths[images_stem], paths[labels_stem]
        images = read_idx(images_path, expected_magic=0x00000803)
        labels = read_idx(labels_path, expected_magic=0x00000801)
        if images.shape[1:] != IMAGE_SHAPE[:2]:
            raise DatasetError(
                f"{images_path}: images of shape {images.shape[1:]}, expected {IMAGE_SHAPE[:2]}; "
                "this is not Fashion-MNIST: point --config.data.data_dir at the right folder"
            )
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{images_path} has {images.shape[0]} images but {labels_path} has "
                f"{labels.shape[0]} labels; {_REINSTALL_HINT}"
            )
        if labels.size and labels.max() >= NUM_CLASSES:
            raise DatasetError(
                f"{labels_path}: label {int(labels.max())} out of range [0, {NUM_CLASSES}); "
                f"{_REINSTALL_HINT}"
            )
        splits[split] = (images[..., None], labels.astype(np.int32))
    return splits
