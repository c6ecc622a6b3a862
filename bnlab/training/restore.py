"""A run's checkpoint read back: its config and state (`load_checkpoint`), and the test metrics
of that state (`evaluate`), from any folder. `bnlab.training.run` re-exports both."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab import optim
from bnlab.config import Config, ConfigError
from bnlab.training import train as train_lib
from bnlab.training.checkpoint import CHECKPOINT_DIR, Checkpointer, CheckpointError
from bnlab.training.run_files import EVALUATE_FILE
from bnlab.training.workdir import CONFIG_FILE, EXPERIMENT_FILE, read_run_config
from bnlab.training.writers import write_json


def load_checkpoint(workdir: str | os.PathLike, *, step: int | None = None):
    """`(cfg, restored)`: a run's config and its latest good checkpoint (or `step`)."""
    workdir = Path(workdir)
    if not (workdir / CONFIG_FILE).is_file():
        raise ConfigError(_not_a_run(workdir))
    raw = read_run_config(workdir)  # a damaged file says so, whatever the experiment
    experiment = _import_experiment(workdir)
    try:
        cfg = config_lib.from_dict(raw)
    except ConfigError as err:
        if experiment is None:
            raise ConfigError(
                f"{err} The run may use a normalization or diagnostic that its experiment file "
                f"registers, and {workdir} does not say which file that was."
            ) from err
        raise
    model = train_lib.build_model(_one_device(cfg))
    tx, _ = optim.make_optimizer(cfg.opt, total_steps=1)  # the state's structure is all we need
    sample = jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32)
    key = jax.eval_shape(jax.random.key, 0)
    target = jax.eval_shape(functools.partial(train_lib.init_state, model, tx), key, sample)
    if not (workdir / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(_no_checkpoint_yet(workdir, cfg))
    ckpt = Checkpointer(workdir / CHECKPOINT_DIR, cfg.checkpoint, read_only=True)
    try:
        if not ckpt.steps():
            raise CheckpointError(_no_checkpoint_yet(workdir, cfg))
        return cfg, ckpt.restore(target, step=step)
    finally:
        ckpt.close()


def _not_a_run(workdir: Path) -> str:
    """Why `workdir` holds no run, and which runs a sweep folder holds."""
    trials = sorted(p for p in (workdir / "runs").glob("*") if (p / "config.json").is_file())
    if not trials and not (workdir / "sweep.json").is_file():
        return f"{workdir} holds no run (no config.json); pass a training workdir."
    shown = ", ".join(map(str, trials[:3])) + (f" ({len(trials)} in all)" if trials[3:] else "")
    return (
        f"{workdir} is a sweep folder; pass one of its trials, {workdir / 'runs'}/<trial>: "
        + (shown or "none has started yet")
        + "."
    )


def _no_checkpoint_yet(workdir: Path, cfg: Config) -> str:
    """When the run in `workdir`, which has no checkpoint yet, writes its first."""
    every, best = cfg.checkpoint.every_steps, cfg.checkpoint.best_metric
    when = [f"at the first chunk end at or after step {every} (checkpoint.every_steps)"] * bool(
        every
    )
    when += ["at its first epoch end (checkpoint.best_metric)"] * bool(best)
    return (
        f"{workdir} has no checkpoint yet: its run writes the first one "
        + ", or ".join([*when, "when its training ends"])
        + ". Run this again then (metrics.jsonl shows how far the run is)."
    )


def _import_experiment(workdir: Path) -> Path | None:
    """Imports the experiment file that a run (or the sweep it belongs to) came from, so that
    what it registers exists; returns its path (None when the run does not record one)."""
    candidates = [(workdir / EXPERIMENT_FILE, "path")]
    candidates += [(workdir.parent.parent / "sweep.json", "experiment_path")]
    for record, key in candidates:
        try:
            path = Path(json.loads(record.read_text())[key])
        except (OSError, KeyError, ValueError, TypeError):
            continue
        if path.is_file():
            config_lib.load_module(path)
            return path
    return None


def _one_device(cfg: Config) -> Config:
    """`cfg` on one device: evaluation uses the running statistics, not cross-device ones, so a
    multi-device run evaluates and exports anywhere."""
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mode="none"))


def evaluate(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    mnist_dir: str | None = None,
    tfds_dir: str | None = None,
    recalibrate: int = 0,
) -> dict[str, Any]:
    """Test loss and accuracy of a run's latest good checkpoint (or `step`), on MNIST from
    `mnist_dir`, else `$BNLAB_MNIST_DIR`, else the run's own folders (`config.data_now`).

    With `recalibrate=N`, also with the running statistics re-estimated from the run's first N
    training examples on the checkpoint's weights (`bnlab.nn.recalibrate`): the result's
    `"recalibrated"` entry; both are written to WORKDIR/evaluate.json.
    """
    cfg, restored = load_checkpoint(workdir, step=step)
    data = config_lib.data_now(cfg.data, mnist_dir=mnist_dir, tfds_dir=tfds_dir)
    test_set = data_lib.load(data, "test")
    model = train_lib.build_model(_one_device(cfg))
    program = jax.jit(
        lambda p, s, x, y: train_lib.evaluate(
            p, s, x, y, model=model, batch_size=cfg.train.eval_batch_size
        )
    )
    state = restored.state
    metrics = program(state.params, state.batch_stats, test_set.images, test_set.labels)
    result = {"step": restored.step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
    if recalibrate:
        stats = _recalibrated(cfg, data, model, state, recalibrate)
        metrics = program(state.params, stats, test_set.images, test_set.labels)
        result["recalibrated"] = {
            "examples": recalibrate,
            **{k: float(v) for k, v in jax.device_get(metrics).items()},
        }
        write_json(Path(workdir) / EVALUATE_FILE, result)
    return result


def _recalibrated(cfg: Config, data: Any, model: Any, state: Any, n: int) -> Any:
    """The checkpoint's running statistics re-estimated from the first `n` of the examples the
    run trained on (never the validation split's, which the run holds out)."""
    from bnlab.nn.recalibrate import recalibrate

    full = data_lib.load(dataclasses.replace(data, train_size=0), "train")
    pool = cfg.data.train_size or full.size - cfg.data.validation_size
    if not 0 < n <= pool:
        raise ConfigError(
            f"--recalibrate {n}: give 1 to {pool} training examples (the examples the run "
            "trained on; its validation split is held out)."
        )
    chunk = next(c for c in range(min(500, n), 0, -1) if n % c == 0)
    images = data_lib.to_float(full.images[:n])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return jax.jit(lambda v, x: recalibrate(model, v, x, batch_size=chunk))(variables, images)
