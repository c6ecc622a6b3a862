"""One training run from a validated config to the files in its workdir.

Writes `config.json` (the resolved config), `metrics.jsonl` (train records every
`train.log_every_steps` steps, a test record after each epoch), TensorBoard events under
`tensorboard/`, and `summary.json` (`status`, `test_accuracy`, `test_loss`, ...).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnlab import data as data_lib
from bnlab import parallel
from bnlab import train as train_lib
from bnlab.config import Config, ConfigError
from bnlab.writers import MetricWriter, write_json

RESULT_FILES = ("metrics.jsonl", "summary.json")


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Creates `workdir`; refuses a file, an unwritable folder, or one that already holds a run."""
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
            f"workdir {path} already holds a run ({', '.join(existing)}); results are never "
            "overwritten. Choose a new --workdir or move the old one away."
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


def diverged(train_losses: np.ndarray, test_loss: float) -> bool:
    """A non-finite loss in any step, or in the test loss (a NaN made by an epoch's last step
    shows only in the weights)."""
    return not (np.all(np.isfinite(train_losses)) and np.isfinite(test_loss))


def run(
    cfg: Config,
    workdir: str | os.PathLike,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains `cfg` and returns its summary (also written to `workdir/summary.json`)."""
    workdir = prepare_workdir(workdir)
    parallel.initialize(cfg.parallel)  # multi-host: join the other processes before any compute
    train_set = data_lib.load(cfg.data, "train")
    test_set = data_lib.load(cfg.data, "test")
    if cfg.train.batch_size > train_set.size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {train_set.size} training "
            f"examples of task {cfg.data.task!r}; lower train.batch_size."
        )
    programs = train_lib.make_programs(cfg, train_set.size)
    init_key, data_key = train_lib.run_keys(cfg.train.seed)
    sample = data_lib.to_float(train_set.images[: cfg.train.batch_size])
    state = programs.init(init_key, sample)
    write_json(workdir / "config.json", cfg.to_dict())
    writer = MetricWriter(workdir)
    bar = _progress_bar(progress, cfg.train.epochs)
    status, test, start, train_time = "ok", {}, time.perf_counter(), 0.0
    try:
        for epoch in range(cfg.train.epochs):
            first_step = epoch * programs.steps_per_epoch
            tick = time.perf_counter()
            state, metrics = programs.train_epoch(
                state, train_set.images, train_set.labels, jax.random.fold_in(data_key, epoch)
            )
            metrics = jax.device_get(metrics)
            if epoch > 0:  # the first epoch includes compilation
                train_time += time.perf_counter() - tick
            for step, means in _window_records(metrics, first_step, cfg.train.log_every_steps):
                writer.write(step, "train", epoch=epoch, **means)
            test = jax.device_get(
                programs.evaluate(state.params, state.batch_stats, test_set.images, test_set.labels)
            )
            step = first_step + programs.steps_per_epoch
            writer.write(step, "test", epoch=epoch, **test)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss'][-1]:.4f}", test_acc=f"{test['accuracy']:.4f}"
                )
            if diverged(metrics["loss"], test["loss"]):
                status = "diverged"
                break
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    epochs_done = epoch + 1
    summary = {
        "status": status,
        "test_accuracy": float(test["accuracy"]),
        "test_loss": float(test["loss"]),
        "steps": int(state.step),
        "epochs": epochs_done,
        "wall_time_s": time.perf_counter() - start,
        # Measured over the epochs after the first (which compiles); None for a 1-epoch run.
        "train_examples_per_s": (
            (epochs_done - 1) * programs.steps_per_epoch * cfg.train.batch_size / train_time
            if train_time > 0
            else None
        ),
    }
    write_json(workdir / "summary.json", summary)
    return summary


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="epoch", desc="train")
