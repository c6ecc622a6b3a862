"""`bnlab sweep` on a machine without TFDS: the MNIST IDX files are read directly.

The lent GPU machine (docs/results.md, studies 4 and 5) has jax but no tensorflow-datasets.
This script replaces TFDS's preparation with `bnlab.data.read_idx` on the four standard files
(checked as usual: magic number, size, SHA-256) and then runs `bnlab sweep` for each named
experiment, so the trials, configs and outputs are those of `bnlab sweep`.

Command: python benchmarks/idx_sweep.py --mnist-dir DIR --workdir-root OUT [--smoke] NAME [...]
  e.g. python benchmarks/idx_sweep.py --mnist-dir .mnist --workdir-root /tmp/st
       seed_cnn_binary schedules_and_clipping  (then: bnlab report /tmp/st/<experiment>)
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bnlab import cli, data

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-dir", required=True, help="folder with the four *-ubyte.gz")
    parser.add_argument("--workdir-root", required=True, help="sweeps go to ROOT/<experiment>")
    parser.add_argument("--smoke", action="store_true", help="the experiments' small variants")
    parser.add_argument("experiments", nargs="+", help="names of files in experiments/")
    args = parser.parse_args()

    def load_numpy(mnist_dir, tfds_dir, split):
        del mnist_dir, tfds_dir  # the IDX folder given here replaces TFDS
        images, labels = FILES[split]
        x = data.read_idx(f"{args.mnist_dir}/{images}.gz", images)[..., None]
        y = data.read_idx(f"{args.mnist_dir}/{labels}.gz", labels).astype(np.int32)
        return x, y

    data._load_numpy = load_numpy
    for name in args.experiments:
        tick = time.perf_counter()
        workdir = f"{args.workdir_root}/{name}"
        smoke = ["--smoke"] if args.smoke else []
        rc = cli.main(["sweep", f"experiments/{name}.py", "--workdir", workdir, *smoke])
        print(f"{name}: exit {rc}, {time.perf_counter() - tick:.1f} s", flush=True)


if __name__ == "__main__":
    main()
