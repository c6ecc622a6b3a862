"""Experiments that locate bnlab's CPU costs (see BENCHMARKS.md, "Findings").

  stats    forward BN (statistics + normalize) on x (128,14,14,64) f32 with several ways of
           computing the batch moments: bnlab's (one pass over x shifted by its first sample),
           bnlab's before commit 2060e7f (shift, then two passes), two-pass, one-pass (flax's
           default), each reduced over the 4-D array and over a 2-D (N, C) view of it.
  metrics  bnlab's own `train_epoch` for the MLP and CNN of train_throughput.py, with the
           per-step metrics of `bnlab.train.train_step` kept, cut to the loss, or dropped
           (XLA removes what is not returned).
  norm     the same `train_epoch` with BN (analytic or autodiff backward) and without BN.
  conv     the CNN's `train_epoch` with its im2col convolutions and with XLA's.

Command: python benchmarks/diagnostics.py [stats] [metrics] [norm] [conv]  (default: all)
Runtime: about 20 s (stats), 1 minute (metrics), 1 minute (norm), 40 s (conv), 2-core CPU.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import env_info
import jax
import jax.numpy as jnp
from jax import lax
from train_throughput import SPECS, bnlab_config, synthetic_mnist

from bnlab import data as data_lib
from bnlab import train as train_lib

AXES = (0, 1, 2)


def _normalize(x, mean, var):
    return (x - mean) * lax.rsqrt(var + 1e-5), mean, var


def _one_pass_moments(d, reduce):
    m1, m2 = reduce(d), reduce(jnp.square(d))
    return m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def _variants(view, reduce, shift_of):
    """The moment formulas over `view(x)` (4-D or (N, C)) with `reduce` over its batch axes."""

    def shifted_one_pass(x):  # bnlab since 2060e7f
        v = view(x)
        shift = lax.stop_gradient(shift_of(v))
        m1, var = _one_pass_moments(v - shift, reduce)
        return _normalize(x, (shift + m1).reshape(-1), var.reshape(-1))

    def shifted_two_pass(x):  # bnlab before 2060e7f
        v = view(x)
        shift = lax.stop_gradient(shift_of(v))
        mean = shift + reduce(v - shift)
        return _normalize(x, mean.reshape(-1), reduce(jnp.square(v - mean)).reshape(-1))

    def two_pass(x):  # flax use_fast_variance=False
        v = view(x)
        mean = reduce(v)
        return _normalize(x, mean.reshape(-1), reduce(jnp.square(v - mean)).reshape(-1))

    def one_pass(x):  # flax's default
        m1, var = _one_pass_moments(view(x), reduce)
        return _normalize(x, m1.reshape(-1), var.reshape(-1))

    return {f.__name__: f for f in (shifted_one_pass, shifted_two_pass, two_pass, one_pass)}


STATS_4D = _variants(
    lambda x: x,
    lambda v: jnp.mean(v, AXES, keepdims=True),
    lambda v: v[:1, :1, :1],
)
STATS_2D = _variants(
    lambda x: x.reshape(-1, x.shape[-1]),
    lambda v: jnp.mean(v, 0, keepdims=True),
    lambda v: v[:1],
)


def median_ms(fns: dict, args: tuple, reps: int, rounds: int = 10) -> dict[str, float]:
    """Median ms per call; the variants alternate in `rounds` blocks."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(max(reps // rounds, 1)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                samples[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def run_stats() -> None:
    x = jax.random.normal(jax.random.key(0), (128, 14, 14, 64)) + 3.0
    fns = {f"{name} 4-D": jax.jit(f) for name, f in STATS_4D.items()}
    fns |= {f"{name} (N,C)": jax.jit(f) for name, f in STATS_2D.items()}
    ms = median_ms(fns, (x,), reps=400)
    print("\nstats: forward BN on x (128,14,14,64) f32, median ms per call")
    for name, t in ms.items():
        print(f"  {name:<26}{t:8.3f} ms")


