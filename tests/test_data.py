"""MNIST files are checked, prepared by TFDS without TensorFlow, and loaded whole to device."""

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from bnlab import config, data
from bnlab.data import mnist_arrays, tfds_mnist

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


# The whole-array copy (bnlab.data.mnist_arrays) that runs read instead of TFDS's records.


def _data_dir(tfds_dir, tmp_path, *, with_copy):
    """A TFDS data dir holding the session's prepared dataset, with or without its copy."""
    data_dir = tmp_path / "tfds"
    shutil.copytree(mnist_arrays.dataset_dir(Path(tfds_dir)), mnist_arrays.dataset_dir(data_dir))
    if with_copy:
        shutil.copytree(mnist_arrays.arrays_dir(Path(tfds_dir)), mnist_arrays.arrays_dir(data_dir))
    return data_dir


def _load(data_dir, mnist_dir, split="test"):
    data._load_numpy.cache_clear()  # a fresh process would not remember earlier loads
    overrides = {"data.tfds_dir": str(data_dir), "data.mnist_dir": str(mnist_dir)}
    cfg = config.validate(config.apply_overrides(config.default_config(), overrides))
    return data.load(cfg.data, split)


def _no_tfds(*args, **kwargs):
    raise AssertionError("read the TFDS records although the array copy is valid")


def test_array_copy_equals_the_tfds_records(tfds_dir):
    arrays = mnist_arrays.read(Path(tfds_dir), None)
    builder = tfds_mnist.BnlabMnist(data_dir=tfds_dir, file_format="array_record")
    for split, picks in (("test", range(10000)), ("train", range(0, 60000, 7))):
        source = builder.as_data_source(split=split)
        assert len(source) == len(arrays[split][1])
        records = source.__getitems__(list(picks))
        images, labels = arrays[split]
        np.testing.assert_array_equal(images[list(picks)], np.stack([r["image"] for r in records]))
        np.testing.assert_array_equal(labels[list(picks)], [r["label"] for r in records])
        assert images.dtype == np.uint8 and labels.dtype == np.int32


def test_array_copy_is_written_once_and_says_where(
    tfds_dir, mnist_dir, tmp_path, capfd, monkeypatch
):
    data_dir = _data_dir(tfds_dir, tmp_path, with_copy=False)
    test = _load(data_dir, mnist_dir)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("bnlab:")]
    assert len(lines) == 1, lines
    assert str(mnist_arrays.dataset_dir(data_dir)) in lines[0]
    assert str(mnist_arrays.arrays_dir(data_dir)) in lines[0]
    assert "Unknown size" not in capfd.readouterr().out
    monkeypatch.setattr(tfds_mnist, "read_splits", _no_tfds)
    again = _load(data_dir, mnist_dir)
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(test.images))
    assert "bnlab:" not in capfd.readouterr().err  # said once, when written


def test_changed_source_file_is_checked_again(tfds_dir, mnist_dir, tmp_path, monkeypatch):
    data_dir = _data_dir(tfds_dir, tmp_path, with_copy=False)
    folder = _copy_dir(mnist_dir, tmp_path)
    _load(data_dir, folder)  # writes the copy, recording the files' sizes and times
    monkeypatch.setattr(tfds_mnist, "read_splits", _no_tfds)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    _load(data_dir, folder)  # same content, new time: checked, accepted, recorded
    manifest = json.loads((mnist_arrays.arrays_dir(data_dir) / "manifest.json").read_text())
    assert manifest["sources"]["t10k-labels-idx1-ubyte"][2] == path.stat().st_mtime_ns
    path.write_bytes(path.read_bytes()[:-100])  # damaged after the copy was made
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz"):
        _load(data_dir, folder, "train")


