"""One training run from a validated config to the files in its workdir, resumable.

Writes `config.json` (the resolved config), `metrics.jsonl` (train records every
`train.log_every_steps` steps, a test record after each epoch), TensorBoard events under
`tensorboard/`, checkpoints under `checkpoints/` and, last, `summary.json` (`status`,
`test_accuracy`, `test_loss`, ...). The same call in a workdir without `summary.json` resumes
from the latest good checkpoint and ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab import parallel
from bnlab import train as train_lib
from bnlab.checkpoint import CHECKPOINT_DIR, Checkpointer, Restored
from bnlab.config import Config, ConfigError
from bnlab.writers import MetricWriter, truncate_jsonl, write_json

RESULT_FILES = ("summary.json",)  # a finished run; never overwritten


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT stopped a run after it saved a checkpoint; run it again to resume."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Creates `workdir`; refuses a file, an unwritable folder, or a finished run's folder (an
    unfinished run's folder is resumed by `run`)."""
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"workdir {path} is a file; pass a folder path to --workdir.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"workdir {path} is not writable ({err.strerror}); choose another --workdir."
        ) from err
    existing = [name for name in RESULT_FILES if (path / name).exists()]
    if existing:
        raise ConfigError(
            f"workdir {path} already holds a finished run ({', '.join(existing)}); results are "
            "never overwritten. Choose a new --workdir or move the old one away."
        )
    return path


def _window_records(metrics: dict[str, np.ndarray], first_step: int, every: int):
    """Per-epoch windows of `every` steps (the last may be shorter): (last step, means) pairs.

    Each record carries `window`, the number of steps it averages.
    """
    steps = len(next(iter(metrics.values())))
    for start in range(0, steps, every):
        stop = min(start + every, steps)
        means = {k: float(np.mean(v[start:stop])) for k, v in metrics.items()}
        yield first_step + stop, {**means, "window": stop - start}


def load_splits(cfg: Config) -> tuple[data_lib.Dataset, data_lib.Dataset]:
    """The train and test splits of `cfg`, checked against the batch size."""
    train_set = data_lib.load(cfg.data, "train")
    if cfg.train.batch_size > train_set.size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {train_set.size} training "
            f"examples of task {cfg.data.task!r}; lower train.batch_size."
        )
    return train_set, data_lib.load(cfg.data, "test")


def diverged(train_losses: np.ndarray, test_loss: float) -> bool:
    """A non-finite loss in any step, or in the test loss (a NaN made by an epoch's last step
    shows only in the weights)."""
    return not (np.all(np.isfinite(train_losses)) and np.isfinite(test_loss))


class _Progress:
    """Where a run stands; saved as JSON with each checkpoint."""

    def __init__(self, meta: dict[str, Any] | None = None):
        meta = meta or {}
        self.step: int = meta.get("step", 0)
        # Per-step train metrics of the epoch in progress (its windows and divergence need them).
        epoch = meta.get("epoch", {})
        self.epoch_metrics = {k: np.asarray(v, np.float32) for k, v in epoch.items()}
        self.test: dict[str, float] = meta.get("test", {})
        self.status: str = meta.get("status", "ok")
        self.wall_time_s: float = meta.get("wall_time_s", 0.0)
        self.train_time_s: float = meta.get("train_time_s", 0.0)
        self.timed_steps: int = meta.get("timed_steps", 0)

    def meta(self, cfg: Config) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": {k: v.tolist() for k, v in self.epoch_metrics.items()},
            "test": self.test,
            "status": self.status,
            "wall_time_s": self.wall_time_s,
            "train_time_s": self.train_time_s,
            "timed_steps": self.timed_steps,
            "config": cfg.to_dict(),
        }


