"""The training loop shared by a single run and a vmapped group of trials.

The loop runs an epoch in chunks of compiled steps and, at each chunk end, hands the metrics to
each run's `records.Record`: log windows, evaluations at epoch ends (divergence, early
stopping), diagnostics, and checkpoints at the chunk ends that cross a multiple of
`checkpoint.every_steps`, at every epoch end with `checkpoint.best_metric`, when a run
finishes, and on SIGTERM/SIGINT (then `Interrupted` is raised). What differs between one run
and a group is only the `Engine`: a group's metrics and evaluations carry a leading trial axis,
and record `i` reads slice `i`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from bnlab.training.progress import Clock
from bnlab.training.records import Record
from bnlab.training.train import chunk_length

Metrics = dict[str, Any]


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped a run after it saved a checkpoint; run it again to resume.
    `finished`: the signal came as the run's last chunk ran, and the run finished (its
    summary.json is written): nothing of it is left to resume, but a sweep stops there."""

    def __init__(self, signum: int, step: int, *, finished: bool = False, saved: bool = True):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.finished, self.saved = signum, step, finished, saved


class Abandoned(KeyboardInterrupt):
    """A second SIGTERM/SIGINT stopped a run at once, without saving; `step` is where it
    stood and `saved` the last checkpoint's step (None: no checkpoint)."""

    def __init__(self, signum: int, step: int | None = None, saved: int | None = None):
        self.signum, self.step, self.saved = signum, step, saved
        super().__init__(self.describe())

    def describe(self) -> str:
        name = signal.Signals(self.signum).name
        where = "" if self.step is None else f" at step {self.step}"
        if self.saved is None:
            lost = "no checkpoint was saved yet, so the run restarts from step 0"
        else:
            lost = f"the last checkpoint is step {self.saved}"
            if self.step is not None and self.step > self.saved:
                lost += f"; the {self.step - self.saved} steps after it will be trained again"
        return f"stopped at once by a second {name}{where}, without saving: {lost}"


