"""The MNIST IDX files: their names, the standard checksums, and a checked reader (numpy only).

`bnlab.data` (loading splits) and `bnlab.data.tfds_mnist` (the TFDS builder) both read through here.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

MNIST_DIR_ENV = "BNLAB_MNIST_DIR"
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
SPLITS = {"train": "train", "test": "t10k"}


class IdxSpec(NamedTuple):
    magic: int  # 2051 for images, 2049 for labels
    shape: tuple[int, ...]  # (count, rows, cols) or (count,)
    sha256_gz: str  # of the standard .gz file
    sha256_raw: str  # of its decompressed content


IDX_FILES: dict[str, IdxSpec] = {
    "train-images-idx3-ubyte": IdxSpec(
        2051,
        (60000, 28, 28),
        "db8f937d487057fb14a9f0fbe97f0bc8d311ab41b750d41e1ff37c43b9e55e19",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": IdxSpec(
        2049,
        (60000,),
        "51fc562b6747b666fbf6e84ce29d43c3cb5f9c388c664d43b33f02095313405a",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": IdxSpec(
        2051,
        (10000, 28, 28),
        "cfeddb84311ecf044fc6a5b0f6ee8a24d265d4e83e388400186eb114082f4209",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": IdxSpec(
        2049,
        (10000,),
        "e41c74e484045d39b462a7790a4af51301bd9b0b24f0154798d713ec68c45920",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}


class DataError(RuntimeError):
    """A missing, truncated or corrupt dataset file; the message names the file and the fix."""


def read_idx(path: str | Path, name: str) -> np.ndarray:
    """Reads and checks one standard MNIST IDX file (`.gz` or decompressed)."""
    path = Path(path)
    spec = IDX_FILES[name]
    fix = (
        f"Replace it with the standard {name}.gz (SHA-256 {spec.sha256_gz}), or unset "
        f"data.mnist_dir/${MNIST_DIR_ENV} to let TFDS download it."
    )
    if not path.is_file():
        raise DataError(f"MNIST file {path} is missing. {fix}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        if hashlib.sha256(raw).hexdigest() != spec.sha256_gz:
            raise DataError(
                f"MNIST file {path} does not match the standard file's checksum "
                f"(truncated, corrupt or not MNIST). {fix}"
            )
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"MNIST file {path} is not a valid gzip file ({err}). {fix}") from err
    _check_header(path, raw, spec, fix)
    if hashlib.sha256(raw).hexdigest() != spec.sha256_raw:
        raise DataError(
            f"MNIST file {path} has a valid header but its content differs from the "
            f"standard file (corrupt). {fix}"
        )
    offset = 8 + 4 * (len(spec.shape) - 1)
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(spec.shape)


def _check_header(path, raw: bytes, spec: IdxSpec, fix: str) -> None:
    if len(raw) < 8:
        raise DataError(f"MNIST file {path} is truncated ({len(raw)} bytes). {fix}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != spec.magic:
        raise DataError(
            f"MNIST file {path} has magic number {magic}, expected {spec.magic} "
            f"(wrong or corrupt file). {fix}"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(spec.shape)))
    expected = 4 + 4 * len(spec.shape) + int(np.prod(spec.shape))
    if dims != spec.shape or len(raw) != expected:
        raise DataError(
            f"MNIST file {path} has dimensions {dims} and {len(raw)} bytes, expected "
            f"{spec.shape} and {expected} bytes (truncated or corrupt). {fix}"
        )


def local_paths(mnist_dir: str | Path) -> dict[str, Path]:
    """The four IDX files in `mnist_dir`, preferring `.gz`, with a clear error if one is missing."""
    folder = Path(mnist_dir)
    if not folder.is_dir():
        raise DataError(
            f"MNIST folder {folder} does not exist; set data.mnist_dir or "
            f"${MNIST_DIR_ENV} to the folder holding the four IDX files."
        )
    paths = {}
    for name in IDX_FILES:
        gz, plain = folder / f"{name}.gz", folder / name
        if not gz.exists() and not plain.exists():
            raise DataError(
                f"MNIST folder {folder} has no {name}.gz; put the four standard "
                f"files there ({', '.join(f'{n}.gz' for n in IDX_FILES)})."
            )
        paths[name] = gz if gz.exists() else plain
    return paths
