"""Training throughput (examples/s): bnlab's scanned epoch vs a flax-examples loop vs PyTorch.

Two models, each trained by three implementations with the same architecture and
hyperparameters on random data of MNIST shape (throughput does not depend on the pixels):

  cnn: bnlab.models.CNN (conv3x3(32)-BN-relu-avgpool2, conv3x3(64)-BN-relu-avgpool2,
       dense(256)-BN-relu, dense(10)), batch 128, SGD momentum 0.9, lr 0.05.
  mlp: bnlab.models.MLP (784-100-100-100-10, BN before each sigmoid), batch 60, SGD lr 0.5.

  bnlab  its own path: `make_programs(cfg, n).train_epoch`, a `lax.scan` over one epoch with
         the data in device memory.
  flax   flax examples/mnist style: linen Conv/BatchNorm/avg_pool/Dense, a jitted
         `train_step(state, batch)` with optax, host-side numpy permutation and slicing.
  torch  PyTorch CPU eager, torch.nn layers, tensor slicing (no DataLoader).

An epoch is `--cnn-steps` or `--mlp-steps` steps. After an untimed warm-up (bnlab: one whole epoch,
which compiles the scan; the others: a few steps), the implementations run their timed
epochs in turn, round-robin, so that load from other processes falls on all of them alike;
each reports the median of its `--repeats` epochs (fewer if its epochs take more than
`--budget` seconds in all, which only happens when other processes load the machine).

Command: python benchmarks/train_throughput.py [--cnn-steps 40] [--mlp-steps 200]
         [--repeats 5] [--budget 30] [--models cnn,mlp] [--skip-torch] [--mnist-dir DIR]
Runtime: about 2 minutes on an otherwise idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import env_info
import flax_style
import jax
import numpy as np
import optax

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab.training import train as train_lib

ROOT = env_info.ROOT
NUM_CORES = os.cpu_count() or 1
IMPLS = ("bnlab", "flax", "torch")
TARGETS = {("cnn", "flax"): 1.2, ("cnn", "torch"): 1.0, ("mlp", "flax"): 1.5}
WARMUP_STEPS = 3  # flax and torch: compiles the step / warms the allocator

Epoch = Callable[[int], None]  # runs one epoch (`steps` steps) to completion, given its index


class Spec(NamedTuple):
    experiment: str  # bnlab experiment file under experiments/ (the model's other settings)
    batch_size: int
    lr: float
    momentum: float | None  # None: plain SGD


SPECS = {
    "cnn": Spec("mnist_cnn.py", 128, 0.05, 0.9),
    "mlp": Spec("bn_paper_mlp.py", 60, 0.5, None),
}


def synthetic_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.int32)
    return images, labels


def real_mnist(mnist_dir: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    cfg = bnlab_config("mnist_cnn.py", {"data.mnist_dir": repr(mnist_dir)})
    ds = data_lib.load(cfg.data, "train")
    return np.asarray(ds.images[:n]), np.asarray(ds.labels[:n])


# bnlab: its own training path.


def bnlab_config(experiment: str, overrides: dict[str, str] | None = None) -> config_lib.Config:
    raw = config_lib.load_config(ROOT / "experiments" / experiment)
    return config_lib.validate(config_lib.apply_overrides(raw, overrides or {}))


def setup_bnlab(model_name: str, spec: Spec, images: np.ndarray, labels: np.ndarray) -> Epoch:
    # Pinned here so that edits to the experiment files do not change what is measured.
    cfg = bnlab_config(
        spec.experiment,
        {
            "model.name": model_name,
            "model.norm": "batchnorm",
            "model.activation": "relu" if model_name == "cnn" else "sigmoid",
            "model.placement": "before",
            "norm.momentum": "0.99",
            "norm.epsilon": "1e-5",
            "opt.name": "sgd" if spec.momentum is None else "momentum",
            "opt.lr": str(spec.lr),
            "opt.momentum": str(spec.momentum or 0.0),
            "opt.schedule": "constant",
            "opt.clip": "none",
            "opt.weight_decay": "0.0",
            "train.batch_size": str(spec.batch_size),
        },
    )
    print(
        f"  bnlab config: {spec.experiment}, model.conv_impl={cfg.model.conv_impl}, "
        f"model.init={cfg.model.init}, norm.backward={cfg.norm.backward}"
    )
    programs = train_lib.make_programs(cfg, len(labels))
    init_key, data_key = train_lib.run_keys(cfg.train.seed)
    images_d, labels_d = jax.device_put(images), jax.device_put(labels)
    state = programs.init(init_key, data_lib.to_float(images_d[: spec.batch_size]))

    def run_epoch(epoch: int) -> None:
        nonlocal state
        key = jax.random.fold_in(data_key, epoch + 1)
        state, metrics = programs.train_epoch(state, images_d, labels_d, key)
        jax.block_until_ready((state, metrics))

    run_epoch(-1)  # compiles the scanned epoch
    return run_epoch


# flax examples/mnist style (benchmarks/flax_style.py): jitted step, host-side batching.


def setup_flax(model_name: str, spec: Spec, images: np.ndarray, labels: np.ndarray) -> Epoch:
    model = flax_style.MODELS[model_name]()
    images_f = images.astype(np.float32) / 255.0  # flax mnist: floats prepared up front
    tx = optax.sgd(spec.lr, momentum=spec.momentum)
    state = flax_style.create_state(model, images_f[: spec.batch_size], tx)
    rng = np.random.default_rng(0)

    def run_epoch(epoch: int, steps: int | None = None) -> None:
        nonlocal state
        steps = steps or len(labels) // spec.batch_size
        perms = rng.permutation(len(labels))[: steps * spec.batch_size]
        metrics = []
        for perm in perms.reshape((steps, spec.batch_size)):
            state, m = flax_style.flax_train_step(state, (images_f[perm], labels[perm]))
            metrics.append(m)
        jax.device_get(metrics)  # as flax examples: metrics fetched once per epoch
        jax.block_until_ready(state)

    run_epoch(-1, WARMUP_STEPS)
    return run_epoch


# PyTorch CPU eager (benchmarks/torch_style.py).


def setup_torch(model_name: str, spec: Spec, images: np.ndarray, labels: np.ndarray) -> Epoch:
    import torch
    import torch_style

    torch.set_num_threads(NUM_CORES)
    torch.manual_seed(0)
    model = torch_style.model(model_name, 0.99, 0.01 if model_name == "mlp" else None).train()
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum or 0.0)
    x_all, y_all = torch_style.to_tensors(images, labels)

    def run_epoch(epoch: int, steps: int | None = None) -> None:
        steps = steps or len(labels) // spec.batch_size
        perm = torch.randperm(len(labels))
        losses = []
        for i in range(steps):
            idx = perm[i * spec.batch_size : (i + 1) * spec.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.stack(losses).mean().item()

    run_epoch(-1, WARMUP_STEPS)
    return run_epoch


SETUPS = {"bnlab": setup_bnlab, "flax": setup_flax, "torch": setup_torch}


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def run_model(model_name: str, steps: int, impls: list[str], args) -> dict[str, list[float]]:
    """Seconds of each timed epoch of each implementation in `impls`, for one model."""
    spec = SPECS[model_name]
    n = steps * spec.batch_size
    if args.mnist_dir:
        images, labels = real_mnist(args.mnist_dir, n)
    else:
        images, labels = synthetic_mnist(n)
    epochs = {impl: SETUPS[impl](model_name, spec, images, labels) for impl in impls}
    seconds: dict[str, list[float]] = {impl: [] for impl in impls}
    for epoch in range(args.repeats):
        for impl, run_epoch in epochs.items():
            if sum(seconds[impl]) > args.budget:
                continue  # keeps the run short when other load slows an implementation down
            t0 = time.perf_counter()
            run_epoch(epoch)
            seconds[impl].append(time.perf_counter() - t0)
    for impl, times in seconds.items():
        rate = n / statistics.median(times)
        spread = " ".join(f"{t:.2f}" for t in times)
        print(f"  {model_name} {impl:<6}{rate:>10.0f} ex/s (median); epoch seconds: {spread}")
    return {impl: [n / t for t in times] for impl, times in seconds.items()}


def print_table(title: str, results: dict[str, dict[str, float]]) -> None:
    def cell(r: dict[str, float], num: str, den: str | None = None) -> str:
        if num not in r or (den and den not in r):
            return "skipped"
        return f"{r[num] / r[den]:.2f}x" if den else f"{r[num]:.0f}"

    print(f"\n{title}")
    print(
        f"{'model':<6}{'bnlab ex/s':>12}{'flax ex/s':>12}{'torch ex/s':>12}"
        f"{'bnlab/flax':>12}{'bnlab/torch':>13}"
    )
    for model_name, r in results.items():
        print(
            f"{model_name:<6}{cell(r, 'bnlab'):>12}{cell(r, 'flax'):>12}{cell(r, 'torch'):>12}"
            f"{cell(r, 'bnlab', 'flax'):>12}{cell(r, 'bnlab', 'torch'):>13}"
        )


def print_targets(results: dict[str, dict[str, float]]) -> None:
    print()
    for (model_name, other), target in TARGETS.items():
        r = results.get(model_name)
        if r is None:
            continue
        if other not in r:
            print(f"target {model_name} bnlab/{other} >= {target}x: skipped")
            continue
        ratio = r["bnlab"] / r[other]
        verdict = "MET" if ratio >= target else "NOT MET"
        print(f"target {model_name} bnlab/{other} >= {target}x (median): {ratio:.2f}x -> {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cnn-steps", type=int, default=40, help="CNN steps per epoch")
    parser.add_argument("--mlp-steps", type=int, default=200, help="MLP steps per epoch")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs each (median)")
    parser.add_argument(
        "--budget",
        type=float,
        default=30.0,
        help="seconds per implementation and model after which it runs no more timed epochs",
    )
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated subset of cnn,mlp")
    parser.add_argument("--skip-torch", action="store_true", help="do not run PyTorch")
    parser.add_argument("--mnist-dir", help="train on the first examples of real MNIST instead")
    args = parser.parse_args()

    tv = torch_version()
    print(env_info.header(tv or "not installed"))
    other_load = env_info.OtherLoad()
    impls = list(IMPLS)
    if args.skip_torch:
        impls.remove("torch")
        print("PyTorch skipped (--skip-torch)")
    elif tv is None:
        impls.remove("torch")
        print("PyTorch skipped: torch is not installed (pip install torch==2.13.0)")
    data = f"real MNIST from {args.mnist_dir}" if args.mnist_dir else "synthetic MNIST-shaped"
    print(f"{data} data; median of {args.repeats} timed epochs, run round-robin")

    rates = {}
    for model_name in args.models.split(","):
        steps = {"cnn": args.cnn_steps, "mlp": args.mlp_steps}[model_name]
        batch = SPECS[model_name].batch_size
        print(f"{model_name}: {steps} steps x batch {batch} per epoch")
        rates[model_name] = run_model(model_name, steps, impls, args)
    median = {m: {i: statistics.median(v) for i, v in r.items()} for m, r in rates.items()}
    best = {m: {i: max(v) for i, v in r.items()} for m, r in rates.items()}
    print_table("median epoch (the result)", median)
    # Other processes only ever slow an epoch down, so the best epoch shows the idle machine.
    print_table("best epoch (least disturbed by other load)", best)
    print_targets(median)
    print(other_load.report())


if __name__ == "__main__":
    main()
