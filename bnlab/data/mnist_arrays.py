"""Whole-split numpy copies of the prepared TFDS MNIST, read instead of its 70,000 records.

TFDS stores each example as one serialized record; deserializing them one by one takes seconds
on every run. The first run therefore copies each split, as TFDS gives it (same order, same
values), into two `.npy` files beside the TFDS dataset, and later runs read those:

    <TFDS data dir>/bnlab_mnist/1.0.0/          the TFDS dataset (the source of truth)
    <TFDS data dir>/bnlab_mnist_arrays/1.0.0/   {split}_images.npy, {split}_labels.npy,
                                                manifest.json

`manifest.json` records what the copy was made from, and a copy is used only while that
still holds: the builder version, the size and modification time of every file of the TFDS
dataset (re-preparing it invalidates the copy), and of the local IDX files (`data.mnist_dir`)
that were checked. When an IDX file's size or time changes, all four are checked again
(`idx.read_idx`: header, size, SHA-256), so a damaged file fails instead of training silently
from the copy. Data that TFDS downloaded itself (no `data.mnist_dir`) was checked when the
dataset was prepared; the prepared dataset is then what is read. The manifest also records
each `.npy` file's size and the CRC-32 of its array data, checked on every read (about 30 ms
for the 55 MB of both splits from the page cache; `zlib.crc32`, as fast as adler32 here and
4x faster than blake2b): a copy damaged on disk, even with its header intact, is copied again
from the TFDS dataset, saying so, instead of training or evaluating on wrong labels or
pixels. Deleting the folder is safe: the next run writes it again.

The first preparation in a TFDS data dir holds a lock (`preparing`): processes started
together (the processes of a multi-host run, sweep shards) wait for the one that prepares,
then read its copy.

numpy only, so that a run with a valid copy imports neither TFDS nor its dependencies.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from bnlab.data.idx import SPLITS, local_paths, read_idx

TFDS_NAME = "bnlab_mnist"  # the TFDS builder's name (`tfds_mnist.BnlabMnist`)
TFDS_VERSION = "1.0.0"  # its version: a new version is a new dataset and a new copy
ARRAYS_NAME = f"{TFDS_NAME}_arrays"
FORMAT = 2  # of the files below; bump it to invalidate every copy (2: sizes and CRC-32s)
TFDS_DATA_DIR_ENV = "TFDS_DATA_DIR"
LOCK_NAME = ".bnlab_mnist.lock"  # in the TFDS data dir, held while MNIST is prepared there

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8[N,28,28,1], int32[N])


def tfds_data_dir(tfds_dir: str | os.PathLike | None) -> Path:
    """The TFDS data dir as TFDS resolves it, without importing TFDS.

    Args:
      tfds_dir: `data.tfds_dir`; None or "" for TFDS's default.

    Returns:
      `tfds_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`, user-expanded.
    """
    if tfds_dir:
        return Path(tfds_dir).expanduser()
    default = Path("~") / "tensorflow_datasets"
    return Path(os.environ.get(TFDS_DATA_DIR_ENV) or default).expanduser()


def dataset_dir(data_dir: Path) -> Path:
    return data_dir / TFDS_NAME / TFDS_VERSION


def arrays_dir(data_dir: Path) -> Path:
    return data_dir / ARRAYS_NAME / TFDS_VERSION


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _prepared_files(data_dir: Path) -> dict[str, list[int]]:
    """Size and modification time of every file of the prepared TFDS dataset."""
    folder = dataset_dir(data_dir)
    return {p.name: _stat(p) for p in sorted(folder.iterdir()) if p.is_file()}


def sources(mnist_dir: str | None) -> dict[str, list]:
    """The local IDX files (path, size, modification time); {} when TFDS downloaded them."""
    if mnist_dir is None:
        return {}
    return {name: [str(path), *_stat(path)] for name, path in local_paths(mnist_dir).items()}


def read(
    data_dir: Path, mnist_dir: str | None, splits: Sequence[str] = tuple(SPLITS)
) -> Arrays | None:
    """`splits` from the copy in `data_dir`, if it still matches what it was made from
    (`read_checked` without the reason)."""
    return read_checked(data_dir, mnist_dir, splits)[0]


def read_checked(
    data_dir: Path, mnist_dir: str | None, splits: Sequence[str] = tuple(SPLITS)
) -> tuple[Arrays | None, str | None]:
    """`splits` from the copy in `data_dir`, if it still matches what it was made from, each
    file's size and checksum checked.

    Args:
      data_dir: the TFDS data dir (`tfds_data_dir`).
      mnist_dir: the local IDX folder the dataset comes from, or None (TFDS downloaded it).
      splits: the splits to read and check.

    Returns:
      `({split: (images, labels)}, None)` as read-only memory maps, or `(None, damage)` when
      there is no valid copy: the caller rebuilds it from TFDS. `damage` says what is wrong
      with a damaged copy (a file missing, of another size, shape or checksum); it is None
      when there is no copy, or one made by an older bnlab or from another TFDS dataset.

    Raises:
      DataError: a local IDX file changed (size or time) since the copy was made and fails
        its checks (header, size, SHA-256); a file that passes is recorded anew.
    """
    folder = arrays_dir(data_dir)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"manifest.json unreadable: {err}"
    try:
        stale = (manifest.get("format"), manifest.get("version")) != (FORMAT, TFDS_VERSION)
        stale = stale or manifest.get("prepared") != _prepared_files(data_dir)
    except OSError:  # no TFDS dataset beside it
        return None, None
    if stale:
        return None, None
    now = sources(mnist_dir)
    if now and manifest.get("sources") != now:
        check_sources(now)  # changed on disk: equal to the standard files, or an error
        with contextlib.suppress(OSError):  # read-only: checked again next time
            _write_manifest(folder, {**manifest, "sources": now})
    arrays = {}
    for split in splits:
        size = manifest.get("sizes", {}).get(split)
        try:
            images = _load(folder, f"{split}_images.npy", manifest, (size, 28, 28, 1), np.uint8)
            labels = _load(folder, f"{split}_labels.npy", manifest, (size,), np.int32)
        except _Damaged as err:
            return None, str(err)
        arrays[split] = (images, labels)
    return arrays, None


class _Damaged(Exception):
    """What is wrong with one file of the copy."""


def _load(folder: Path, name: str, manifest: dict, shape: tuple, dtype) -> np.ndarray:
    """One `.npy` file of the copy as a read-only memory map, after checking its size, shape,
    dtype and the CRC-32 of its data against the manifest."""
    path = folder / name
    size, crc = manifest.get("files", {}).get(name, (None, None))
    try:
        if path.stat().st_size != size:
            raise _Damaged(f"{name} has {path.stat().st_size} bytes, the manifest {size}")
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise _Damaged(f"{name} unreadable: {err}") from err
    if array.shape != shape or array.dtype != dtype:
        raise _Damaged(f"{name} holds {array.dtype}{list(array.shape)}, not {np.dtype(dtype)}")
    if _crc32(array) != crc:
        raise _Damaged(f"{name}'s data does not match the CRC-32 recorded when it was written")
    return array


def _crc32(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array))


@contextlib.contextmanager
def preparing(data_dir: Path) -> Iterator[None]:
    """Holds the lock on preparing MNIST in `data_dir` (an OS file lock, `LOCK_NAME`): one
    process prepares it; the others wait here, then read what it wrote. Without a lock (a
    folder this process cannot write, which it cannot prepare in either; no `fcntl`) the
    caller goes on alone."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        fcntl = None
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / LOCK_NAME, "a")  # noqa: SIM115 - held across the yield
    except OSError:
        lock = None
    if lock is None or fcntl is None:
        yield
        return
    with lock:  # released when the file closes
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"bnlab: waiting for another process preparing MNIST in {data_dir}.",
                  file=sys.stderr, flush=True)  # fmt: skip
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def check_sources(files: dict[str, list]) -> None:
    """Reads and checks every IDX file of `sources()`.

    Raises:
      DataError: naming the first missing, damaged or non-standard file and the fix.
    """
    for name, (path, *_) in files.items():
        read_idx(path, name)


