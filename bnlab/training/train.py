"""Training programs: epochs of `bnlab.training.step.train_step` scanned on device, evaluation,
and the compiled programs of a run (`make_programs`). The step's names are re-exported here."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bnlab import data as data_lib
from bnlab import diagnostics, optim
from bnlab.config import Config, ConfigError
from bnlab.training import parallel
from bnlab.training.step import (  # noqa: F401 - the step's names, re-exported
    SMALL_LEAF,
    Metrics,
    TrainState,
    build_model,
    cross_entropy,
    global_norm,
    init_state,
    norm_metrics,
    stats_refresh,
    step_rngs,
    train_step,
)
from bnlab.types import Array, BatchStats, Params


def epoch_batches(key: Array, num_examples: int, batch_size: int) -> Array:
    """Indices `i32[steps, batch_size]` of one shuffled epoch (the remainder is dropped)."""
    steps = num_examples // batch_size
    perm = jax.random.permutation(key, num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def train_epoch(
    state: TrainState,
    images: Array,
    labels: Array,
    key: Array,
    start: Array | int = 0,
    steps: Array | int | None = None,
    *,
    batch_size: int,
    step_fn: Callable[[TrainState, tuple[Array, Array]], tuple[TrainState, Metrics]],
    length: int | None = None,
    axis_name: str | None = None,
    rng: Array | None = None,
    refresh: Callable[[TrainState, Array, Array], TrainState] | None = None,
) -> tuple[TrainState, Metrics]:
    """Steps `[start, start + steps)` of the epoch that `key` shuffles, on device, with the
    metrics of every step.

    A while loop with the trip count `steps` (a traced value) writes each step's metrics into
    a buffer of `length` steps, so one compiled program runs every chunk of up to `length`
    steps. Running an epoch in chunks gives exactly the steps (and bits) of running it whole.

    Args:
      state, images, labels: the train state and the whole split (uint8 images on device).
      key: the epoch's shuffling key (`epoch_batches`).
      start, steps: the chunk of the epoch; `steps=None` is the whole epoch from step 0.
      batch_size, step_fn: examples per step and `train_step` with its statics bound.
      length: the buffer's (static) number of steps, >= steps; default `steps` (then static).
      axis_name: under a device map, each device gathers only its part of every batch.
      rng: the run's key for random layers, given to every step.
      refresh: `(state, images, index in the epoch) -> state` before each step: statistics
        from the data (`stats_refresh`), or None.

    Returns:
      `(state, metrics)`: metrics `f32[length]` each, the first `steps` filled, the rest 0.
    """
    extra = {} if rng is None else {"rng": rng}
    batches = epoch_batches(key, labels.shape[0], batch_size)
    if steps is None:
        start, steps = 0, batches.shape[0]
    length = int(steps) if length is None else length
    steps = jnp.asarray(steps, jnp.int32)

    def step(state, i):
        idx = lax.dynamic_index_in_dim(batches, start + i, keepdims=False)
        if axis_name is not None:
            idx = parallel.device_slice(idx, axis_name)
        if refresh is not None:
            state = refresh(state, images, start + i)
        return step_fn(state, (data_lib.to_float(images[idx]), labels[idx]), **extra)

    def body(carry):
        i, state, buffer = carry
        state, metrics = step(state, i)
        buffer = jax.tree.map(lambda b, m: b.at[i].set(m), buffer, metrics)
        return i + 1, state, buffer

    shapes = jax.eval_shape(step, state, 0)[1]
    buffer = jax.tree.map(lambda m: jnp.zeros((length, *m.shape), m.dtype), shapes)
    # A while loop for every call alike (a scan where `steps` is known), so that a chunk and
    # the whole epoch run the same per-step code and give the same bits.
    carry = (jnp.zeros((), jnp.int32), state, buffer)
    _, state, metrics = lax.while_loop(lambda c: c[0] < steps, body, carry)
    return state, metrics


def evaluate(
    params: Params,
    batch_stats: BatchStats,
    images: Array,
    labels: Array,
    *,
    model: nn.Module,
    batch_size: int,
    probe_unit: int = -1,
    measures: tuple = (),
) -> Metrics:
    """Mean loss and accuracy over a whole split, with the running statistics.

    Also the arrays of the diagnostics measured in evaluation: `measures`, pairs
    `(SplitMeasure, arg)` as `bnlab.diagnostics.split_measures(cfg)` gives them; `probe_unit
    >= 0` adds the registered `probe` for that unit: the 15th/50th/85th percentiles over the
    split of the input to its nonlinearity in the last hidden layer (`act_p15`, `act_p50`,
    `act_p85`; Ioffe & Szegedy 2015, Fig. 1b,c).
    """
    measures = tuple(measures)
    probe = (diagnostics.get("probe").on_split, probe_unit)
    if probe_unit >= 0 and probe not in measures:
        measures += (probe,)
    n = labels.shape[0]
    steps = -(-n // batch_size)
    idx = jnp.arange(steps * batch_size).reshape(steps, batch_size)
    valid = idx < n
    idx = jnp.minimum(idx, n - 1)  # padded rows repeat the last example and are masked out

    def body(totals, xs):
        i, mask = xs
        logits, inter = model.apply(
            {"params": params, "batch_stats": batch_stats},
            data_lib.to_float(images[i]),
            train=False,
            mutable=["intermediates"] if measures else [],
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels[i])
        correct = jnp.argmax(logits, -1) == labels[i]
        collected = tuple(m.collect(inter, mask, arg) for m, arg in measures)
        return (totals[0] + jnp.sum(losses * mask), totals[1] + jnp.sum(correct * mask)), collected

    (loss, correct), collected = lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (idx, valid))
    metrics = {"loss": loss / n, "accuracy": correct / n}
    for (m, arg), values in zip(measures, collected, strict=True):
        arrays = m.reduce(values, arg)
        if clash := sorted(arrays.keys() & metrics.keys()):
            raise ValueError(f"a diagnostic measured in evaluation returns {clash}, taken")
        metrics.update(arrays)
    return metrics


PROBE_PERCENTILES = diagnostics.probe.PERCENTILES


# Compiler options of a program that runs once per run (the initialization): LLVM's level-1
# optimizations compile its random-number generation about 4x faster than the default, and
# give the same bits (tests/test_speed.py checks it).
RUN_ONCE = {"xla_backend_optimization_level": 1}


class Programs(NamedTuple):
    """The compiled pieces of a run, built once from its config."""

    model: nn.Module
    tx: optax.GradientTransformation
    schedule: Callable[[Array], Array]
    init: Callable[..., TrainState]
    train_epoch: Callable[..., tuple[TrainState, Metrics]]
    evaluate: Callable[..., Metrics]
    steps_per_epoch: int
    # (state, train set, test set, data key, rng=None): compiles the first chunk and the
    # evaluation in background threads (one device; see `Ahead`)
    compile_ahead: Callable[..., None] = lambda *args, **kwargs: None
    # Waits for those compilations: a run that stops before it uses them (an error, a signal)
    # calls it before raising, since a process that exits while XLA compiles in a thread aborts.
    settle: Callable[[], None] = lambda: None


class Ahead:
    """A jitted function whose first compilation can run in a background thread (`start`), so
    that a run's programs compile side by side, and beside its other set-up (on 2 cores a cold
    run's compilation took about half the time). A call waits for that compilation, then finds
    the executable in JAX's caches; should the background one fail, or be for other argument
    types, the call compiles as usual (and raises what there is to raise)."""

    def __init__(self, jitted: Callable[..., Any]):
        self.jitted = jitted
        self._thread: threading.Thread | None = None

    def start(self, *args: Any, **kwargs: Any) -> None:
        def compile_in_background():
            with contextlib.suppress(Exception):  # the call compiles again and reports it
                self.jitted.lower(*args, **kwargs).compile()

        self._thread = threading.Thread(target=compile_in_background, daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Waits for the background compilation, if one runs."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.join()
        return self.jitted(*args, **kwargs)


def make_programs(cfg: Config, num_train: int) -> Programs:
    """Model, optimizer and the jitted `init`/`train_epoch`/`evaluate` for `cfg`."""
    steps_per_epoch = num_train // cfg.train.batch_size
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.opt.schedule == "warmup_cosine" and cfg.opt.warmup_steps >= total_steps:
        raise ConfigError(
            f"opt.warmup_steps={cfg.opt.warmup_steps} must be shorter than the run's "
            f"{total_steps} steps; lower it or train longer."
        )
    model = build_model(cfg)
    tx, schedule = optim.make_optimizer(cfg.opt, total_steps)
    evaluate_ = Ahead(
        jax.jit(
            functools.partial(
                evaluate,
                model=model,
                batch_size=cfg.train.eval_batch_size,
                measures=diagnostics.split_measures(cfg),
            )
        )
    )
    train_epoch_, first_chunk = _epoch_program(cfg, model, tx, schedule, steps_per_epoch)

    def compile_ahead(state, train_set, test_set, key, rng=None):
        if first_chunk is not None:
            first_chunk(state, train_set.images, train_set.labels, key, rng)
        evaluate_.start(state.params, state.batch_stats, test_set.images, test_set.labels)

    def settle():
        if first_chunk is not None:
            first_chunk.join()
        evaluate_.join()

    return Programs(
        model=model,
        tx=tx,
        schedule=schedule,
        init=jax.jit(functools.partial(init_state, model, tx), compiler_options=RUN_ONCE),
        train_epoch=train_epoch_,
        evaluate=evaluate_,
        steps_per_epoch=steps_per_epoch,
        compile_ahead=compile_ahead,
        settle=settle,
    )


def _epoch_program(cfg: Config, model, tx, schedule, steps_per_epoch: int):
    """`train_epoch(state, images, labels, key, start=0, steps=None, rng=None)`: `steps`
    (default: the rest of the epoch) from `start`, compiled for one device or mapped over the
    devices of `cfg.parallel`; either way on a plain (unreplicated) `TrainState`. Every chunk
    of up to `chunk_length` steps runs one compiled program; the metrics come back to the host,
    `steps` of each. Also `first_chunk(state, images, labels, key, rng)`, which starts
    compiling that program in the background (None for the device-mapped modes)."""
    par = cfg.parallel
    axis_name = None if par.mode == "none" else parallel.AXIS
    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        axis_name=axis_name,
        average_stats=par.bn == "local",
        extra_metrics=norm_metrics(cfg),
    )
    epoch = functools.partial(
        train_epoch,
        batch_size=cfg.train.batch_size,
        step_fn=step_fn,
        axis_name=axis_name,
        refresh=stats_refresh(cfg, model),
    )
    chunk = chunk_length(cfg, steps_per_epoch)
    first_chunk = None
    if par.mode == "none":
        jitted = Ahead(jax.jit(epoch, donate_argnums=0, static_argnames="length"))

        def program(state, images, labels, key, start, rng, steps, length):
            return jitted(state, images, labels, key, start, steps, length=length, rng=rng)

        def first_chunk(state, images, labels, key, rng):
            jitted.start(state, images, labels, key, 0, chunk, length=chunk, rng=rng)

        first_chunk.join = jitted.join  # type: ignore[attr-defined]

    else:
        num_devices = parallel.device_count(par, cfg.train.batch_size)

        @functools.cache
        def mapped(length):
            def per_device(state, images, labels, key, start, steps, *rng):
                rng = rng[0] if rng else None
                return epoch(state, images, labels, key, start, steps, length=length, rng=rng)

            return parallel.device_map(per_device, mode=par.mode, num_devices=num_devices)

        def program(state, images, labels, key, start, rng, steps, length):
            counts = (jnp.asarray(start, jnp.int32), jnp.asarray(steps, jnp.int32))
            args = (state, images, labels, key, *counts)
            args += () if rng is None else (rng,)
            return parallel.first_device(mapped(length)(*args))

    chunks = one_program(program, chunk)

    def run_epoch(state, images, labels, key, start=0, steps=None, rng=None):
        steps = steps_per_epoch - start if steps is None else steps
        return chunks(state, images, labels, key, start, rng, steps=steps)

    if par.mode == "none":

        def lower(state, images, labels, key, start=0, steps=None, rng=None):
            """The chunk program that `run_epoch` would call, lowered (to read its HLO)."""
            steps = steps_per_epoch - start if steps is None else steps
            length = max(chunk, steps)
            return jitted.jitted.lower(
                state, images, labels, key, start, steps, length=length, rng=rng
            )

        run_epoch.lower = lower  # type: ignore[attr-defined]
    return run_epoch, first_chunk


def chunk_length(cfg: Config, steps_per_epoch: int) -> int:
    """The most steps one chunk of a run runs: `checkpoint.every_steps`, at most an epoch. The
    loop runs an epoch in blocks of this many steps (checkpoints fall due at block ends), each
    cut into shorter chunks of about `train.progress_seconds`; one program, compiled for this
    length, runs every chunk (`one_program`)."""
    return min(cfg.checkpoint.every_steps or steps_per_epoch, steps_per_epoch)


def one_program(
    program: Callable[..., tuple[Any, Metrics]], chunk: int, *, trial_axis: bool = False
) -> Callable[..., tuple[Any, Metrics]]:
    """Runs chunks of any number of steps up to `chunk` through one compiled program: the
    remainder of an epoch, a resumed run's first chunk and every other chunk length share the
    program compiled for `chunk`.

    Args:
      program: `program(*args, steps, length)` runs `steps` (a traced count) and returns
        `(state, metrics)` with per-step metrics in buffers of `length` (static) steps, as
        `train_epoch` does.
      chunk: the buffer length every chunk up to it uses.
      trial_axis: the metrics carry a leading trial axis (a vmapped group).

    Returns:
      `call(*args, steps=k)`: `program(*args, k, max(chunk, k))`, its metrics cut to their
      first `k` steps, as numpy arrays on the host.
    """

    def call(*args, steps: int):
        state, metrics = program(*args, steps, max(chunk, steps))
        cut = (slice(None), slice(steps)) if trial_axis else slice(steps)
        return state, jax.tree.map(lambda m: np.asarray(m)[cut], metrics)

    return call


def run_keys(seed: int) -> tuple[Array, Array]:
    """`(init_key, data_key)` of a run; epoch `e` shuffles with `fold_in(data_key, e)`."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def run_rng(seed: int) -> Array:
    """The key of a run's random layers (noise, dropout); step `t` uses `step_rngs(rng, t)`."""
    return jax.random.fold_in(jax.random.key(seed), 2)
