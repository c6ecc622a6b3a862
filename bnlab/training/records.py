"""The files of one run: config.json, metrics.jsonl and TensorBoard, summary.json, and the
progress saved with each checkpoint.

A single run and each trial of a vmapped group keep one `Record` and write every file through
it, so the two engines cannot drift apart. A `Record` holds where its run stands (step, the
per-step train metrics of the epoch in progress, the last evaluations, status, times); its
`meta()` goes into every checkpoint, and a resumed run starts from it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bnlab.config import Config
from bnlab.training.checkpoint import CHECKPOINT_DIR, Checkpointer
from bnlab.training.workdir import EXPERIMENT_FILE
from bnlab.training.writers import MetricWriter, write_json

# Evaluated at every epoch end, in this order (train_eval and validation when configured).
EVAL_SPLITS = ("train_eval", "validation", "test")
FINISHED = ("ok", "diverged", "early_stopped")  # statuses of a run that has its result


def window_records(metrics: dict[str, np.ndarray], first_step: int, every: int):
    """Per-epoch windows of `every` steps (the last may be shorter): (last step, means) pairs.

    Each record carries `window`, the number of steps it averages.
    """
    steps = len(next(iter(metrics.values())))
    for start in range(0, steps, every):
        stop = min(start + every, steps)
        means = {k: float(np.mean(v[start:stop])) for k, v in metrics.items()}
        yield first_step + stop, {**means, "window": stop - start}


def diverged(
    train: dict[str, np.ndarray], evals: dict[str, dict[str, float]], bound: float
) -> bool:
    """Any non-finite train metric of the epoch, a train loss above `bound`, or a non-finite or
    too large evaluation loss (a NaN made by an epoch's last step shows only in the weights)."""
    for values in train.values():
        if not np.all(np.isfinite(values)):
            return True
    if "loss" in train and np.any(np.asarray(train["loss"]) > bound):
        return True
    return any(not math.isfinite(e["loss"]) or e["loss"] > bound for e in evals.values())


class Record:
    """Where one run stands, and its files. `writes=False` (every process but the first of a
    multi-process run) keeps the state without writing anything."""

    def __init__(
        self,
        cfg: Config,
        workdir: Path,
        *,
        steps_per_epoch: int,
        meta: dict[str, Any] | None = None,
        engine: str | None = None,
        writes: bool = True,
    ):
        self.cfg, self.workdir, self.engine, self.writes = cfg, Path(workdir), engine, writes
        self.steps_per_epoch = steps_per_epoch
        meta = meta or {}
        self.step: int = meta.get("step", 0)
        # Per-step train metrics of the epoch in progress (its windows and divergence need them).
        self.epoch_metrics = {
            k: np.asarray(v, np.float32) for k, v in meta.get("epoch", {}).items()
        }
        self.evals: dict[str, dict[str, float]] = dict(meta.get("evals", {}))
        if "test" in meta and "test" not in self.evals and meta["test"]:
            self.evals["test"] = meta["test"]  # a checkpoint of an earlier bnlab
        self.status: str = meta.get("status", "ok")
        self.wall_time_s: float = meta.get("wall_time_s", 0.0)
        # Seconds and steps of the chunks during which nothing compiled, and of every chunk.
        self.train_time_s: float = meta.get("train_time_s", 0.0)
        self.timed_steps: int = meta.get("timed_steps", 0)
        self.chunk_time_s: float = meta.get("chunk_time_s", 0.0)
        self.chunk_steps: int = meta.get("chunk_steps", 0)
        self.pace: float | None = None  # examples/s of the latest chunk without compilation
        self.best: dict[str, Any] | None = meta.get("best")
        self.stale_epochs: int = meta.get("stale_epochs", 0)
        self.saved_step: int | None = meta.get("step")  # the checkpoint it resumes from, if any
        self.summary: dict[str, Any] | None = None
        # Called with (step, split, values) for every record written (a progress display).
        self.listener: Callable[[int, str, dict[str, Any]], None] | None = None
        self._writer: MetricWriter | None = None
        self._ckpt: Checkpointer | None = None

    @property
    def active(self) -> bool:
        return self.status == "ok"

    # --- files -------------------------------------------------------------------------------

    def start(self, *, purge_step: int | None = None, experiment: str | None = None) -> None:
        """Writes config.json (and experiment.json, the path of the experiment file) and opens
        the metric files (appending, after a resume)."""
        if self.writes:
            write_json(self.workdir / "config.json", self.cfg.to_dict())
            if experiment is not None:
                path = str(Path(experiment).absolute())
                write_json(self.workdir / EXPERIMENT_FILE, {"path": path})
            self._writer = MetricWriter(self.workdir, purge_step=purge_step)

    @property
    def checkpointer(self) -> Checkpointer:
        if self._ckpt is None:
            self._ckpt = Checkpointer(self.workdir / CHECKPOINT_DIR, self.cfg.checkpoint)
        return self._ckpt

    def _write(self, step: int, split: str, **values: Any) -> None:
        if self._writer is not None:
            self._writer.write(step, split, **values)
        if self.listener is not None:
            self.listener(step, split, values)

    def close(self) -> None:
        """Closes the files; called in a `finally` while an error propagates (a full disk), a
        failure to flush them leaves that error to be reported, not its echo."""
        pending = sys.exc_info()[1]
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except OSError:
            if pending is None:
                raise
        finally:
            if self._ckpt is not None:
                self._ckpt.close()
                self._ckpt = None

    # --- progress ----------------------------------------------------------------------------

    def add_train(self, metrics: dict[str, np.ndarray]) -> None:
        """Appends a chunk's per-step train metrics (a chunk never crosses an epoch end); writes
        the log windows it completed (and an epoch's last, partial one)."""
        before, spe = self.step, self.steps_per_epoch
        self.epoch_metrics = {
            k: np.concatenate([self.epoch_metrics[k], v]) if self.epoch_metrics else np.asarray(v)
            for k, v in metrics.items()
        }
        self.step += len(next(iter(metrics.values())))
        first_step = before // spe * spe
        epoch_end = self.step - first_step == spe
        every = self.cfg.train.log_every_steps
        for step, means in window_records(self.epoch_metrics, first_step, every):
            if step > before and (means["window"] == every or epoch_end):
                self._write(step, "train", epoch=first_step // spe, **means)

    def add_throughput(self, seconds: float, steps: int, *, compiled: bool = False) -> None:
        """A chunk of `steps` that took `seconds` of wall time; `compiled`: something compiled
        meanwhile, so its time is not the steps' alone."""
        self.chunk_time_s += seconds
        self.chunk_steps += steps
        if not compiled:
            self.train_time_s += seconds
            self.timed_steps += steps
            self.pace = steps * self.cfg.train.batch_size / seconds

    def examples_per_s(self) -> float | None:
        """Training throughput: over the chunks during which nothing compiled, else (every
        chunk compiled something: a one-chunk run) over every chunk, compilation included, a
        lower bound. None before the first chunk."""
        seconds, steps = self.train_time_s, self.timed_steps
        if not steps:
            seconds, steps = self.chunk_time_s, self.chunk_steps
        return steps * self.cfg.train.batch_size / seconds if steps and seconds > 0 else None

    def add_wall_time(self, seconds: float) -> None:
        self.wall_time_s += seconds

    def add_diagnostics(self, step: int, values: dict[str, Any]) -> None:
        """A `"split": "diag"` record: scalars (also to TensorBoard) and arrays as lists."""
        plain = {k: np.asarray(v).tolist() for k, v in values.items()}
        self._write(step, "diag", **plain)

    def end_epoch(self, epoch: int, evals: dict[str, dict[str, float]]) -> None:
        """Writes the epoch's evaluations; marks the run diverged or early-stopped."""
        self.evals = {split: {k: float(v) for k, v in m.items()} for split, m in evals.items()}
        for split in EVAL_SPLITS:
            if split in self.evals:
                self._write(self.step, split, epoch=epoch, **self.evals[split])
        if diverged(self.epoch_metrics, self.evals, self.cfg.train.divergence_loss):
            self.status = "diverged"
        else:
            self._early_stopping(epoch)
        self.epoch_metrics = {}

    def _early_stopping(self, epoch: int) -> None:
        patience = self.cfg.train.early_stopping_patience
        if "validation" not in self.evals:
            return
        metric = self.cfg.train.early_stopping_metric
        value = self.evals["validation"][metric]
        better = (
            self.best is None
            or (metric == "accuracy" and value > self.best["value"])
            or (metric == "loss" and value < self.best["value"])
        )
        if better:
            self.best = {"epoch": epoch, "step": self.step, "value": value, "evals": self.evals}
            self.stale_epochs = 0
        else:
            self.stale_epochs += 1
        # Early-stopped: stopped before its last epoch; a run that ends on its last epoch
        # without improving has simply finished.
        if patience and self.stale_epochs >= patience and epoch + 1 < self.cfg.train.epochs:
            self.status = "early_stopped"

    def ranking_metrics(self) -> dict[str, float] | None:
        """The metrics that rank a checkpoint for `checkpoint.best_metric`: validation when the
        run has a validation split, else test."""
        return self.evals.get("validation") or self.evals.get("test")

    def meta(self) -> dict[str, Any]:
        meta = {
            "step": self.step,
            "epoch": {k: v.tolist() for k, v in self.epoch_metrics.items()},
            "test": self.evals.get("test", {}),
            "evals": self.evals,
            "status": self.status,
            "wall_time_s": self.wall_time_s,
            "train_time_s": self.train_time_s,
            "timed_steps": self.timed_steps,
            "chunk_time_s": self.chunk_time_s,
            "chunk_steps": self.chunk_steps,
            "best": self.best,
            "stale_epochs": self.stale_epochs,
            "config": self.cfg.to_dict(),
        }
        if self.engine is not None:
            meta["engine"] = self.engine
        return meta

    def save(self, state: Any, *, epoch_end: bool) -> None:
        """A checkpoint of `state` (this run's host copy) with this record's progress."""
        ranking = self.ranking_metrics() if epoch_end else None
        self.checkpointer.save(self.step, state, self.meta(), ranking)
        self.saved_step = self.step

    def finish(self) -> dict[str, Any]:
        """The run's summary, written to summary.json (last: it marks the run finished)."""
        test = self.evals.get("test", {})
        summary: dict[str, Any] = {
            "status": self.status,
            "test_accuracy": float(test.get("accuracy", math.nan)),
            "test_loss": float(test.get("loss", math.nan)),
            "steps": self.step,
            "epochs": self.step // self.steps_per_epoch,
            "wall_time_s": self.wall_time_s,
            "train_examples_per_s": self.examples_per_s(),
        }
        for split in ("train_eval", "validation"):
            if split in self.evals:
                summary[f"{split}_accuracy"] = float(self.evals[split]["accuracy"])
                summary[f"{split}_loss"] = float(self.evals[split]["loss"])
        if self.best is not None:
            summary["best_epoch"] = self.best["epoch"]
            summary["best_step"] = self.best["step"]
            for split, metrics in self.best["evals"].items():
                for key in ("accuracy", "loss"):
                    summary[f"best_{split}_{key}"] = float(metrics[key])
            if self.status == "early_stopped" or self.cfg.checkpoint.best_metric:
                # Reports (a sweep's table, the CLI) read the best validation epoch's metrics.
                summary["reported"] = "best"
        if self.engine is not None:
            summary["engine"] = self.engine
        if self.writes:
            write_json(self.workdir / "summary.json", summary)
        self.summary = summary
        return summary


def result_line(summary: dict, workdir: str) -> str:
    """The run's outcome; a run that reports its best validation epoch says which it was."""
    if summary.get("reported") == "best":
        return (
            f"status={summary['status']} test_accuracy={summary['best_test_accuracy']:.4f} "
            f"test_loss={summary['best_test_loss']:.4f} (epoch {summary['best_epoch'] + 1}, the "
            f"best validation epoch; last epoch: test_accuracy={summary['test_accuracy']:.4f}) "
            f"steps={summary['steps']} workdir={workdir}"
        )
    return (
        f"status={summary['status']} test_accuracy={summary['test_accuracy']:.4f} "
        f"test_loss={summary['test_loss']:.4f} steps={summary['steps']} workdir={workdir}"
    )
