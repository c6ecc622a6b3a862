"""The whole jobs that benchmarks/wall_time.py times, shared by their bnlab, flax-style and
PyTorch versions: each model's settings (those of its bnlab experiment file), the FLOP of one
training step, and MNIST read from the four IDX files as a short user script reads them.

numpy only: a PyTorch job that imports this module loads neither JAX nor bnlab.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Job(NamedTuple):
    experiment: str  # bnlab's experiment file under experiments/
    batch_size: int
    epochs: int  # of the whole job as timed
    lr: float
    momentum: float | None  # SGD momentum; None: plain SGD
    cosine: bool  # lr decays to 0 over the run (cosine); else constant
    bn_momentum: float  # flax convention: weight of the old running statistics
    init_std: float | None  # N(0, std) dense kernels (the Fig. 1 MLP); None: library default
    step_flop: float  # per example, forward and backward (3x the forward's multiply-adds x 2)


def _dense_flop(widths: list[int]) -> int:
    return sum(2 * a * b for a, b in zip(widths, widths[1:], strict=False))


# conv3x3 1->32 at 28x28, conv3x3 32->64 at 14x14, dense 3136->256, dense 256->10
_CNN_FORWARD = 2 * (28 * 28 * 32 * 9 * 1 + 14 * 14 * 64 * 9 * 32) + _dense_flop([3136, 256, 10])
JOBS = {
    "cnn": Job("mnist_cnn.py", 128, 2, 0.3, 0.9, True, 0.9, None, 3 * _CNN_FORWARD),
    "mlp": Job(
        "bn_paper_mlp.py",
        60,
        1,
        0.5,
        None,
        False,
        0.99,
        0.01,
        3 * _dense_flop([784, 100, 100, 100, 10]),
    ),  # fmt: skip
}
EVAL_BATCH = 100  # bnlab's train.eval_batch_size (all three evaluate in batches of 100)
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte")  # fmt: skip


def load_mnist(folder: str | Path) -> tuple[np.ndarray, ...]:
    """`(train_images u8[60000,28,28,1], train_labels i64, test_images, test_labels)` from
    the standard `.gz` IDX files, unchecked, as a short script reads them."""
    arrays = []
    for name in FILES:
        raw = bytearray(gzip.decompress((Path(folder) / f"{name}.gz").read_bytes()))  # writable
        if "images" in name:
            arrays.append(np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28, 1))
        else:
            arrays.append(np.frombuffer(raw, np.uint8, offset=8).astype(np.int64))
    return tuple(arrays)


class StepTimer:
    """Times the last `timed_steps` steps of a job (as bnlab times its chunks after the first,
    compiling one): `step(i, state)` before step `i`, `stop(state)` after the last;
    `sync(state)` waits until the state is computed (asynchronous dispatch)."""

    def __init__(self, total_steps: int, timed_steps: int, sync=lambda state: None):
        self.first = total_steps - timed_steps
        self.timed_steps, self.sync = timed_steps, sync
        self.start: float | None = None
        self.seconds: float | None = None

    def step(self, i: int, state) -> None:
        if i == self.first:
            self.sync(state)
            self.start = time.perf_counter()

    def stop(self, state) -> None:
        self.sync(state)
        self.seconds = time.perf_counter() - self.start

    def report(self, batch_size: int, test_accuracy: float) -> None:
        rate = self.timed_steps * batch_size / self.seconds
        print("RESULT " + json.dumps({"examples_per_s": rate, "test_accuracy": test_accuracy}))


def main(whole_job, doc: str) -> None:
    """The command line of a job script: `--model`, `--mnist-dir`, `--epochs`, `--timed-steps`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", choices=sorted(JOBS), required=True)
    parser.add_argument("--mnist-dir", required=True)
    parser.add_argument("--epochs", type=int, help="default: the job's")
    parser.add_argument("--timed-steps", type=int, default=500, help="the last steps, timed")
    args = parser.parse_args()
    epochs = args.epochs or JOBS[args.model].epochs
    whole_job(args.model, args.mnist_dir, epochs, args.timed_steps)