def test_reprepared_dataset_or_damaged_copy_is_rebuilt(tfds_dir, mnist_dir, tmp_path):
    data_dir = _data_dir(tfds_dir, tmp_path, with_copy=True)
    assert mnist_arrays.read(data_dir, str(mnist_dir)) is not None
    info = mnist_arrays.dataset_dir(data_dir) / "dataset_info.json"
    info.write_text(info.read_text())  # TFDS prepared it again: the copy may be stale
    assert mnist_arrays.read(data_dir, str(mnist_dir)) is None
    arrays = mnist_arrays.read(Path(tfds_dir), None)
    mnist_arrays.write(data_dir, str(mnist_dir), arrays)
    assert mnist_arrays.read(data_dir, str(mnist_dir)) is not None
    (mnist_arrays.arrays_dir(data_dir) / "train_labels.npy").write_bytes(b"truncated")
    assert mnist_arrays.read(data_dir, str(mnist_dir)) is None


def _damage_labels(data_dir, split="train"):
    """Overwrites the first half of a split's labels in the copy with 0, the header intact."""
    labels = np.load(mnist_arrays.arrays_dir(data_dir) / f"{split}_labels.npy", mmap_mode="r+")
    labels[: len(labels) // 2] = 0
    labels.flush()


def test_damaged_array_copy_is_copied_again_and_says_so(tfds_dir, mnist_dir, tmp_path, capfd):
    data_dir = _data_dir(tfds_dir, tmp_path, with_copy=True)
    _damage_labels(data_dir)
    capfd.readouterr()
    train = _load(data_dir, mnist_dir, "train")
    assert np.bincount(np.asarray(train.labels)).tolist() == TRAIN_COUNTS
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("bnlab:")]
    assert len(lines) == 1 and "damaged" in lines[0] and "train_labels.npy" in lines[0], lines
    assert mnist_arrays.read_checked(data_dir, str(mnist_dir))[1] is None  # rewritten whole
    _damage_labels(data_dir, "test")
    arrays, damage = mnist_arrays.read_checked(data_dir, str(mnist_dir))
    assert arrays is None and "test_labels.npy" in damage and "CRC-32" in damage
    assert mnist_arrays.read(data_dir, str(mnist_dir), ("train",)) is not None  # intact split


def test_a_copy_of_the_old_format_is_rewritten_with_checksums(tfds_dir, mnist_dir, tmp_path):
    data_dir = _data_dir(tfds_dir, tmp_path, with_copy=True)
    path = mnist_arrays.arrays_dir(data_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    assert sorted(manifest["files"]) == sorted(f"{s}_{k}.npy" for s in data.SPLITS
                                               for k in ("images", "labels"))  # fmt: skip
    old = {k: v for k, v in manifest.items() if k != "files"}
    path.write_text(json.dumps({**old, "format": 1}))
    assert mnist_arrays.read_checked(data_dir, str(mnist_dir)) == (None, None)  # stale, quietly
    _load(data_dir, mnist_dir)
    assert json.loads(path.read_text()) == manifest


PREPARE = """
import sys
from bnlab import config, data
overrides = {"data.tfds_dir": sys.argv[1]}
cfg = config.validate(config.apply_overrides(config.default_config(), overrides))
print(data.load(cfg.data, "test").size)
"""


def _preparing(data_dir):
    """A process that loads MNIST from `data_dir` (preparing it there if needed), its stderr a
    pipe as in a log file."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", PREPARE, str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_the_first_preparation_off_a_terminal_logs_one_line(tmp_path):
    """No TFDS progress bars (control characters) and no absl warnings in a log file: one
    bnlab line, on its own line."""
    process = _preparing(tmp_path / "tfds")
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    assert out.split() == ["10000"]
    assert "\x1b" not in err and "\r" not in err and "absl" not in err, err[-2000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnlab: prepared MNIST once from "), err


@pytest.mark.slow
def test_two_processes_preparing_at_once_both_succeed(tmp_path):
    """Multi-process runs and sweep shards start together on an empty TFDS folder: one
    prepares, the other waits for it and reads the copy it wrote."""
    processes = [_preparing(tmp_path / "tfds") for _ in range(2)]
    results = [p.communicate(timeout=600) for p in processes]
    for p, (out, err) in zip(processes, results, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.split() == ["10000"]
    said = [line for _, err in results for line in err.splitlines() if line.startswith("bnlab:")]
    prepared = [line for line in said if "prepared MNIST once" in line]
    assert len(prepared) == 1 and all("waiting for another process" in s for s in said
                                      if s not in prepared), said  # fmt: skip
