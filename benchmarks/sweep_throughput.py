"""Wall time of a 16-seed sweep: bnlab's vmapped engine vs its single-run trainer one trial
after another vs a flax-examples-style loop.

The sweep: the Ioffe & Szegedy Fig. 1 MLP of experiments/bn_paper_fig1.py (784-100x3-10, BN
before each sigmoid, batch 60, SGD lr 0.5) with reduced steps (`--train-size` examples per
epoch, `--epochs` epochs) and 16 seeds, each trial evaluated on the 10,000 test images after
every epoch. Every engine's time covers the whole sweep as a user runs it: model and optimizer
set-up, compilation, training, evaluation and (for bnlab) writing each trial's files.

  vmapped     bnlab.training.batched.run_group: the 16 trials in one compiled program (bnlab sweep).
  one-by-one  bnlab.training.run.run for each trial in turn (bnlab train, 16 times, in one process).
  flax        flax examples/mnist style, per trial: linen layers, a jitted train step with
              optax and host-side numpy batching, a jitted eval step over test batches.

Data: real MNIST (`--mnist-dir`, default $BNLAB_MNIST_DIR) or random MNIST-shaped data
(`--synthetic`, for machines without the dataset; throughput does not depend on the pixels).

Command: python benchmarks/sweep_throughput.py [--seeds 16] [--train-size 6000] [--epochs 3]
         [--synthetic]
Runtime: about 3 minutes on an otherwise idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import env_info
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax_style import FlaxMLP, create_state, evaluate, flax_train_step

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab.training import batched, run

ROOT = env_info.ROOT
TARGETS = {"one-by-one": 1.25, "flax": 1.6}  # vmapped must be this many times faster


def configs(args) -> list[config_lib.Config]:
    raw = config_lib.load_config(ROOT / "experiments" / "bn_paper_fig1.py")
    fixed = {
        "model.norm": "batchnorm",
        "data.train_size": args.train_size,
        "train.epochs": args.epochs,
        "train.probe_unit": -1,  # the flax loop has no probe
        "train.log_every_steps": 100,
    }
    if args.mnist_dir:
        fixed["data.mnist_dir"] = repr(args.mnist_dir)
    overrides = [
        {k: str(v) for k, v in {**fixed, "train.seed": s}.items()} for s in range(args.seeds)
    ]
    return [config_lib.validate(config_lib.apply_overrides(raw, o)) for o in overrides]


def use_synthetic_data(train_size: int) -> None:
    """Routes bnlab's data loading to random MNIST-shaped arrays."""
    rng = np.random.default_rng(0)
    splits = {
        "train": (rng.integers(0, 256, (60000, 28, 28, 1), np.uint8), rng.integers(0, 10, 60000)),
        "test": (rng.integers(0, 256, (10000, 28, 28, 1), np.uint8), rng.integers(0, 10, 10000)),
    }

    def load(cfg, split):
        images, labels = splits[split]
        n = cfg.train_size if split == "train" and cfg.train_size else len(labels)
        return data_lib.Dataset(jnp.asarray(images[:n]), jnp.asarray(labels[:n], jnp.int32))

    data_lib.load = load


def sweep_vmapped(cfgs, workdir: Path) -> None:
    batched.run_group(cfgs, [workdir / f"vmap{i}" for i in range(len(cfgs))])


def sweep_one_by_one(cfgs, workdir: Path) -> None:
    for i, cfg in enumerate(cfgs):
        run.run(cfg, workdir / f"single{i}")


def sweep_flax(cfgs, workdir: Path) -> None:
    del workdir  # the flax-style loop writes nothing
    train_set, test_set, _ = run.load_splits(cfgs[0])
    images = np.asarray(train_set.images, np.float32) / 255.0
    labels = np.asarray(train_set.labels)
    test_images = np.asarray(test_set.images, np.float32) / 255.0
    test_labels = np.asarray(test_set.labels)
    for cfg in cfgs:
        flax_trial(cfg, images, labels, test_images, test_labels)


def flax_trial(cfg, images, labels, test_images, test_labels) -> None:
    bs = cfg.train.batch_size
    state = create_state(FlaxMLP(), images[:bs], optax.sgd(cfg.opt.lr), cfg.train.seed)
    rng = np.random.default_rng(cfg.train.seed)
    steps = len(labels) // bs
    for _ in range(cfg.train.epochs):
        perms = rng.permutation(len(labels))[: steps * bs].reshape(steps, bs)
        metrics = []
        for perm in perms:
            state, m = flax_train_step(state, (images[perm], labels[perm]))
            metrics.append(m)
        jax.device_get(metrics)
        # In batches of user_jobs.EVAL_BATCH, as bnlab's train.eval_batch_size.
        evaluate(state, test_images, test_labels)


ENGINES = {"vmapped": sweep_vmapped, "one-by-one": sweep_one_by_one, "flax": sweep_flax}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16, help="trials in the sweep")
    parser.add_argument("--train-size", type=int, default=6000, help="examples per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    parser.add_argument("--mnist-dir", default=os.environ.get(config_lib.MNIST_DIR_ENV))
    parser.add_argument("--synthetic", action="store_true", help="random MNIST-shaped data")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset")
    args = parser.parse_args()

    print(env_info.header())
    other_load = env_info.OtherLoad()
    if args.synthetic:
        use_synthetic_data(args.train_size)
        args.mnist_dir = None
    cfgs = configs(args)
    steps = args.train_size // cfgs[0].train.batch_size * args.epochs
    print(
        f"{args.seeds} seeds x {steps} steps (batch {cfgs[0].train.batch_size}), "
        f"{args.epochs} evaluations each; {'synthetic' if args.synthetic else 'real MNIST'} data"
    )
    run.load_splits(cfgs[0])  # load (and cache) the data outside the timings
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.engines.split(","):
            tick = time.perf_counter()
            ENGINES[name](cfgs, Path(tmp))
            seconds[name] = time.perf_counter() - tick
            print(
                f"  {name:11s} {seconds[name]:7.1f} s  ({seconds[name] / args.seeds:.2f} s/trial)"
            )
    if "vmapped" in seconds:
        for other, target in TARGETS.items():
            if other in seconds:
                ratio = seconds[other] / seconds["vmapped"]
                verdict = "MET" if ratio >= target else "NOT MET"
                print(f"target vmapped vs {other} >= {target}x: {ratio:.2f}x -> {verdict}")
    print(other_load.report())


if __name__ == "__main__":
    main()
