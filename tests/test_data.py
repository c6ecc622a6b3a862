"""MNIST files are checked, prepared by TFDS without TensorFlow, and loaded whole to device."""

import gzip
import shutil

import numpy as np
import pytest

from bnlab import config, data, tfds_mnist

# Class counts of the standard MNIST splits (LeCun et al.; shared/data/mnist/README.md).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_read_idx_good_files(mnist_dir):
    images = data.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")
    labels = data.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == TEST_COUNTS


def test_read_idx_accepts_decompressed_files(mnist_dir, tmp_path):
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels = data.read_idx(raw, "t10k-labels-idx1-ubyte")
    assert np.bincount(labels).tolist() == TEST_COUNTS


def _copy_dir(mnist_dir, tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(mnist_dir, folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "checksum"),  # truncated .gz
        (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "checksum"),  # flipped byte
    ],
)
def test_damaged_gz_names_file_and_fix(mnist_dir, tmp_path, damage, message):
    folder = _copy_dir(mnist_dir, tmp_path)
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(data.DataError, match=message) as err:
        data.read_idx(path, "train-labels-idx1-ubyte")
    assert str(path) in str(err.value) and "Replace it" in str(err.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:-10], "truncated"),
        (lambda b: (9999).to_bytes(4, "big") + b[4:], "magic number 9999"),
        (lambda b: b[:-1] + bytes([(b[-1] + 1) % 256]), "content differs"),
    ],
)
def test_damaged_raw_file(mnist_dir, tmp_path, damage, message):
    raw = gzip.decompress((mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(damage(raw))
    with pytest.raises(data.DataError, match=message):
        data.read_idx(path, "t10k-labels-idx1-ubyte")


def test_missing_file_and_folder(mnist_dir, tmp_path):
    folder = _copy_dir(mnist_dir, tmp_path)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="t10k-images-idx3-ubyte.gz"):
        data.local_paths(folder)
    with pytest.raises(data.DataError, match="does not exist"):
        data.local_paths(tmp_path / "nowhere")


def test_prepare_fails_on_corrupt_file_and_writes_nothing_complete(mnist_dir, tmp_path):
    folder = _copy_dir(mnist_dir, tmp_path)
    bad = folder / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:1000])
    tfds_dir = tmp_path / "tfds"
    builder = tfds_mnist.BnlabMnist(
        mnist_dir=str(folder), data_dir=str(tfds_dir), file_format="array_record"
    )
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz"):
        builder.download_and_prepare()
    assert not (tfds_dir / "bnlab_mnist" / "1.0.0" / "dataset_info.json").exists()


def test_load_splits_match_idx_files(tfds_dir, mnist_dir):
    cfg = config.validate(
        config.apply_overrides(config.default_config(), {"data.tfds_dir": tfds_dir})
    )
    train = data.load(cfg.data, "train")
    test = data.load(cfg.data, "test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(np.asarray(train.labels)).tolist() == TRAIN_COUNTS
    # Same images as the IDX file, whatever order TFDS stored them in: compare per-class sums.
    images = data.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")
    labels = data.read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte")
    got_images, got_labels = np.asarray(test.images)[..., 0], np.asarray(test.labels)
    for k in range(10):
        expected = images[labels == k].astype(np.int64).sum(0)
        np.testing.assert_array_equal(got_images[got_labels == k].astype(np.int64).sum(0), expected)


def test_binary_task_and_subset(tfds_dir):
    overrides = {"data.tfds_dir": tfds_dir, "data.task": "binary01", "data.train_size": "1000"}
    cfg = config.validate(config.apply_overrides(config.default_config(), overrides))
    test = data.load(cfg.data, "test")
    assert set(np.unique(np.asarray(test.labels)).tolist()) == {0, 1}
    assert test.size == TEST_COUNTS[0] + TEST_COUNTS[1]
    assert data.load(cfg.data, "train").size == 1000
    assert data.num_classes("binary01") == 2


def test_to_float_range():
    x = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(np.asarray(data.to_float(x)), [[0.0, 1.0]])


def test_loading_does_not_import_tensorflow(tfds_dir):
    import sys

    cfg = config.validate(
        config.apply_overrides(config.default_config(), {"data.tfds_dir": tfds_dir})
    )
    data.load(cfg.data, "test")
    assert "tensorflow" not in sys.modules


def test_wrong_mnist_dir_fails_even_with_a_prepared_cache(tfds_dir, tmp_path):
    overrides = {"data.tfds_dir": tfds_dir, "data.mnist_dir": str(tmp_path / "nope")}
    cfg = config.validate(config.apply_overrides(config.default_config(), overrides))
    with pytest.raises(data.DataError, match="does not exist"):
        data.load(cfg.data, "test")


def test_train_size_larger_than_the_split_is_refused(tfds_dir):
    overrides = {"data.tfds_dir": tfds_dir, "data.task": "binary01", "data.train_size": "20000"}
    cfg = config.validate(config.apply_overrides(config.default_config(), overrides))
    with pytest.raises(config.ConfigError, match="exceeds the 12665 training examples"):
        data.load(cfg.data, "train")
