"""MNIST through TFDS (array_record, no TensorFlow), from the four standard IDX files.

Online, TFDS's download manager fetches the files; offline, they are read from a local folder
(`data.mnist_dir` or `$BNLAB_MNIST_DIR`). Either way every file is checked (magic number, size,
SHA-256 of the standard distribution) before TFDS prepares the dataset, once, in its data dir
(`data.tfds_dir`, else `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`). Runs read a whole-array
copy of it (`bnlab.data.mnist_arrays`), and a split is loaded into device memory once, as uint8
images and int32 labels.

The package holds the IDX format (`idx`), the TFDS builder (`tfds_mnist`), the whole-array
copy (`mnist_arrays`) and, here, `load()` with the `data` config group (`DataConfig`): one
entry point, each module reading only the ones below it (idx <- mnist_arrays <- tfds_mnist).
May import: `bnlab.schema`, `bnlab.types`. Imported by `bnlab.nn` (number of classes), config,
training and the CLI.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from bnlab import schema
from bnlab.data import mnist_arrays
from bnlab.data.idx import (  # noqa: F401 - re-exported: the data API of earlier versions
    IDX_FILES,
    MNIST_DIR_ENV,
    MNIST_URL,
    SPLITS,
    DataError,
    IdxSpec,
    local_paths,
    read_idx,
)
from bnlab.schema import ConfigError, field

if TYPE_CHECKING:  # JAX loads with the first split: the `data` config group validates without it
    import jax

TASKS = {"mnist10": 10, "binary01": 2}  # task -> number of classes


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` group: where MNIST comes from and which part of it trains."""

    mnist_dir: str | None = field(
        None, f"local IDX folder; None: ${MNIST_DIR_ENV} or TFDS download"
    )
    tfds_dir: str | None = field(None, "TFDS data dir; None: TFDS's default")
    task: str = field("mnist10", '"mnist10" (10 classes) | "binary01" (digits 0 vs 1)',
                      choices=TASKS)  # fmt: skip
    train_size: int = field(
        0, "use the first N training examples (0: all)", check=schema.non_negative
    )
    validation_size: int = field(
        0,
        "hold out the last N training examples (the same for every seed and train_size) as a "
        "validation split, evaluated at every epoch end (0: none)",
        check=schema.non_negative,
    )
    train_eval_size: int = field(
        0,
        "also evaluate the first N training examples at every epoch end as test is evaluated "
        "(evaluation mode: running statistics, no dropout), split `train_eval`: the train-test "
        "gap without training mode's effects (0: off)",
        check=schema.non_negative,
    )


class Dataset(NamedTuple):
    images: jax.Array  # uint8[N, 28, 28, 1], on device
    labels: jax.Array  # int32[N], on device

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


@functools.lru_cache(maxsize=8)
def _load_numpy(mnist_dir: str | None, tfds_dir: str | None, split: str):
    """`(images, labels)` of a split as numpy arrays, from the array copy of the TFDS dataset,
    or from TFDS (which then prepares it if needed) and written to the copy."""
    data_dir = mnist_arrays.tfds_data_dir(tfds_dir)
    arrays = mnist_arrays.read(data_dir, mnist_dir, (split,))  # checks this split's files only
    if arrays is None:
        with mnist_arrays.preparing(data_dir):  # one process prepares, the others wait
            arrays, damage = mnist_arrays.read_checked(data_dir, mnist_dir)  # theirs, if any
            if arrays is None:
                arrays = _prepare(mnist_dir, data_dir, damage)
    images, labels = arrays[split]
    return _read_only(images), _read_only(labels)


def _prepare(mnist_dir: str | None, data_dir: Path, damage: str | None) -> mnist_arrays.Arrays:
    from bnlab.data.tfds_mnist import read_splits  # TFDS is imported only when the copy is missing

    if mnist_dir is not None and mnist_arrays.dataset_dir(data_dir).exists():
        # TFDS checks the files only when it prepares the dataset, and it is prepared already.
        mnist_arrays.check_sources(mnist_arrays.sources(mnist_dir))
    arrays, prepared = read_splits(mnist_dir, data_dir)
    folder = mnist_arrays.write(data_dir, mnist_dir, arrays)
    where = mnist_arrays.dataset_dir(data_dir)
    if prepared:
        what = (
            f"prepared MNIST once from {mnist_dir or 'the files TFDS downloaded'} into {where} "
            f"(TFDS's data dir: data.tfds_dir, else ${mnist_arrays.TFDS_DATA_DIR_ENV}, else "
            "~/tensorflow_datasets)"
        )
    else:
        what = f"copied MNIST from the TFDS dataset {where}"
    if damage:
        what = f"found the array copy damaged ({damage}) and {what}"
    copy = f"to whole arrays in {folder}, which runs read" if folder else "(no array copy)"
    print(f"bnlab: {what} {copy} (safe to delete).", file=sys.stderr, flush=True)
    return arrays


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    array.setflags(write=False)
    return array


def load(cfg: DataConfig, split: str) -> Dataset:
    """Loads a split ("train" or "test") for `cfg.task` into device memory."""
    import jax

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")
    mnist_dir = None if cfg.mnist_dir is None else str(Path(cfg.mnist_dir).expanduser())
    if mnist_dir is not None:
        local_paths(mnist_dir)  # a wrong folder fails even when TFDS has the data cached
    try:
        images, labels = _load_numpy(mnist_dir, cfg.tfds_dir or None, split)  # '': default
    except OSError as err:
        raise DataError(
            f"cannot prepare or read MNIST in the TFDS data dir {cfg.tfds_dir or '(default)'}: "
            f"{err}. Set data.tfds_dir to a writable folder."
        ) from err
    if cfg.task == "binary01":
        keep = labels <= 1
        images, labels = images[keep], labels[keep]
    if split == "train" and cfg.train_size:
        if cfg.train_size > len(labels):
            raise ConfigError(
                f"data.train_size={cfg.train_size} exceeds the {len(labels)} training examples "
                f"of task {cfg.task!r}; lower it (0 uses all)."
            )
        images, labels = images[: cfg.train_size], labels[: cfg.train_size]
    return Dataset(jax.device_put(images), jax.device_put(labels))


def num_classes(task: str) -> int:
    return TASKS[task]


def to_float(images: jax.Array) -> jax.Array:
    """uint8 pixels to float32 in [0, 1]."""
    return images.astype(np.float32) / 255.0