class StopSignals:
    """SIGTERM/SIGINT handling of a training loop.

    The first signal is a request (`signum`), acknowledged at once on stderr, that the loop
    acts on at the next chunk end (it saves a checkpoint, then raises `Interrupted`). A second
    signal raises `Abandoned` at once, except inside `critical()` sections (a checkpoint save,
    a summary), which it lets finish first, so no file is left half-written.
    """

    _active: StopSignals | None = None  # the innermost one entered (a command's, a loop's)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}
        self._critical = 0
        self._pending: int | None = None
        self._outer: StopSignals | None = None

    def __enter__(self):
        # Nested in a command's StopSignals (`bnlab train`/`sweep` hold one for their whole
        # life): a signal that came before this loop started stops it before its first step.
        self._outer, StopSignals._active = StopSignals._active, self
        if self._outer is not None:
            self.signum = self._outer.signum
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame  # unused
        if self.signum is None:
            self.signum = signum
            if self.announce:
                print(
                    f"\nbnlab: {signal.Signals(signum).name} received: saving a checkpoint and "
                    "stopping after the current chunk of steps (send it again to stop at once, "
                    "without saving).",
                    file=sys.stderr,
                    flush=True,
                )
        elif self._critical:
            self._pending = signum
        else:
            raise Abandoned(signum)

    @contextlib.contextmanager
    def critical(self):
        """A section that a second signal does not interrupt (it acts right after)."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if not self._critical and self._pending is not None:
            raise Abandoned(self._pending)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        StopSignals._active = self._outer
        if self._outer is not None and self.signum is not None:
            self._outer.signum = self.signum


def interruptible(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a worker thread while this (main) thread waits in short joins: Python runs
    signal handlers only in the main thread, between bytecodes, so a blocking call into XLA
    (compiling, or waiting for a chunk) would hold a Ctrl-C until it returns."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    result: dict[str, Any] = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - re-raised in the calling thread
            result["error"] = err

    worker = threading.Thread(target=target, daemon=True, name="bnlab-chunk")
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    if "error" in result:
        raise result["error"]
    return result["value"]


class Engine(NamedTuple):
    """The programs that the loop drives, on host-visible values."""

    # (state, epoch, first step in the epoch, steps) -> (state, host metrics per step)
    train: Callable[[Any, int, int, int], tuple[Any, Metrics]]
    # state -> {split: host metrics}, at epoch ends
    evaluate: Callable[[Any], dict[str, Metrics]]
    # state -> one host copy of the state per run (what a checkpoint holds)
    host_states: Callable[[Any], list[Any]]
    steps_per_epoch: int
    # True: metrics and evaluations carry a leading trial axis (a vmapped group)
    stacked: bool = False
    # (state, evaluations) -> state at each epoch end (e.g. reduce-on-plateau), or None
    end_epoch: Callable[[Any, dict[str, Metrics]], Any] | None = None
    # (state, step) -> host diagnostics measured at `step`, or None (no diagnostics)
    diagnose: Callable[[Any, int], Metrics] | None = None
    diagnose_every: int = 0  # chunks end at its multiples, where `diagnose` runs


def _take(tree: dict, i: int, stacked: bool) -> dict:
    if not stacked:
        return tree
    return {
        k: _take(v, i, True) if isinstance(v, dict) else np.asarray(v)[i] for k, v in tree.items()
    }


FIRST_CHUNK = 8  # steps of a run's first chunk, before any step has been timed


def next_steps(left: int, seconds_per_step: float | None, target_s: float) -> int:
    """Steps of the next chunk, at most `left`: as many as run in about `target_s` seconds at
    the latest measured pace (`FIRST_CHUNK` before one exists), so the display moves every few
    seconds whatever the model and machine; all of `left` when `target_s` is 0."""
    if target_s <= 0:
        return left
    if seconds_per_step is None:
        return min(left, FIRST_CHUNK)
    return max(1, min(left, int(target_s / max(seconds_per_step, 1e-9))))


def train(
    engine: Engine,
    state: Any,
    records: list[Record],
    *,
    stop: StopSignals,
    on_chunk: Callable[[list[Record], bool], None] | None = None,
) -> Any:
    """Trains until every record has finished (the last step, divergence, early stopping);
    finishes each one (its summary.json) and returns the final state."""
    cfg = records[0].cfg
    spe = engine.steps_per_epoch
    total = spe * cfg.train.epochs
    step = records[0].step
    for record in records:
        if not record.active or record.step >= total:  # resumed after its last step
            record.finish()
    if stop.signum is not None and _unfinished(records):  # it came before training began
        raise Interrupted(stop.signum, step, saved=False)
    try:
        state = _train(engine, state, records, stop, on_chunk, step, total)
    except Abandoned as err:
        saved = records[0].saved_step
        raise Abandoned(err.signum, records[0].step, saved) from None
    return state


def _diagnose(engine, state, records, step, stop) -> None:
    """The diagnostics due at `step` (before the checkpoint of that step: a resumed run never
    measures a step twice)."""
    if engine.diagnose is None or step % engine.diagnose_every:
        return
    values = interruptible(engine.diagnose, state, step)
    if not values:
        return
    with stop.critical():
        for i, record in enumerate(records):
            if record.active:
                record.add_diagnostics(step, _take(values, i, engine.stacked))


def _unfinished(records: list[Record]) -> bool:
    return any(r.active and r.summary is None for r in records)


def _train(engine, state, records, stop, on_chunk, step, total):
    """The loop. An epoch is cut into blocks of `chunk_length` steps (checkpoints are due at
    block ends, as they always were), and each block into chunks of about
    `train.progress_seconds` (signals, log lines and the display act at every chunk end)."""
    cfg = records[0].cfg
    spe = engine.steps_per_epoch
    block = chunk_length(cfg, spe)
    every, best = cfg.checkpoint.every_steps, cfg.checkpoint.best_metric
    pace: float | None = None  # seconds per step of the latest chunk
    if step == 0:
        _diagnose(engine, state, records, step, stop)
    block_start = step  # blocks run from where the loop starts, and from each epoch start
    while step < total and any(r.active for r in records):
        tick = time.perf_counter()
        indexed = [(i, r) for i, r in enumerate(records) if r.active]
        epoch, pos = divmod(step, spe)
        block_end = min(block_start + block, (epoch + 1) * spe)
        left = block_end - step
        if engine.diagnose is not None:  # a chunk ends at every measurement
            left = min(left, engine.diagnose_every - step % engine.diagnose_every)
        steps = next_steps(left, pace, cfg.train.progress_seconds)
        compiling = Clock.compile_seconds()
        state, metrics = interruptible(engine.train, state, epoch, pos, steps)
        seconds = time.perf_counter() - tick
        # A chunk during which anything compiled (here or in a background thread) times the
        # compiler too: its steps count for throughput only when no other chunk does.
        compiled = Clock.compile_seconds() > compiling
        pace = seconds / steps
        with stop.critical():  # what is written to files is never cut in half
            for i, record in indexed:
                record.add_throughput(seconds, steps, compiled=compiled)
                record.add_train(_take(metrics, i, engine.stacked))
        step += steps
        epoch_end = step % spe == 0
        if epoch_end:
            evals = interruptible(engine.evaluate, state)
            if engine.end_epoch is not None:
                state = engine.end_epoch(state, evals)
            with stop.critical():
                for i, record in indexed:
                    record.end_epoch(epoch, _take(evals, i, engine.stacked))
        _diagnose(engine, state, records, step, stop)
        for _, record in indexed:
            record.add_wall_time(time.perf_counter() - tick)
        ending = [(i, r) for i, r in indexed if not r.active or step == total]
        block_done = step == block_end
        due = (
            stop.signum is not None
            or (block_done and every and step // every > block_start // every)
            or (best and epoch_end)
        )
        if block_done:
            block_start = step
        with stop.critical():
            saving = indexed if due else ending
            if saving:
                hosts = engine.host_states(state)
                for i, record in saving:
                    record.save(hosts[i], epoch_end=epoch_end)
            for _, record in ending:
                record.finish()
        if on_chunk is not None:
            on_chunk(records, epoch_end)
        if stop.signum is not None and _unfinished(records):
            raise Interrupted(stop.signum, step)
    if stop.signum is not None:
        raise Interrupted(stop.signum, step, finished=True)
    return state