def _bnlab_epochs(model_name: str, steps: int, variants: dict[str, tuple[dict, object]]):
    """`{name: run_epoch}` for bnlab's train_epoch under config overrides and a step wrapper."""
    spec = SPECS[model_name]
    n = steps * spec.batch_size
    images, labels = (jax.device_put(a) for a in synthetic_mnist(n))
    base = {
        "model.name": model_name,
        "model.activation": "relu" if model_name == "cnn" else "sigmoid",
        "norm.momentum": "0.99",
        "opt.name": "sgd" if spec.momentum is None else "momentum",
        "opt.lr": str(spec.lr),
        "opt.momentum": str(spec.momentum or 0.0),
        "opt.schedule": "constant",
        "train.batch_size": str(spec.batch_size),
    }
    epochs = {}
    for name, (overrides, wrap) in variants.items():
        cfg = bnlab_config(spec.experiment, {**base, **overrides})
        programs = train_lib.make_programs(cfg, n)
        step = functools.partial(
            train_lib.train_step, model=programs.model, tx=programs.tx, schedule=programs.schedule
        )
        epoch_fn = jax.jit(
            functools.partial(
                train_lib.train_epoch, batch_size=spec.batch_size, step_fn=wrap(step)
            ),
            donate_argnums=0,
        )
        init_key, _ = train_lib.run_keys(0)
        state = programs.init(init_key, data_lib.to_float(images[: spec.batch_size]))

        def run_epoch(e, epoch_fn=epoch_fn, box=[state]):  # noqa: B006 - the state cell
            box[0], metrics = epoch_fn(box[0], images, labels, jax.random.key(e))
            jax.block_until_ready((box[0], metrics))

        epochs[name] = run_epoch
    return epochs, n


def _time_epochs(title: str, epochs: dict, n: int, steps: int, repeats: int) -> None:
    for run_epoch in epochs.values():
        run_epoch(0)  # compile
    times = {name: [] for name in epochs}
    for r in range(repeats):
        for name, run_epoch in epochs.items():
            t0 = time.perf_counter()
            run_epoch(r + 1)
            times[name].append(time.perf_counter() - t0)
    print(f"\n{title}")
    for name, t in times.items():
        median = statistics.median(t)
        print(f"  {name:<34}{1e3 * median / steps:8.3f} ms/step{n / median:10.0f} ex/s")


def _unchanged(step):
    return step


def _keep(*names):
    def wrap(step):
        def wrapped(state, batch):
            state, metrics = step(state, batch)
            return state, {k: metrics[k] for k in names}

        return wrapped

    return wrap


def run_metrics() -> None:
    variants = {
        "all metrics (bnlab as is)": ({}, _unchanged),
        "loss + accuracy": ({}, _keep("loss", "accuracy")),
        "loss + grad_norm": ({}, _keep("loss", "grad_norm")),
        "loss only": ({}, _keep("loss")),
    }
    for model_name, steps, repeats in (("mlp", 200, 9), ("cnn", 20, 3)):
        epochs, n = _bnlab_epochs(model_name, steps, variants)
        title = f"metrics: bnlab train_epoch, {model_name}, {steps} steps, median of {repeats}"
        _time_epochs(title, epochs, n, steps, repeats)


def run_norm() -> None:
    variants = {
        "BN, analytic backward": ({}, _unchanged),
        "BN, autodiff backward": ({"norm.backward": "autodiff"}, _unchanged),
        "no normalization": ({"model.norm": "none"}, _unchanged),
    }
    for model_name, steps, repeats in (("mlp", 200, 9), ("cnn", 20, 3)):
        epochs, n = _bnlab_epochs(model_name, steps, variants)
        title = f"norm: bnlab train_epoch, {model_name}, {steps} steps, median of {repeats}"
        _time_epochs(title, epochs, n, steps, repeats)


def run_conv() -> None:
    variants = {
        "conv_impl=im2col (bnlab default)": ({}, _unchanged),
        "conv_impl=xla (lax.conv)": ({"model.conv_impl": "xla"}, _unchanged),
    }
    # XLA's convolutions take over a second per step inside the scan: few steps.
    epochs, n = _bnlab_epochs("cnn", 5, variants)
    _time_epochs("conv: bnlab train_epoch, cnn, 5 steps, median of 3", epochs, n, 5, 3)


EXPERIMENTS = {"stats": run_stats, "metrics": run_metrics, "norm": run_norm, "conv": run_conv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", help=f"any of {list(EXPERIMENTS)}; default all")
    names = parser.parse_args().experiments or list(EXPERIMENTS)
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        parser.error(f"unknown experiments {unknown}; choose from {list(EXPERIMENTS)}")
    print(env_info.header())
    other_load = env_info.OtherLoad()
    for name in names:
        EXPERIMENTS[name]()
    print(other_load.report())


if __name__ == "__main__":
    main()
