"""Tests for sadt_jax.data: IDX reader, tfds source, splits, batching and augmentation."""

import gzip
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sadt_jax import data
from sadt_jax.data import DatasetError, augment, fashion_mnist, pipeline, tfds_source

FMNIST_DIR = fashion_mnist.DEFAULT_DATA_DIR
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR),
    reason=f"{FMNIST_DIR} absent: `sudo apt-get install dataset-fashion-mnist` to run this test",
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- IDX / Fashion-MNIST


def _idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    header = bytes([0, 0, magic_type, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_gz(path, payload: bytes) -> str:
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return str(path)


def _write_fake_fmnist(folder, num_train=20, num_test=10, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", num_train), ("test", num_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        images_stem, labels_stem = fashion_mnist.FILES[split]
        _write_gz(folder / f"{images_stem}.gz", _idx_bytes(images))
        _write_gz(folder / f"{labels_stem}.gz", _idx_bytes(labels))
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture(scope="module")
def fmnist():
    if not os.path.isdir(FMNIST_DIR):
        pytest.skip(f"{FMNIST_DIR} absent: `sudo apt-get install dataset-fashion-mnist`")
    return data.load_dataset("fashion_mnist")


@needs_fmnist
def test_fashion_mnist_debian_files(fmnist):
    assert fmnist.train_images.shape == (60000, 28, 28, 1)
    assert fmnist.val_images.shape == (3000, 28, 28, 1)
    assert fmnist.test_images.shape == (7000, 28, 28, 1)
    assert fmnist.train_images.dtype == np.uint8
    for labels in (fmnist.train_labels, fmnist.val_labels, fmnist.test_labels):
        assert labels.dtype == np.int32
        assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(fmnist.train_labels).tolist() == [6000] * 10
    assert fmnist.num_classes == 10 and fmnist.image_shape == (28, 28, 1)
    # Upstream's first training labels: ankle boot, T-shirt, T-shirt, dress, T-shirt.
    assert fmnist.train_labels[:5].tolist() == [9, 0, 0, 3, 0]
    np.testing.assert_allclose(fmnist.mean, [0.2860 * 255], rtol=1e-3)
    np.testing.assert_allclose(fmnist.std, [0.3530 * 255], rtol=1e-3)
    assert fmnist.mean.dtype == np.float32 and fmnist.std.shape == (1,)
    with pytest.raises(ValueError):
        fmnist.train_images[0, 0, 0, 0] = 1  # Read-only.


@needs_fmnist
def test_fashion_mnist_does_not_import_tensorflow():
    code = (
        "import sys; from sadt_jax.data import load_dataset; "
        "d = load_dataset('fashion_mnist', max_train_examples=10); "
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; print(d.num_train)"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "10"


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write_gz(tmp_path / "x-idx3-ubyte.gz", _idx_bytes(array))
    np.testing.assert_array_equal(data.read_idx(path, expected_magic=0x803), array)
    raw = tmp_path / "y-idx1-ubyte"
    raw.write_bytes(_idx_bytes(np.arange(5, dtype=np.uint8)))
    np.testing.assert_array_equal(data.read_idx(str(raw)), np.arange(5))


def test_read_idx_truncated_payload_names_file(tmp_path):
    payload = _idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100]
    path = _write_gz(tmp_path / "train-images-idx3-ubyte.gz", payload)
    with pytest.raises(DatasetError, match="truncated") as e:
        data.read_idx(path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_read_idx_truncated_gzip_names_file(tmp_path):
    good = gzip.compress(_idx_bytes(np.ones((50, 28, 28), np.uint8)))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz"):
        data.read_idx(str(path))


def test_read_idx_rejects_bad_magic(tmp_path):
    path = _write_gz(tmp_path / "labels.gz", _idx_bytes(np.zeros((3,), np.uint8)))
    with pytest.raises(DatasetError, match="magic"):
        data.read_idx(path, expected_magic=0x803)
    bad = _write_gz(tmp_path / "bad.gz", b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetError, match="not an IDX file"):
        data.read_idx(bad)


def test_missing_fashion_mnist_dir(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as e:
        data.load_dataset("fashion_mnist", data_dir=missing)
    assert missing in str(e.value) and "--config.data.data_dir" in str(e.value)
    assert "\n" not in str(e.value)


def test_partly_missing_fashion_mnist_lists_files(tmp_path):
    _write_fake_fmnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        data.load_fashion_mnist(str(tmp_path))


def test_load_dataset_splits_on_fake_files(tmp_path):
    arrays = _write_fake_fmnist(tmp_path, num_train=20, num_test=10)
    ds = data.load_dataset(
        "fashion_mnist", data_dir=str(tmp_path), num_validation=4, max_train_examples=15
    )
    train_images, train_labels = arrays["train"]
    test_images, test_labels = arrays["test"]
    np.testing.assert_array_equal(ds.train_images[..., 0], train_images[:15])
    np.testing.assert_array_equal(ds.train_labels, train_labels[:15])
    np.testing.assert_array_equal(ds.val_images[..., 0], test_images[:4])  # Head of test.
    np.testing.assert_array_equal(ds.val_labels, test_labels[:4])
    np.testing.assert_array_equal(ds.test_images[..., 0], test_images[4:])
    np.testing.assert_array_equal(ds.test_labels, test_labels[4:])
    np.testing.assert_allclose(ds.mean, [train_images[:15].mean()], rtol=1e-5)
    np.testing.assert_allclose(ds.std, [train_images[:15].std()], rtol=1e-5)
    assert (ds.num_train, ds.num_val, ds.num_test) == (15, 4, 6)

    no_val = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), num_validation=0)
    assert no_val.val_images.shape == (0, 28, 28, 1) and no_val.num_test == 10
    with pytest.raises(DatasetError, match="num_validation"):
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path), num_validation=10)


def test_release_split_leaves_one_test_image_out(tmp_path):
    # The release: validation = test images 0..V-1, test = V+1..end (image V unused).
    arrays = _write_fake_fmnist(tmp_path, num_train=20, num_test=10)
    ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), num_validation=4, test_skip=1)
    test_images, test_labels = arrays["test"]
    np.testing.assert_array_equal(ds.val_images[..., 0], test_images[:4])
    np.testing.assert_array_equal(ds.test_images[..., 0], test_images[5:])
    np.testing.assert_array_equal(ds.test_labels, test_labels[5:])
    assert (ds.num_val, ds.num_test) == (4, 5)
    with pytest.raises(DatasetError, match="test_skip"):
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path), num_validation=9, test_skip=1)
    with pytest.raises(DatasetError, match="negative"):
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path), test_skip=-1)


