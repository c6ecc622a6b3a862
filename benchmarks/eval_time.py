"""The reference CNN's evaluation: time over the 10,000 MNIST test images by evaluation batch
size and average-pooling implementation, and the training epoch with each pooling.

  window  bnlab's `avg_pool2` (`flax.linen.avg_pool`): a 2x2 window sum (`lax.reduce_window`) / 4
  view    the mean over the (B, H/2, 2, W/2, 2, C) view (bnlab's pooling before fe86728)
  slices  the sum of the four strided slices x[:, i::2, j::2] times 0.25

Each cell is `bnlab.training.train.evaluate` as `bnlab train` compiles it, with the state that
`make_programs(...).init` gives (evaluation time does not depend on the weights). One process;
the pooling is patched into `bnlab.models` before each program is traced; the cells run in
turn, `--reps` times, and the median is reported. `--train-steps N` also times a training
epoch of N steps (batch 128, random MNIST-shaped data) with each pooling. `--torch` times
PyTorch's evaluation instead (`benchmarks/torch_style.py`, untrained, 2 threads), alone in its
process, by the same batch sizes.

Command: python benchmarks/eval_time.py [--batches 50,100,250,1000] [--reps 5]
         [--train-steps 40] [--mnist-dir ../shared/data/mnist] [--torch]
Runtime: about 3 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import env_info
import jax
import jax.numpy as jnp
import train_throughput

from bnlab import data as data_lib
from bnlab import models
from bnlab.training import train as train_lib


def view_mean_pool(x):
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def strided_slices_pool(x):
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return (x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) * 0.25


POOLS = {"window": models.avg_pool2, "view": view_mean_pool, "slices": strided_slices_pool}


def _median_ms(times: list[float]) -> str:
    return (
        f"{statistics.median(times) * 1e3:8.1f} ms [{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}]"
    )


def time_torch(batches: list[int], reps: int, mnist_dir: str) -> None:
    import torch
    import torch_style
    import user_jobs

    torch.set_num_threads(torch_style.THREADS)
    job = user_jobs.JOBS["cnn"]
    net = torch_style.model("cnn", job.bn_momentum, job.init_std)
    images, labels = torch_style.to_tensors(*user_jobs.load_mnist(mnist_dir)[2:])
    times = {batch: [] for batch in batches}
    for _ in range(reps):
        for batch in batches:
            user_jobs.EVAL_BATCH = batch  # read by torch_style.evaluate
            start = time.perf_counter()
            torch_style.evaluate(net, images, labels)
            times[batch].append(time.perf_counter() - start)
    print(f"\nPyTorch {torch.__version__}: evaluation of the {len(labels)} test images, "
          f"median of {reps}")  # fmt: skip
    ref = statistics.median(times[max(batches)])
    for batch, ts in times.items():
        speedup = ref / statistics.median(ts)
        print(f"  batch {batch:6d}  {_median_ms(ts):28s}  {speedup:5.2f}x batch {max(batches)}'s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="50,100,250,1000")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=40, help="0: skip the training epoch")
    parser.add_argument("--mnist-dir", default=str(env_info.ROOT.parent / "shared/data/mnist"))
    parser.add_argument("--torch", action="store_true", help="time PyTorch's evaluation only")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    print(env_info.header())
    other_load = env_info.OtherLoad()
    if args.torch:
        time_torch(batches, args.reps, args.mnist_dir)
        print(other_load.report())
        return

    cfg = train_throughput.bnlab_config("mnist_cnn.py", {"data.mnist_dir": repr(args.mnist_dir)})
    test = data_lib.load(cfg.data, "test")
    images, labels = jax.device_put(test.images), jax.device_put(test.labels)
    programs = train_lib.make_programs(cfg, 60_000)
    state = programs.init(train_lib.run_keys(0)[0], data_lib.to_float(images[:128]))

    cells, results = {}, {}
    for pool_name, pool in POOLS.items():
        models.avg_pool2 = pool  # read when the model is traced
        for batch in batches:
            fn = jax.jit(
                functools.partial(train_lib.evaluate, model=programs.model, batch_size=batch)
            )
            results[pool_name, batch] = jax.device_get(
                fn(state.params, state.batch_stats, images, labels)
            )
            cells[pool_name, batch] = fn
    models.avg_pool2 = POOLS["window"]
    times = {cell: [] for cell in cells}
    for _ in range(args.reps):
        for cell, fn in cells.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(state.params, state.batch_stats, images, labels))
            times[cell].append(time.perf_counter() - start)

    print(f"\nevaluation of the {len(labels)} test images, median of {args.reps}")
    before = ("view", max(batches))  # bnlab's evaluation before fe86728 (batches of 1000)
    print(
        f"pooling  batch   time                          vs {before[0]} at {before[1]}     accuracy"
    )
    ref = statistics.median(times[before])
    for (pool_name, batch), ts in times.items():
        m = results[pool_name, batch]
        print(
            f"{pool_name:7s} {batch:6d}  {_median_ms(ts):28s}  {ref / statistics.median(ts):5.2f}x"
            f"             {float(m['accuracy']):.4f}"
        )
    accuracies = {float(m["accuracy"]) for m in results.values()}
    print(f"accuracy equal in every cell: {len(accuracies) == 1}")

    if args.train_steps:
        spec = train_throughput.SPECS["cnn"]
        data = train_throughput.synthetic_mnist(args.train_steps * spec.batch_size)
        epochs = {}
        for pool_name, pool in POOLS.items():
            models.avg_pool2 = pool
            epochs[pool_name] = train_throughput.setup_bnlab("cnn", spec, *data)
        models.avg_pool2 = POOLS["window"]
        epoch_times = {name: [] for name in epochs}
        for rep in range(args.reps):
            for name, run_epoch in epochs.items():
                start = time.perf_counter()
                run_epoch(rep)
                epoch_times[name].append(time.perf_counter() - start)
        print(f"\ntraining epoch, {args.train_steps} steps x batch {spec.batch_size}")
        for name, ts in epoch_times.items():
            rate = args.train_steps * spec.batch_size / statistics.median(ts)
            print(f"  {name:7s} {_median_ms(ts)}  {rate:6.0f} ex/s")
        for other in list(POOLS)[1:]:
            ratio = statistics.median(epoch_times[other]) / statistics.median(epoch_times["window"])
            print(f"  window vs {other}: {ratio:.2f}x faster")
    print(other_load.report())


if __name__ == "__main__":
    main()
