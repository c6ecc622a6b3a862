"""Reference-CNN training throughput (examples/s) over 1, 2, 4 and 8 devices, pmap and sharded.

Each configuration runs bnlab's own path, `make_programs(cfg, n).train_epoch`, with
`parallel.mode` = none (one device, the baseline), pmap or sharded and `parallel.num_devices`
= 1, 2, 4, 8, sync BN; batch 128 (global), SGD momentum 0.9, lr 0.05, BN momentum 0.99, random
data of MNIST shape. On CPU the devices are fake (`--xla_force_host_platform_device_count=8`)
and share the machine's cores: the table measures the overhead of splitting a batch over
devices (collectives, smaller matmuls), not a speed-up.

After one untimed epoch each (compilation), the configurations run their timed epochs in
turn, round-robin, and each reports the median of `--repeats` epochs of `--steps` steps.

Command: python benchmarks/parallel_throughput.py [--steps 20] [--repeats 3] [--devices 1,2,4,8]
Runtime: about 3 minutes on an otherwise idle 2-core CPU.
"""

from __future__ import annotations

import os

# Fake CPU devices: must precede the first jax import.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import env_info  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bnlab import config as config_lib  # noqa: E402
from bnlab import data as data_lib  # noqa: E402
from bnlab.training import train as train_lib  # noqa: E402

BATCH = 128


def make_epoch(mode: str, devices: int, images: np.ndarray, labels: np.ndarray):
    overrides = {
        "model.conv_impl": "im2col",
        "norm.momentum": "0.99",
        "opt.name": "momentum",
        "opt.lr": "0.05",
        "opt.momentum": "0.9",
        "opt.schedule": "constant",
        "train.batch_size": str(BATCH),
        "parallel.mode": mode,
        "parallel.bn": "sync",
        "parallel.num_devices": str(devices),
    }
    raw = config_lib.load_config(env_info.ROOT / "experiments" / "mnist_cnn.py")
    cfg = config_lib.validate(config_lib.apply_overrides(raw, overrides))
    programs = train_lib.make_programs(cfg, len(labels))
    init_key, data_key = train_lib.run_keys(cfg.train.seed)
    images_d, labels_d = jax.device_put(images), jax.device_put(labels)
    state = programs.init(init_key, data_lib.to_float(images_d[:BATCH]))

    def run_epoch(epoch: int) -> None:
        nonlocal state
        key = jax.random.fold_in(data_key, epoch + 1)
        state, metrics = programs.train_epoch(state, images_d, labels_d, key)
        jax.block_until_ready((state, metrics))

    run_epoch(-1)  # compiles
    return run_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per configuration")
    parser.add_argument("--devices", default="1,2,4,8", help="device counts, comma-separated")
    args = parser.parse_args()
    load = env_info.OtherLoad()
    print(env_info.header())
    print(f"{jax.device_count()} {jax.default_backend()} devices; cnn, global batch {BATCH}, ")
    print(f"{args.steps} steps per epoch, median of {args.repeats} epochs, round-robin")
    rng = np.random.default_rng(0)
    n = args.steps * BATCH
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.int32)
    counts = [int(d) for d in args.devices.split(",")]
    configs = [("none", 1)] + [(mode, d) for mode in ("pmap", "sharded") for d in counts]
    epochs = {}
    for mode, devices in configs:
        tick = time.perf_counter()
        epochs[mode, devices] = make_epoch(mode, devices, images, labels)
        print(f"  compiled {mode:7s} x{devices}: {time.perf_counter() - tick:.1f} s")
    seconds = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs:
            tick = time.perf_counter()
            epochs[c](r)
            seconds[c].append(time.perf_counter() - tick)
    rate = {c: n / statistics.median(s) for c, s in seconds.items()}
    base = rate["none", 1]
    print(f"\none device without parallel: {base:.0f} ex/s (median)")
    columns = ("pmap ex/s", "sharded ex/s", "pmap/none", "sharded/none")
    print(f"{'devices':>7} " + " ".join(f"{c:>13}" for c in columns))
    for d in counts:
        p, s = rate["pmap", d], rate["sharded", d]
        print(f"{d:>7} {p:>13.0f} {s:>13.0f} {p / base:>12.2f}x {s / base:>12.2f}x")
    print(
        "\nepoch seconds: "
        + "; ".join(f"{m} x{d}: " + " ".join(f"{t:.2f}" for t in seconds[m, d]) for m, d in configs)
    )
    print(load.report())


if __name__ == "__main__":
    main()