def write(data_dir: Path, mnist_dir: str | None, arrays: Arrays) -> Path | None:
    """Writes the copy of `arrays` and its manifest (last, atomically: a reader sees a whole
    copy or none).

    Args:
      data_dir: the TFDS data dir holding the prepared dataset the arrays were read from.
      mnist_dir: the local IDX folder it was prepared from (checked), or None.
      arrays: both splits, as the TFDS dataset gives them (same order and values).

    Returns:
      The copy's folder, or None (with a warning saying how to fix it) where the data dir is
      not writable; runs then read the TFDS records.
    """
    folder = arrays_dir(data_dir)
    manifest = {
        "format": FORMAT,
        "version": TFDS_VERSION,
        "prepared": _prepared_files(data_dir),
        "sources": sources(mnist_dir),
        "sizes": {split: int(len(labels)) for split, (_, labels) in arrays.items()},
        "files": {},  # name -> [bytes, CRC-32 of the array data]
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for split, (images, labels) in arrays.items():
            for kind, array in (("images", images), ("labels", labels)):
                name = f"{split}_{kind}.npy"
                manifest["files"][name] = [_save(folder / name, array), _crc32(array)]
        _write_manifest(folder, manifest)  # last: it makes the copy valid
    except OSError as err:
        warnings.warn(
            f"could not write MNIST's array copy to {folder} ({err}); every run reads the TFDS "
            "records instead, which is slower. Make the TFDS data dir writable or set "
            "data.tfds_dir to a writable folder.",
            stacklevel=2,
        )
        return None
    return folder


def _tmp(path: Path) -> Path:
    # Unique per writer: processes that build the copy at once must not share a file.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _save(path: Path, array: np.ndarray) -> int:
    """Writes `array` to `path` atomically; returns the file's size in bytes."""
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
        size = f.tell()
    os.replace(tmp, path)
    return size


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = _tmp(folder / "manifest.json")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / "manifest.json")
