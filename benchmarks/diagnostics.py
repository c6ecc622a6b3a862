"""Experiments that locate bnlab's CPU costs (see BENCHMARKS.md, "Findings").

  stats    forward BN (statistics + normalize) on x (128,14,14,64) f32 with several ways of
           computing the batch moments: bnlab's (one pass over x shifted by its first sample),
           bnlab's before commit 2060e7f (shift, then two passes), two-pass, one-pass (flax's
           default), each reduced over the 4-D array and over a 2-D (N, C) view of it.
  metrics  bnlab's own `train_epoch` for the MLP and CNN of train_throughput.py, with the
           per-step metrics of `bnlab.training.train.train_step` kept, cut to the loss, or dropped
           (XLA removes what is not returned).
  norm     the same `train_epoch` with BN (analytic or autodiff backward) and without BN.
  conv     the CNN's `train_epoch` with its im2col convolutions and with XLA's.
  profile  where the CNN's compiled training step spends its time: one epoch of
           `train_epoch` under `jax.profiler`, each executed HLO operation's time mapped to
           the model operation it comes from (the `op_name` of the optimized HLO) and summed
           by kind (matmuls, normalization, im2col patches, pooling, the rest); the top 12.

Command: python benchmarks/diagnostics.py [stats] [metrics] [norm] [conv] [profile]
         (default: all)
Runtime: about 20 s (stats), 1 minute (metrics), 1 minute (norm), 40 s (conv), 20 s
(profile), 2-core CPU.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import env_info
import jax
import jax.numpy as jnp
from jax import lax
from train_throughput import SPECS, bnlab_config, synthetic_mnist

from bnlab import data as data_lib
from bnlab.training import train as train_lib

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


def _bnlab_epochs(
    model_name: str,
    steps: int,
    variants: dict[str, tuple[dict, object]],
    keep_compiled: bool = False,
):
    """`{name: run_epoch}` for bnlab's train_epoch under config overrides and a step wrapper;
    `{name: (run_epoch, compiled)}` with `keep_compiled` (the epoch compiled ahead)."""
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
        if keep_compiled:
            epoch_fn = epoch_fn.lower(state, images, labels, jax.random.key(0)).compile()

        def run_epoch(e, epoch_fn=epoch_fn, box=[state]):  # noqa: B006 - the state cell
            box[0], metrics = epoch_fn(box[0], images, labels, jax.random.key(e))
            jax.block_until_ready((box[0], metrics))

        epochs[name] = (run_epoch, epoch_fn) if keep_compiled else run_epoch
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


def _op_kind(op: str, op_name: str) -> str:
    """The kind of model operation an executed HLO operation (fusions by their root) serves."""
    if (
        "dot_general" in op_name
        or op == "dot"
        or re.search(r"/(conv\d|dense|head)/transpose", op_name)
    ):
        return "matmuls (im2col convolutions, dense layers)"
    if "/norm/" in op_name:
        return "normalization (BN forward and backward)"
    if "reduce_window" in op_name or "reduce_sum" in op_name:
        return "pooling and the bias gradients"
    if re.search(r"/conv\d/", op_name):
        return "im2col patches and their gradient (concatenate, pad, slice)"
    return "the rest (relu, loss, optimizer, data)"


def run_profile(steps: int = 40) -> None:
    epochs, n = _bnlab_epochs("cnn", steps, {"bnlab as is": ({}, _unchanged)}, keep_compiled=True)
    run_epoch, compiled = epochs["bnlab as is"]
    run_epoch(0)
    run_epoch(1)
    hlo = {}  # instruction name -> (op, op_name) of the optimized module
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if m:
            op_name = re.search(r'op_name="([^"]*)"', line)
            hlo[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        t0 = time.perf_counter()
        run_epoch(2)
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        trace_file = next(Path(folder).rglob("*.trace.json.gz"))
        trace = json.loads(gzip.decompress(trace_file.read_bytes()))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in hlo:
            per_op[e["name"]] += e["dur"] / 1e3 / steps  # ms per step
    kinds = collections.Counter()
    for name, ms in per_op.items():
        kinds[_op_kind(*hlo[name])] += ms
    print(f"\nprofile: bnlab train_epoch, cnn, batch 128, one epoch of {steps} steps")
    print(f"  {1e3 * wall / steps:.2f} ms/step wall under the profiler; {sum(per_op.values()):.2f} "
          "ms/step in HLO operations (the runtime may overlap independent ones)")  # fmt: skip
    for kind, ms in kinds.most_common():
        print(f"  {ms:7.2f} ms  {kind}")
    print("  top operations:")
    for name, ms in per_op.most_common(12):
        op, op_name = hlo[name]
        where = op_name.split("while/body/")[-1]
        print(f"  {ms:7.2f} ms  {name:<28} {where}")


EXPERIMENTS = {
    "stats": run_stats,
    "metrics": run_metrics,
    "norm": run_norm,
    "conv": run_conv,
    "profile": run_profile,
}


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
