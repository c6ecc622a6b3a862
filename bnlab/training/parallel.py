"""Data parallelism: the device axis, programs mapped over devices (pmap or a sharded jit), and
the multi-process runtime.

Every device runs the same per-device function, bound to the axis `AXIS`: gradients are
averaged with `lax.pmean(..., AXIS)` and BN computes its statistics across `AXIS`. `pmap` and
`sharded` (a `jax.jit` of a `shard_map` over a 1-D `Mesh`, inputs placed with `NamedSharding`)
run that function with the same explicit collectives, so they give the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnlab.config import ConfigError, ParallelConfig, split_problems
from bnlab.types import Array, PyTree

AXIS = "devices"  # the one name of the data-parallel device axis
MODES = ("pmap", "sharded")
EXIT_LOST_PROCESS = 5  # a multi-process run stopped because another process stopped or hangs
_MESSAGE_BYTES = 4096  # an error message shared between processes, UTF-8, truncated to this
T = TypeVar("T")


def initialize(par: ParallelConfig) -> None:
    """Joins JAX's multi-process runtime when `par.num_processes > 1`; call before any
    computation (loading data included). A no-op for one process or when already joined."""
    if par.num_processes <= 1 or jax.distributed.is_initialized():
        return
    # CPU devices of different processes reach each other only through gloo collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=par.coordinator_address,
        num_processes=par.num_processes,
        process_id=par.process_id,
        # JAX aborts a process whose peer stops sending heartbeats; bnlab's own watchdog
        # (`Watchdog`, parallel.timeout_s) stops it first, with a message that says why.
        heartbeat_timeout_seconds=int(par.timeout_s) + 60,
        initialization_timeout=int(max(par.timeout_s, 60)),
    )


class LostProcess(RuntimeError):
    """Another process of a multi-process run stopped (a collective with it failed), or one
    failed (`failed`): every process stops with `EXIT_LOST_PROCESS`."""

    def __init__(self, cause: BaseException, *, message: str | None = None):
        first = str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ""
        super().__init__(
            message
            or f"process {jax.process_index()} of {jax.process_count()} lost contact with "
            f"another process of this run ({first}); it stopped or was killed (see its output). "
            "Start every process again with the same command to resume from the last checkpoint."
        )

    @classmethod
    def failed(cls, index: int, error: str) -> LostProcess:
        """Process `index` failed with `error` (`"OSError: ..."`) where all had to agree."""
        return cls(
            RuntimeError(error),
            message=f"process {index} of {jax.process_count()} failed ({error[:300]}), so every "
            "process of this run stops. Fix the cause (see that process's output), then start "
            "every process again with the same command to resume from the last checkpoint.",
        )


@contextlib.contextmanager
def lost_process_errors():
    """Turns the runtime error of a collective whose peer is gone into `LostProcess` (in a
    multi-process run; alone, errors pass unchanged)."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if jax.process_count() > 1:
            raise LostProcess(err) from err
        raise


LEADER_GRACE_S = 3.0  # seconds process 0 waits before it leaves a failed run


def coordinator_leaves_last() -> None:
    """In a multi-process run that stops, process 0 (JAX's coordinator) waits a moment before
    it exits: a process whose coordinator is gone is aborted by JAX's agent (SIGABRT) instead
    of exiting with its own status."""
    if jax.process_count() > 1 and jax.process_index() == 0:
        time.sleep(LEADER_GRACE_S)


