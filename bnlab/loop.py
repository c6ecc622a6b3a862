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

import signal
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from bnlab.records import Record

Metrics = dict[str, Any]


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped a run after it saved a checkpoint; run it again to resume."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class StopSignals:
    """Turns the first SIGTERM/SIGINT into a request (`signum`) that the loop acts on at the
    next chunk end; a second signal acts at once, as the previous handler would."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame  # unused
        self.signum = signum
        self._restore()

    def _restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()


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


def _take(tree: dict, i: int, stacked: bool) -> dict:
    if not stacked:
        return tree
    return {
        k: _take(v, i, True) if isinstance(v, dict) else np.asarray(v)[i] for k, v in tree.items()
    }


def chunk_length(cfg, steps_per_epoch: int) -> int:
    """Steps per compiled chunk: `checkpoint.every_steps`, at most an epoch (so at most two
    chunk lengths compile: this one and an epoch's remainder)."""
    return min(cfg.checkpoint.every_steps or steps_per_epoch, steps_per_epoch)


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
    every, best = cfg.checkpoint.every_steps, cfg.checkpoint.best_metric
    chunk = chunk_length(cfg, spe)
    compiled: set[int] = set()
    step = records[0].step
    for record in records:
        if not record.active or record.step >= total:  # resumed after its last step
            record.finish()
    while step < total and any(r.active for r in records):
        tick = time.perf_counter()
        indexed = [(i, r) for i, r in enumerate(records) if r.active]
        epoch, pos = divmod(step, spe)
        steps = min(chunk, spe - pos)
        state, metrics = engine.train(state, epoch, pos, steps)
        seconds = time.perf_counter() - tick
        timed = steps in compiled  # the first chunk of each length includes its compilation
        compiled.add(steps)
        for i, record in indexed:
            record.add_train(_take(metrics, i, engine.stacked))
            if timed:
                record.add_throughput(seconds, steps)
        before, step = step, step + steps
        epoch_end = step % spe == 0
        if epoch_end:
            evals = engine.evaluate(state)
            if engine.end_epoch is not None:
                state = engine.end_epoch(state, evals)
            for i, record in indexed:
                record.end_epoch(epoch, _take(evals, i, engine.stacked))
        if on_chunk is not None:
            on_chunk(records, epoch_end)
        elapsed = time.perf_counter() - tick
        ending = [(i, r) for i, r in indexed if not r.active or step == total]
        saving = list(ending)
        if (
            stop.signum is not None
            or (every and step // every > before // every)
            or (best and epoch_end)
        ):
            saving = indexed
        for _, record in indexed:
            record.add_wall_time(elapsed)
        if saving:
            hosts = engine.host_states(state)
            for i, record in saving:
                record.save(hosts[i], epoch_end=epoch_end)
        for _, record in ending:
            record.finish()
        if stop.signum is not None and any(r.active for r in records):
            raise Interrupted(stop.signum, step)
    return state