def run(
    cfg: Config,
    workdir: str | os.PathLike,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains `cfg` (resuming the run in `workdir` if there is one) and returns its summary
    (also written to `workdir/summary.json`). Raises `Interrupted` after saving a checkpoint
    on SIGTERM/SIGINT."""
    workdir = prepare_workdir(workdir)
    parallel.initialize(cfg.parallel)  # multi-host: join the other processes before any compute
    train_set, test_set = load_splits(cfg)
    programs = train_lib.make_programs(cfg, train_set.size)
    init_key, data_key = train_lib.run_keys(cfg.train.seed)
    sample = data_lib.to_float(train_set.images[: cfg.train.batch_size])
    state = programs.init(init_key, sample)
    ckpt = Checkpointer(workdir / CHECKPOINT_DIR, cfg.checkpoint)
    try:
        state, done = _resume(cfg, workdir, ckpt, state)
        write_json(workdir / "config.json", cfg.to_dict())
        state, done = _train(
            cfg, workdir, programs, ckpt, state, done, data_key, train_set, test_set, progress
        )
    finally:
        ckpt.close()
    summary = {
        "status": done.status,
        "test_accuracy": float(done.test["accuracy"]),
        "test_loss": float(done.test["loss"]),
        "steps": int(state.step),
        "epochs": done.step // programs.steps_per_epoch,
        "wall_time_s": done.wall_time_s,
        # Over the chunks of steps that did not compile; None if every chunk compiled.
        "train_examples_per_s": (
            done.timed_steps * cfg.train.batch_size / done.train_time_s
            if done.train_time_s > 0
            else None
        ),
    }
    write_json(workdir / "summary.json", summary)
    return summary


def _resume(cfg: Config, workdir: Path, ckpt: Checkpointer, state) -> tuple[Any, _Progress]:
    """The state and progress to continue from: the latest good checkpoint, else step 0."""
    config_path = workdir / "config.json"
    if config_path.exists():
        _refuse_changes(config_lib.from_dict(json.loads(config_path.read_text())), cfg, workdir)
    if not ckpt.steps():
        if config_path.exists():
            warnings.warn(
                f"workdir {workdir} holds a run stopped before its first checkpoint; "
                "restarting it from step 0 (its metrics are recomputed identically).",
                stacklevel=3,
            )
        (workdir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(workdir / "tensorboard", ignore_errors=True)
        return state, _Progress()
    restored: Restored = ckpt.restore(state)
    _refuse_changes(config_lib.from_dict(restored.meta["config"]), cfg, ckpt.directory)
    ckpt.set_aside_after(restored.step)
    truncate_jsonl(workdir / "metrics.jsonl", restored.step)
    return restored.state, _Progress(restored.meta)


def _refuse_changes(old: Config, new: Config, where: Path) -> None:
    differences = config_lib.resume_differences(old, new)
    if differences:
        raise ConfigError(
            f"{where} holds a run with another config, which cannot resume with this one: "
            + "; ".join(differences)
            + ". Only the checkpoint group and "
            + ", ".join(config_lib.RESUMABLE)
            + " may change on resume; use a new --workdir for a different run."
        )


def _train(cfg, workdir, programs, ckpt, state, done, data_key, train_set, test_set, progress):
    """Runs the remaining steps in chunks, saving checkpoints; returns (state, progress)."""
    spe = programs.steps_per_epoch
    total = spe * cfg.train.epochs
    every = cfg.checkpoint.every_steps
    chunk = min(every or spe, spe)  # at most 2 chunk lengths, so at most 2 compilations
    compiled: set[int] = set()
    writer = MetricWriter(workdir, purge_step=done.step + 1 if done.step else None)
    bar = _progress_bar(progress, cfg.train.epochs, done.step // spe)
    start = time.perf_counter()
    try:
        with _StopSignals() as stop:
            while done.step < total and done.status == "ok":
                before = done.step
                state = _train_chunk(programs, state, done, data_key, train_set, chunk, compiled)
                epoch = before // spe
                _write_windows(writer, done, epoch * spe, before, cfg.train.log_every_steps, spe)
                epoch_end = done.step % spe == 0
                if epoch_end:
                    _end_epoch(writer, programs, state, done, test_set, epoch, bar)
                finished = done.step == total or done.status != "ok"
                if (
                    finished
                    or stop.signum is not None
                    or (every and done.step // every > before // every)
                    or (cfg.checkpoint.best_metric and epoch_end)
                ):
                    done.wall_time_s += time.perf_counter() - start
                    start = time.perf_counter()
                    ckpt.save(done.step, state, done.meta(cfg), done.test if epoch_end else None)
                if stop.signum is not None and not finished:
                    raise Interrupted(stop.signum, done.step)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    done.wall_time_s += time.perf_counter() - start
    return state, done


def _train_chunk(programs, state, done, data_key, train_set, chunk, compiled):
    epoch, pos = divmod(done.step, programs.steps_per_epoch)
    steps = min(chunk, programs.steps_per_epoch - pos)
    tick = time.perf_counter()
    state, metrics = programs.train_epoch(
        state,
        train_set.images,
        train_set.labels,
        jax.random.fold_in(data_key, epoch),
        pos,
        steps=steps,
    )
    metrics = jax.device_get(metrics)
    if steps in compiled:  # the first call of each chunk length includes compilation
        done.train_time_s += time.perf_counter() - tick
        done.timed_steps += steps
    compiled.add(steps)
    done.epoch_metrics = {
        k: np.concatenate([done.epoch_metrics[k], v]) if done.epoch_metrics else v
        for k, v in metrics.items()
    }
    done.step += steps
    return state


def _write_windows(writer, done, first_step, before, every, spe):
    """Writes the windows that the last chunk completed (and an epoch's last, partial one)."""
    epoch_end = done.step - first_step == spe
    for step, means in _window_records(done.epoch_metrics, first_step, every):
        if step > before and (means["window"] == every or epoch_end):
            writer.write(step, "train", epoch=first_step // spe, **means)


def _end_epoch(writer, programs, state, done, test_set, epoch, bar):
    test = jax.device_get(
        programs.evaluate(state.params, state.batch_stats, test_set.images, test_set.labels)
    )
    done.test = {k: float(v) for k, v in test.items()}
    writer.write(done.step, "test", epoch=epoch, **test)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{done.epoch_metrics['loss'][-1]:.4f}", test_acc=f"{test['accuracy']:.4f}"
        )
    if diverged(done.epoch_metrics["loss"], test["loss"]):
        done.status = "diverged"
    done.epoch_metrics = {}


class _StopSignals:
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


def load_checkpoint(workdir: str | os.PathLike, *, step: int | None = None):
    """`(cfg, restored)`: a run's config and its latest good checkpoint (or `step`)."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{workdir} holds no run (no config.json); pass a training workdir.")
    cfg = config_lib.from_dict(json.loads(config_path.read_text()))
    model = train_lib.build_model(_one_device(cfg))
    from bnlab import optim

    tx, _ = optim.make_optimizer(cfg.opt, total_steps=1)  # the state's structure is all we need
    sample = jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32)
    key = jax.eval_shape(jax.random.key, 0)
    target = jax.eval_shape(functools.partial(train_lib.init_state, model, tx), key, sample)
    ckpt = Checkpointer(workdir / CHECKPOINT_DIR, cfg.checkpoint, read_only=True)
    try:
        return cfg, ckpt.restore(target, step=step)
    finally:
        ckpt.close()


def _one_device(cfg: Config) -> Config:
    """`cfg` on one device: evaluation uses the running statistics, not cross-device ones, so a
    multi-device run evaluates and exports anywhere."""
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode="none"))


def evaluate(workdir: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """Test loss and accuracy of a run's latest good checkpoint (or `step`)."""
    cfg, restored = load_checkpoint(workdir, step=step)
    test_set = data_lib.load(cfg.data, "test")
    model = train_lib.build_model(_one_device(cfg))
    metrics = jax.jit(
        lambda p, s, x, y: train_lib.evaluate(
            p, s, x, y, model=model, batch_size=cfg.train.eval_batch_size
        )
    )(restored.state.params, restored.state.batch_stats, test_set.images, test_set.labels)
    return {"step": restored.step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}


def _progress_bar(enabled: bool, total: int, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="epoch", desc="train")