def is_primary() -> bool:
    """True in the process that writes a run's files (process 0; the only one when alone)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing to do when alone)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(fn: Callable[[], T], errors: tuple[type[Exception], ...]) -> T:
    """Runs `fn` in every process; if it raises in any process, every process learns it at
    once (rather than waiting on a collective until JAX's heartbeat timeout): one of `errors`
    (bad input) is raised alike in all of them (the first failing process's, class and
    message); any other exception stops all of them as `LostProcess` (exit 5), the failing
    process printing its traceback first."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    failure, result = None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - shared with the other processes below
        failure = err
    text = "" if failure is None else f"{type(failure).__name__}\n{failure}"
    data = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    encoded = text.encode()[:_MESSAGE_BYTES]
    data[0] = failure is not None
    data[1 : 1 + len(encoded)] = np.frombuffer(encoded, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(data))
    for index, row in enumerate(gathered):
        if row[0]:
            name, _, message = bytes(row[1:]).rstrip(b"\0").decode(errors="replace").partition("\n")
            cls = next((e for e in errors if e.__name__ == name), None)
            if cls is not None:
                if failure is not None and index == jax.process_index():
                    raise failure
                raise cls(f"(process {index}) {message}")
            if failure is not None and index == jax.process_index():
                traceback.print_exception(failure, file=sys.stderr)
                raise LostProcess.failed(index, f"{name}: {message}") from failure
            raise LostProcess.failed(index, f"{name}: {message}")
    return result


def same_everywhere(value: int, what: str) -> int:
    """`value` when every process has the same one; else a `ValueError` in all of them that
    lists each process's value (alone: `value`)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    values = np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64))).tolist()
    if len(set(values)) > 1:
        each = ", ".join(f"process {i}: {v}" for i, v in enumerate(values))
        raise ValueError(f"the processes of this run differ in {what} ({each})")
    return value


class Watchdog:
    """Stops this process with a clear message when the run makes no progress for `timeout_s`:
    in a multi-process run, a process whose peer was killed or hangs would otherwise wait on
    a collective forever. Call `kick()` at every sign of progress; a no-op when alone."""

    def __init__(self, timeout_s: float, *, enabled: bool | None = None):
        self.timeout_s = timeout_s
        self.enabled = jax.process_count() > 1 if enabled is None else enabled
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        self._last = time.monotonic()

    def __enter__(self):
        if self.enabled:
            self.kick()
            self._thread = threading.Thread(target=self._watch, daemon=True, name="bnlab-watchdog")
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(
                    f"bnlab: error: process {jax.process_index()} of {jax.process_count()} made "
                    f"no progress for {idle:.0f} s (parallel.timeout_s={self.timeout_s:g}): "
                    "another process of this run stopped or hangs (see its output). Stopping "
                    "this one too; start every process again with the same command to resume "
                    "from the last checkpoint.",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(EXIT_LOST_PROCESS)

    def __exit__(self, *exc):
        self._done.set()


def device_count(par: ParallelConfig, batch_size: int) -> int:
    """The devices that split each batch; a `ConfigError` saying how to fix a bad split."""
    available = jax.device_count()
    n = par.num_devices or available
    if n > available:
        raise ConfigError(
            f"parallel.num_devices={n} but only {available} devices are visible; lower it "
            "(0 uses all of them)."
        )
    if jax.process_count() > 1 and n != available:
        raise ConfigError(
            f"parallel.num_devices={n}: a multi-process run uses all {available} devices of "
            "its processes; set parallel.num_devices=0."
        )
    problems = split_problems(batch_size, n, par.bn, par.bn_group_size)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return n


def bn_axis(par: ParallelConfig, num_devices: int) -> dict[str, Any]:
    """`axis_name`/`axis_index_groups` of the BN layers for `par.bn`.

    `sync`: statistics over all devices. `local`: over each device alone (ghost BN), or over
    groups of `bn_group_size` consecutive devices.
    """
    if par.mode == "none" or (par.bn == "local" and par.bn_group_size == 1):
        return {"axis_name": None, "axis_index_groups": None}
    if par.bn == "sync" or par.bn_group_size == num_devices:
        return {"axis_name": AXIS, "axis_index_groups": None}
    size = par.bn_group_size
    groups = tuple(tuple(range(i, i + size)) for i in range(0, num_devices, size))
    return {"axis_name": AXIS, "axis_index_groups": groups}


def device_slice(x: Array, axis_name: str = AXIS) -> Array:
    """This device's equal part of `x` along axis 0 (devices in axis-index order)."""
    per_device = x.shape[0] // lax.axis_size(axis_name)
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis_name) * per_device, per_device)


def device_map(
    fn: Callable[..., PyTree],
    *,
    mode: str,
    num_devices: int,
    split_argnums: Sequence[int] = (),
) -> Callable[..., PyTree]:
    """`fn` on each of the first `num_devices` devices, bound to `AXIS`.

    The arguments at `split_argnums` carry a leading device axis (one slice per device); the
    others are replicated. Every output gets a leading device axis. `mode` is "pmap" or
    "sharded"; both compile once per number of arguments.
    """
    if mode not in MODES:
        raise ValueError(f"device_map: unknown mode {mode!r}; use one of {MODES}.")
    devices = jax.devices()[:num_devices]
    split = frozenset(split_argnums)

    @functools.cache
    def mapped(nargs: int):
        if mode == "pmap":
            # pmap counts devices from a mapped argument: the device indices serve when none is.
            in_axes = (0,) + tuple(0 if i in split else None for i in range(nargs))
            program = jax.pmap(lambda _, *a: fn(*a), AXIS, in_axes=in_axes, devices=devices)
            return lambda *args: program(np.arange(num_devices), *args)
        mesh = Mesh(np.asarray(devices), (AXIS,))
        specs = tuple(P(AXIS) if i in split else P() for i in range(nargs))

        def per_device(*args):
            args = [
                jax.tree.map(lambda a: a[0], a) if i in split else a for i, a in enumerate(args)
            ]
            return jax.tree.map(lambda y: y[None], fn(*args))

        # check_vma=False keeps pmap's semantics: gradients w.r.t. replicated inputs stay
        # per device (averaged explicitly), instead of being summed by an implicit psum.
        program = jax.jit(
            jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False)
        )

        def run(*args):
            return program(
                *(_place(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True))
            )

        return run

    return lambda *args: mapped(len(args))(*args)


def first_device(tree: PyTree) -> PyTree:
    """The slice of each device-stacked output on this process's first device, as a plain
    single-device array (device 0 in a single process); for a replicated result, the result."""
    return jax.tree.map(lambda a: a.addressable_shards[0].data.reshape(a.shape[1:]), tree)


def _place(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """`tree` as global arrays with `sharding`, from every process's copy of the whole value."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(a):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(place(jax.random.key_data(a)))
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(lambda a: place(jax.numpy.asarray(a)), tree)
