"""jaxprune.data: shapes, fixed splits, checksums, both on-disk formats of the real data, clear errors."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from jaxprune import data

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # shared/data/README.md
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_digits_is_embedded_with_a_fixed_disjoint_split():
    tr, te = data.load("digits", "train"), data.load("digits", "test")
    assert tr.images.shape == (1437, 8, 8, 1) and te.images.shape == (360, 8, 8, 1)
    assert tr.images.dtype == np.float32 and tr.labels.dtype == np.int32 and tr.num_classes == 10
    assert 0.0 == tr.images.min() and tr.images.max() == 1.0
    assert np.bincount(np.concatenate([tr.labels, te.labels])).sum() == 1797
    # fixed split: the same on every call, and no test image appears in train
    np.testing.assert_array_equal(data.load("digits", "train").labels, tr.labels)
    trs = {x.tobytes() for x in tr.images}
    assert sum(x.tobytes() in trs for x in te.images) <= 5  # the UCI set has a few exact duplicate images


@pytest.mark.parametrize("name,n,classes", [("moons", 2000, 2), ("circles", 2000, 2), ("spiral", 4000, 4)])
def test_toys_are_seeded(name, n, classes):
    a = data.load(name, "train", seed=3)
    assert a.images.shape == (n, 2) and a.num_classes == classes
    assert sorted(np.unique(a.labels)) == list(range(classes))
    np.testing.assert_array_equal(a.images, data.load(name, "train", seed=3).images)
    assert not np.allclose(a.images, data.load(name, "train", seed=4).images)
    assert not np.allclose(a.images, data.load(name, "test", seed=3).images)
    assert data.load(name, "train", seed=3, num_examples=100).images.shape == (100, 2)


def test_circles_geometry():
    x, y = data.load("circles", "train", seed=0)[:2]
    r = np.linalg.norm(x, axis=1)
    # factor 0.3: inner circle radius 0.3, outer 1.0 (noise 0.1)
    assert abs(np.median(r[y == 1]) - 0.3) < 0.05 and abs(np.median(r[y == 0]) - 1.0) < 0.05


def test_mnist_from_idx_files(data_dir):
    tr = data.load("mnist", "train", data_dir)
    te = data.load("mnist", "test", data_dir)
    assert tr.images.shape == (60000, 28, 28, 1) and te.images.shape == (10000, 28, 28, 1)
    assert np.bincount(tr.labels).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(te.labels).tolist() == MNIST_TEST_COUNTS
    assert abs(tr.images.mean() * 255 - 33.32) < 0.01 and abs(te.images.mean() * 255 - 33.79) < 0.01


def test_fashion_mnist_from_tfds_prepared_dir_matches_idx_and_is_cached(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    tfds_dir = data_dir / "tensorflow_datasets"  # holds no IDX files: forces the TFDS reader
    te = data.load("fashion_mnist", "test", tfds_dir)
    assert te.images.shape == (10000, 28, 28, 1) and te.num_classes == 10
    assert np.bincount(te.labels).tolist() == [1000] * 10
    idx = data.load("fashion_mnist", "test", data_dir)
    # same (image, label) pairs in another order: compare order-free fingerprints
    key = lambda d: sorted(zip((d.images.reshape(len(d.labels), -1) * 255).round().astype(np.int64).sum(1).tolist(),
                               d.labels.tolist()))
    assert key(te) == key(idx)
    assert len(list((tmp_path / "cache").glob("fashion_mnist-test-*.npz"))) == 1
    again = data.load("fashion_mnist", "test", tfds_dir)  # from the cache
    np.testing.assert_array_equal(again.images, te.images)


def _copy_mnist(data_dir, tmp_path):
    dst = tmp_path / "mnist"
    shutil.copytree(data_dir / "mnist", dst)
    return dst


def test_checksum_mismatch_names_the_file(data_dir, tmp_path):
    d = _copy_mnist(data_dir, tmp_path)
    f = d / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(f.read_bytes())
    f.write_bytes(gzip.compress(raw[:-1] + bytes([(raw[-1] + 1) % 256])))
    with pytest.raises(data.DataError, match=r"checksum mismatch.*t10k-labels-idx1-ubyte\.gz.*expected ec29112d"):
        data.load("mnist", "test", tmp_path)


def test_missing_file_is_named(data_dir, tmp_path):
    d = _copy_mnist(data_dir, tmp_path)
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match=r"missing file .*t10k-images-idx3-ubyte\.gz"):
        data.load("mnist", "test", tmp_path)


def test_unknown_name_and_split():
    with pytest.raises(data.DataError, match=r"name='no_such_set'.*unknown dataset"):
        data.load("no_such_set", "train", "/nonexistent")
    with pytest.raises(data.DataError, match=r"split='validation'"):
        data.load("digits", "validation")


def test_unprepared_tfds_dataset_explains_how_to_get_it(tmp_path):
    try:
        import tensorflow  # noqa: F401
        pytest.skip("TensorFlow is installed: the dataset would be built (needs network)")
    except ImportError:
        pass
    with pytest.raises(data.DataError, match=r"name='cifar10'.*not prepared.*tfds-build.*download_and_prepare"):
        data.load("cifar10", "train", tmp_path)


def test_transforms():
    x = np.array([0.0, 0.5, 1.0], np.float32)
    np.testing.assert_allclose(data.scale_to_unit_range(x), [-1, 0, 1])
    z = data.standardize(x)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
