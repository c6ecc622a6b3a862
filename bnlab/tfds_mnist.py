"""The TFDS builder of bnlab's MNIST: the four checked IDX files, stored as array_record.

Kept apart from `bnlab.data` so that importing bnlab does not import TFDS.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from bnlab.idx import IDX_FILES, MNIST_DIR_ENV, MNIST_URL, SPLITS, DataError, local_paths, read_idx


class BnlabMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST from the four standard IDX files, checked, stored as array_record."""

    VERSION = tfds.core.Version("1.0.0")
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
