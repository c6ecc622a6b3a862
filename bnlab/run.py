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
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab import loop, parallel
from bnlab import train as train_lib
from bnlab.checkpoint import CHECKPOINT_DIR, Checkpointer, CheckpointError, Restored
from bnlab.config import Config, ConfigError
from bnlab.data import DataError
from bnlab.loop import Interrupted, StopSignals
from bnlab.records import Record, prepare_workdir
from bnlab.writers import truncate_jsonl

# Bad input: a message that says how to fix it (the CLI exits 2), in every process alike.
USER_ERRORS = (ConfigError, DataError, CheckpointError)
__all__ = ["Interrupted", "evaluate", "load_checkpoint", "load_splits", "prepare_workdir", "run"]


def load_splits(cfg: Config) -> tuple[data_lib.Dataset, data_lib.Dataset]:
    """The train and test splits of `cfg`, checked against the batch size."""
    train_set = data_lib.load(cfg.data, "train")
    if cfg.train.batch_size > train_set.size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {train_set.size} training "
            f"examples of task {cfg.data.task!r}; lower train.batch_size."
        )
    return train_set, data_lib.load(cfg.data, "test")


def run(
    cfg: Config,
    workdir: str | os.PathLike,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Trains `cfg` (resuming the run in `workdir` if there is one) and returns its summary
    (also written to `workdir/summary.json`). Raises `Interrupted` after saving a checkpoint
    on SIGTERM/SIGINT.

    In a multi-process run every process calls this with the same (shared) workdir: they
    agree on where the run stands (one error stops all of them alike), every process takes
    part in each checkpoint save (orbax coordinates them), and process 0 alone writes the
    run's other files.
    """
    parallel.initialize(cfg.parallel)  # multi-host: join the other processes before any compute
    with parallel.lost_process_errors():
        return _run(cfg, workdir, progress=progress)


def _run(cfg: Config, workdir: str | os.PathLike, *, progress: bool) -> dict[str, Any]:
    workdir = parallel.agree(lambda: prepare_workdir(workdir), USER_ERRORS)
    train_set, test_set = parallel.agree(lambda: load_splits(cfg), USER_ERRORS)
    programs = train_lib.make_programs(cfg, train_set.size)
    init_key, data_key = train_lib.run_keys(cfg.train.seed)
    sample = data_lib.to_float(train_set.images[: cfg.train.batch_size])
    state = programs.init(init_key, sample)
    programs.compile_ahead(state, train_set, test_set, data_key, train_lib.run_rng(cfg.train.seed))
    spe = programs.steps_per_epoch
    ckpt = Checkpointer(workdir / CHECKPOINT_DIR, cfg.checkpoint)
    try:
        state, meta = parallel.agree(lambda: _resume(cfg, workdir, ckpt, state), USER_ERRORS)
    finally:
        ckpt.close()
    record = Record(cfg, workdir, steps_per_epoch=spe, meta=meta, writes=parallel.is_primary())
    engine = _engine(cfg, programs, data_key, train_set, test_set)
    bar = _progress_bar(progress and parallel.is_primary(), cfg.train.epochs, record.step // spe)
    record.start(purge_step=record.step + 1 if record.step else None)
    try:
        with StopSignals() as stop, parallel.Watchdog(cfg.parallel.timeout_s) as watchdog:
            update_bar = _bar_update(bar)

            def on_chunk(records, epoch_end):
                watchdog.kick()
                if update_bar is not None:
                    update_bar(records, epoch_end)

            loop.train(engine, state, [record], stop=stop, on_chunk=on_chunk)
    finally:
        record.close()
        if bar is not None:
            bar.close()
    return record.summary


def _engine(cfg: Config, programs, data_key, train_set, test_set) -> loop.Engine:
    """The single-run programs as the loop drives them (host metrics, host checkpoints)."""
    rng = train_lib.run_rng(cfg.train.seed)

    def train(state, epoch, start, steps):
        state, metrics = programs.train_epoch(
            state,
            train_set.images,
            train_set.labels,
            jax.random.fold_in(data_key, epoch),
            start,
            steps=steps,
            rng=rng,
        )
        return state, jax.device_get(metrics)

    def evaluate(state):
        test = programs.evaluate(state.params, state.batch_stats, test_set.images, test_set.labels)
        return {"test": jax.device_get(test)}

    return loop.Engine(
        train=train,
        evaluate=evaluate,
        # Host copies: in a multi-process run every process saves the same replicated values
        # (orbax writes them once); a process-local device array cannot be saved there.
        host_states=lambda state: [jax.device_get(state)],
        steps_per_epoch=programs.steps_per_epoch,
    )


def _resume(cfg: Config, workdir: Path, ckpt: Checkpointer, state) -> tuple[Any, dict | None]:
    """The state and progress to continue from: the latest good checkpoint, else step 0."""
    config_path = workdir / "config.json"
    if config_path.exists():
        _refuse_changes(config_lib.from_dict(json.loads(config_path.read_text())), cfg, workdir)
    primary = parallel.is_primary()  # in a multi-process run, one process changes files
    if not ckpt.steps():
        if config_path.exists() and primary:
            warnings.warn(
                f"workdir {workdir} holds a run stopped before its first checkpoint; "
                "restarting it from step 0 (its metrics are recomputed identically).",
                stacklevel=3,
            )
        if primary:
            (workdir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(workdir / "tensorboard", ignore_errors=True)
        return state, None
    restored: Restored = ckpt.restore(state)
    _refuse_changes(config_lib.from_dict(restored.meta["config"]), cfg, ckpt.directory)
    if primary:
        ckpt.set_aside_after(restored.step)
        truncate_jsonl(workdir / "metrics.jsonl", restored.step)
    return restored.state, restored.meta


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


def _bar_update(bar):
    if bar is None:
        return None

    def update(records, epoch_end):
        record = records[0]
        if epoch_end:
            bar.update(1)
            bar.set_postfix(test_acc=f"{record.evals['test']['accuracy']:.4f}")

    return update