def test_max_test_examples_keeps_the_first_test_images(tmp_path):
    arrays = _write_fake_fmnist(tmp_path, num_train=20, num_test=10)
    ds = data.load_dataset(
        "fashion_mnist", data_dir=str(tmp_path), num_validation=4, test_skip=1, max_test_examples=3
    )
    test_images, _ = arrays["test"]
    np.testing.assert_array_equal(ds.val_images[..., 0], test_images[:4])
    np.testing.assert_array_equal(ds.test_images[..., 0], test_images[5:8])
    more_than_there_are = data.load_dataset(
        "fashion_mnist", data_dir=str(tmp_path), num_validation=4, max_test_examples=100
    )
    assert more_than_there_are.num_test == 6
    with pytest.raises(DatasetError, match="max_test_examples"):
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path), max_test_examples=0)


def test_normalization_constants(tmp_path):
    _write_fake_fmnist(tmp_path)
    ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), num_validation=4)
    mean, std = data.normalization_constants(ds, "standardize")
    assert mean is ds.mean and std is ds.std
    mean, std = data.normalization_constants(ds, "scale")
    images = ds.train_images[:3]
    # The release's float32(x) / 255, up to XLA's division rounding (1 ulp).
    np.testing.assert_allclose(
        augment.normalize(images, mean, std), images.astype(np.float32) / 255, rtol=2e-7
    )
    with pytest.raises(ValueError, match="standardize, scale"):
        data.normalization_constants(ds, "minmax")


def test_fake_files_label_count_mismatch(tmp_path):
    _write_fake_fmnist(tmp_path)
    _write_gz(tmp_path / "train-labels-idx1-ubyte.gz", _idx_bytes(np.zeros((7,), np.uint8)))
    with pytest.raises(DatasetError, match="20 images but .* 7 labels"):
        data.load_fashion_mnist(str(tmp_path))


# ----------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tfds():
    _, tfds = tfds_source.import_tfds()
    return tfds


def test_tfds_mock_cifar10(tfds):
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset("cifar10", num_validation=5)
        arrays, num_classes = data.load_tfds("cifar10")
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.val_images.shape == (5, 32, 32, 3)
    assert ds.test_images.shape == (7, 32, 32, 3)
    assert ds.train_labels.dtype == np.int32 and ds.num_classes == num_classes == 10
    assert ds.image_shape == (32, 32, 3) and ds.mean.shape == ds.std.shape == (3,)
    test_images, test_labels = arrays["test"]
    np.testing.assert_array_equal(ds.val_images, test_images[:5])
    np.testing.assert_array_equal(ds.val_labels, test_labels[:5])
    np.testing.assert_array_equal(ds.test_images, test_images[5:])


