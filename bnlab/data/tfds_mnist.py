"""The TFDS builder of bnlab's MNIST: the four checked IDX files, stored as array_record.

Kept apart from `bnlab.data` so that importing bnlab does not import TFDS; a run imports it
only when the whole-array copy (`bnlab.data.mnist_arrays`) is missing or stale.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from bnlab.data.idx import (
    IDX_FILES,
    MNIST_DIR_ENV,
    MNIST_URL,
    SPLITS,
    DataError,
    local_paths,
    read_idx,
)
from bnlab.data.mnist_arrays import TFDS_NAME, TFDS_VERSION, Arrays


class BnlabMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST from the four standard IDX files, checked, stored as array_record."""

    name = TFDS_NAME
    VERSION = tfds.core.Version(TFDS_VERSION)
    RELEASE_NOTES = {"1.0.0": "MNIST from the standard IDX files."}

    def __init__(self, *, mnist_dir: str | None = None, **kwargs):
        self._mnist_dir = mnist_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST handwritten digits (LeCun et al.), from the standard IDX files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    # TFDS announces "Downloading and preparing dataset Unknown size" even when it reads local
    # files; `bnlab.data` says once, in its own words, what was prepared where.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        if self._mnist_dir is not None:
            paths = local_paths(self._mnist_dir)
        else:
            urls = {name: f"{MNIST_URL}{name}.gz" for name in IDX_FILES}
            try:
                paths = dl_manager.download(urls)
            except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
                raise DataError(
                    f"could not download MNIST ({err}). Offline? Point data.mnist_dir or "
                    f"${MNIST_DIR_ENV} to a folder with the four standard IDX files."
                ) from err
        # Check all four files before generating anything: a bad file fails fast.
        arrays = {name: read_idx(paths[name], name) for name in IDX_FILES}
        return {
            split: self._generate_examples(
                arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"]
            )
            for split, prefix in SPLITS.items()
        }

    def _generate_examples(self, images, labels):
        for i in range(len(labels)):
            yield i, {"image": images[i, :, :, None], "label": int(labels[i])}


def read_splits(mnist_dir: str | None, data_dir: Path) -> tuple[Arrays, bool]:
    """Both splits of the TFDS dataset in `data_dir` (prepared first if needed) as whole
    arrays, in TFDS's record order; and whether it was prepared now."""
    with _quiet_off_a_terminal():
        builder = BnlabMnist(
            mnist_dir=mnist_dir, data_dir=str(data_dir), file_format="array_record"
        )
        prepared = not builder.is_prepared()
        builder.download_and_prepare()
    arrays = {}
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        records = source.__getitems__(range(len(source)))
        images = np.stack([r["image"] for r in records])
        labels = np.asarray([r["label"] for r in records], np.int32)
        arrays[split] = (images, labels)
    return arrays, prepared


@contextlib.contextmanager
def _quiet_off_a_terminal() -> Iterator[None]:
    """Off a terminal (a log file, a pipe, a notebook), TFDS's progress bars are a line of
    control characters per update, and absl's warnings about the folders TFDS is creating
    ("no dataset_info.json") are noise: both are off while TFDS prepares; `bnlab.data` says
    in one line what was prepared where. On a terminal the bars show the progress."""
    if sys.stderr.isatty():
        yield
        return
    absl = logging.getLogger("absl")
    level, bars = absl.level, getattr(tqdm_utils, "_active", True)
    absl.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        absl.setLevel(level)
        tfds.display_progress_bar(bars)