def test_tfds_restores_original_order_from_ids(tfds):
    import tensorflow as tf

    n = 9
    shuffled = np.random.default_rng(0).permutation(n)

    def as_dataset(self, split, **kwargs):
        del self, kwargs
        return tf.data.Dataset.from_tensor_slices(
            {
                "id": [f"{split}_{i:05d}".encode() for i in shuffled],
                "image": np.stack([np.full((32, 32, 3), i, np.uint8) for i in shuffled]),
                "label": (shuffled % 10).astype(np.int64),
            }
        )

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        ds = data.load_dataset("cifar10", num_validation=3)
    assert ds.val_images[:, 0, 0, 0].tolist() == [0, 1, 2]
    assert ds.test_images[:, 0, 0, 0].tolist() == list(range(3, n))
    assert ds.train_labels.tolist() == list(range(n))


def test_canonical_order():
    order = tfds_source.canonical_order(np.array([b"test_00002", b"test_00000", b"test_00001"]))
    assert order.tolist() == [1, 2, 0]
    assert tfds_source.canonical_order(np.array([b"test_00002", b"test_00000"])) is None
    assert tfds_source.canonical_order(np.array([b"\x8a\xff random", b"x"])) is None


def test_tfds_unprepared_fails_fast_without_download(tfds, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("download_and_prepare must never be called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    start = time.monotonic()
    with pytest.raises(DatasetError, match="not prepared") as e:
        data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert "tfds build cifar10" in message and "download_and_prepare()" in message
    assert "--config.data.data_dir" in message and str(tmp_path) in message
    assert "\n" not in message


def test_tfds_unknown_name_lists_valid_names(tfds, tmp_path):
    with pytest.raises(DatasetError, match="cifar10") as e:
        data.load_dataset("cifar1O", data_dir=str(tmp_path))
    assert "unknown dataset" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- pipeline


def test_train_batch_indices_deterministic_and_epoch_dependent():
    a = pipeline.train_batch_indices(103, 10, seed=3, epoch=0)
    assert a.shape == (10, 10) and a.dtype == np.int64
    np.testing.assert_array_equal(a, pipeline.train_batch_indices(103, 10, seed=3, epoch=0))
    assert len(np.unique(a)) == 100 and a.min() >= 0 and a.max() < 103
    assert not np.array_equal(a, pipeline.train_batch_indices(103, 10, seed=3, epoch=1))
    assert not np.array_equal(a, pipeline.train_batch_indices(103, 10, seed=4, epoch=0))
    assert pipeline.steps_per_epoch(103, 10) == 10


@pytest.mark.parametrize("process_count", [2, 4])
def test_train_batch_indices_processes_partition_global_batch(process_count):
    full = pipeline.train_batch_indices(1000, 64, seed=0, epoch=2)
    parts = [
        pipeline.train_batch_indices(
            1000, 64, seed=0, epoch=2, process_index=p, process_count=process_count
        )
        for p in range(process_count)
    ]
    assert all(p.shape == (15, 64 // process_count) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    for i in range(process_count):
        for j in range(i + 1, process_count):
            assert not set(parts[i].ravel()) & set(parts[j].ravel())


def test_train_batch_indices_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        pipeline.train_batch_indices(100, 10, seed=0, epoch=0, process_count=3)
    with pytest.raises(ValueError, match="exceeds"):
        pipeline.train_batch_indices(5, 10, seed=0, epoch=0)


def test_train_batches_resume_mid_epoch():
    images = np.arange(50)[:, None] * np.ones((1, 3), np.int64)
    labels = np.arange(50)
    full = list(pipeline.train_batches(images, labels, 8, seed=1, epoch=0))
    resumed = list(pipeline.train_batches(images, labels, 8, seed=1, epoch=0, start_step=4))
    assert len(full) == 6 and len(resumed) == 2
    np.testing.assert_array_equal(resumed[0]["label"], full[4]["label"])
    np.testing.assert_array_equal(full[0]["image"][:, 0], full[0]["label"])


@pytest.mark.parametrize("num_examples,process_count", [(23, 1), (23, 2), (24, 4), (3, 4), (0, 2)])
def test_eval_batches_cover_every_example_once(num_examples, process_count):
    images = np.arange(1, num_examples + 1, dtype=np.float32)[:, None, None, None] * np.ones(
        (1, 2, 2, 1), np.float32
    )
    labels = np.arange(num_examples, dtype=np.int32)
    per_process = [
        list(pipeline.eval_batches(images, labels, 8, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    num_batches = pipeline.num_eval_batches(num_examples, 8)
    seen = []
    for batches in per_process:
        assert len(batches) == num_batches
        for b in batches:
            assert b["image"].shape == (8 // process_count, 2, 2, 1)
            assert b["label"].shape == b["mask"].shape == (8 // process_count,)
            assert b["mask"].dtype == bool
            assert np.all(b["image"][~b["mask"]] == 0) and np.all(b["label"][~b["mask"]] == 0)
            np.testing.assert_array_equal(b["image"][b["mask"], 0, 0, 0], b["label"][b["mask"]] + 1)
            seen.extend(b["label"][b["mask"]].tolist())
    assert sorted(seen) == list(range(num_examples))


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("shape", [(16, 28, 28, 1), (16, 32, 32, 3)])
def test_cutmix_label_weights_equal_pasted_pixel_fraction(shape):
    batch = shape[0]
    # Image i is constant with value i and class i: pixel values identify the source example.
    images = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None, None], shape)
    labels = augment.one_hot(jnp.arange(batch), batch)
    fn = jax.jit(lambda k, x, y: augment.cutmix(k, x, y, alpha=0.25))
    partial = 0
    for seed in range(5):
        mixed, soft = fn(jax.random.key(seed), images, labels)
        assert mixed.shape == shape and mixed.dtype == images.dtype
        assert soft.shape == (batch, batch) and soft.dtype == jnp.float32
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
        mixed = np.asarray(mixed)
        # Every channel comes from the same example at a given pixel.
        assert np.all(mixed == mixed[..., :1])
        fractions = np.stack([(mixed[..., 0] == c).mean(axis=(1, 2)) for c in range(batch)], 1)
        np.testing.assert_allclose(soft, fractions, atol=1e-6)
        partial += int(np.sum((fractions > 0) & (fractions < 1)))
    assert partial > 0  # Some boxes were neither empty nor the whole image.


def test_cutmix_determinism_and_dtype():
    key = jax.random.key(7)
    images = jax.random.randint(key, (8, 32, 32, 3), 0, 256).astype(jnp.uint8)
    labels = augment.one_hot(jnp.arange(8) % 10, 10)
    a_img, a_lab = augment.cutmix(key, images, labels, alpha=0.25)
    b_img, b_lab = augment.cutmix(key, images, labels, alpha=0.25)
    assert a_img.dtype == jnp.uint8
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, _ = augment.cutmix(key, images, labels, alpha=1.0)
    d_img, _ = augment.cutmix(jax.random.key(8), images, labels, alpha=0.25)
    assert not np.array_equal(a_img, c_img) or not np.array_equal(a_img, d_img)
    with pytest.raises(ValueError, match="alpha"):
        augment.cutmix(key, images, labels, alpha=0.0)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_random_crop_flip(pad_mode):
    images = jax.random.randint(jax.random.key(0), (6, 32, 32, 3), 0, 256).astype(jnp.uint8)
    out = jax.jit(lambda k, x: augment.random_crop_flip(k, x, padding=4, pad_mode=pad_mode))(
        jax.random.key(1), images
    )
    assert out.shape == images.shape and out.dtype == jnp.uint8
    padded = np.pad(np.asarray(images), ((0, 0), (4, 4), (4, 4), (0, 0)), mode=pad_mode)
    out = np.asarray(out)
    for i in range(images.shape[0]):
        windows = [padded[i, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
        assert any(np.array_equal(out[i], w) or np.array_equal(out[i], w[:, ::-1]) for w in windows)
    same = augment.random_crop_flip(jax.random.key(1), images, padding=4, pad_mode=pad_mode)
    np.testing.assert_array_equal(out, same)
    flip_only = np.asarray(augment.random_crop_flip(jax.random.key(2), images, padding=0))
    for i in range(images.shape[0]):
        assert np.array_equal(flip_only[i], images[i]) or np.array_equal(
            flip_only[i], np.asarray(images[i])[:, ::-1]
        )


def test_normalize_and_one_hot():
    images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    mean, std = data.channel_stats(images)
    np.testing.assert_allclose(mean, images.reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, images.reshape(-1, 3).std(0), rtol=1e-5)
    out = augment.normalize(images, mean, std)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_allclose(np.asarray(out).reshape(-1, 3).mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out).reshape(-1, 3).std(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(augment.one_hot(jnp.array([0, 2]), 3), [[1, 0, 0], [0, 0, 1]])
