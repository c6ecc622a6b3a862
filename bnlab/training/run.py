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
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab import diagnostics, optim
from bnlab.config import Config, ConfigError
from bnlab.data import DataError
from bnlab.training import loop, parallel
from bnlab.training import train as train_lib
from bnlab.training.checkpoint import CHECKPOINT_DIR, Checkpointer, CheckpointError, Restored
from bnlab.training.loop import Interrupted, StopSignals
from bnlab.training.progress import Progress
from bnlab.training.records import Record
from bnlab.training.restore import evaluate, load_checkpoint
from bnlab.training.workdir import hold_workdir, prepare_workdir
from bnlab.training.writers import truncate_jsonl

# Bad input: a message that says how to fix it (the CLI exits 2), in every process alike.
USER_ERRORS = (ConfigError, DataError, CheckpointError)
__all__ = ["Interrupted", "evaluate", "load_checkpoint", "load_splits", "prepare_workdir", "run"]


class Splits(NamedTuple):
    train: data_lib.Dataset
    test: data_lib.Dataset
    validation: data_lib.Dataset | None  # the last data.validation_size training examples
    train_eval: data_lib.Dataset | None = None  # the first data.train_eval_size of `train`


def load_splits(cfg: Config) -> Splits:
    """The train, test and (with `data.validation_size`) validation splits of `cfg`.

    The validation split is the last `validation_size` examples of the task's training split,
    whatever the seed and `data.train_size`; training draws from the examples before it (its
    first `train_size` of them).
    """
    full = data_lib.load(dataclasses.replace(cfg.data, train_size=0), "train")
    held_out, n_train = cfg.data.validation_size, cfg.data.train_size
    pool = full.size - held_out
    if held_out and pool < cfg.train.batch_size:
        raise ConfigError(
            f"data.validation_size={held_out} leaves {max(pool, 0)} of the {full.size} training "
            f"examples of task {cfg.data.task!r} for training, fewer than one batch "
            f"(train.batch_size={cfg.train.batch_size}); hold out fewer."
        )
    if n_train > pool:
        held = f" after holding out data.validation_size={held_out}" if held_out else ""
        raise ConfigError(
            f"data.train_size={n_train} exceeds the {pool} training examples of task "
            f"{cfg.data.task!r}{held}; lower it (0 uses all)."
        )
    train_set = _rows(full, 0, n_train or pool)
    if cfg.train.batch_size > train_set.size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} exceeds the {train_set.size} training "
            f"examples of task {cfg.data.task!r}; lower train.batch_size."
        )
    validation = _rows(full, pool, full.size) if held_out else None
    n_eval = min(cfg.data.train_eval_size, train_set.size)
    train_eval = _rows(train_set, 0, n_eval) if n_eval else None
    return Splits(train_set, data_lib.load(cfg.data, "test"), validation, train_eval)


def _rows(ds: data_lib.Dataset, start: int, stop: int) -> data_lib.Dataset:
    if (start, stop) == (0, ds.size):
        return ds
    return data_lib.Dataset(ds.images[start:stop], ds.labels[start:stop])


def run(
    cfg: Config,
    workdir: str | os.PathLike,
    *,
    progress: bool = False,
    experiment: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Trains `cfg` (resuming the run in `workdir` if there is one) and returns its summary
    (also written to `workdir/summary.json`). Raises `Interrupted` after saving a checkpoint
    on SIGTERM/SIGINT. `experiment`, the file the config came from, is recorded, so that
    evaluating or exporting the run imports it again (its registrations).

    In a multi-process run every process calls this with the same (shared) workdir: they
    agree on where the run stands (one error stops all of them alike), every process takes
    part in each checkpoint save (orbax coordinates them), and process 0 alone writes the
    run's other files.
    """
    parallel.initialize(cfg.parallel)  # multi-host: join the other processes before any compute
    with parallel.lost_process_errors(), hold_workdir(workdir) as path:
        return _run(cfg, path, progress=progress, experiment=experiment)


def speed_traps(cfg: Config, backend: str) -> list[str]:
    """Settings that train correctly but far slower than they need to on `backend`."""
    traps = []
    if cfg.model.name == "cnn" and cfg.model.conv_impl == "xla" and backend == "cpu":
        traps.append(
            "model.conv_impl='xla' on CPU: XLA's convolution gradient inside bnlab's scanned "
            "loop is about 18x slower than the im2col convolution (BENCHMARKS.md); on CPU use "
            "--config.model.conv_impl=im2col (the default), the same convolution as a matmul."
        )
    return traps


def _run(cfg: Config, workdir, *, progress: bool, experiment) -> dict[str, Any]:
    for trap in speed_traps(cfg, jax.default_backend()):
        warnings.warn(trap, stacklevel=3)
    splits = parallel.agree(lambda: load_splits(cfg), USER_ERRORS)
    train_set = splits.train
    programs = train_lib.make_programs(cfg, train_set.size)
    init_key, data_key = train_lib.run_keys(cfg.train.seed)
    sample = data_lib.to_float(train_set.images[: cfg.train.batch_size])
    state = programs.init(init_key, sample)
    programs.compile_ahead(
        state, train_set, splits.test, data_key, train_lib.run_rng(cfg.train.seed)
    )
    try:
        return _train(cfg, workdir, programs, state, splits, data_key, progress, experiment)
    finally:
        programs.settle()


def _train(cfg, workdir, programs, state, splits, data_key, progress, experiment):
    """`_run` once the programs exist: resume, then the training loop and its files."""
    spe = programs.steps_per_epoch
    ckpt = Checkpointer(workdir / CHECKPOINT_DIR, cfg.checkpoint)
    try:
        # Agreed before restoring: processes that restore different steps would run different
        # collectives (orbax's among them) and fail far from the cause.
        steps = parallel.agree(ckpt.steps, USER_ERRORS)
        _same_step_everywhere(steps[-1] if steps else 0, workdir, "the latest checkpoint they see")
        state, meta = parallel.agree(lambda: _resume(cfg, workdir, ckpt, state), USER_ERRORS)
        _same_step_everywhere(meta["step"] if meta else 0, workdir, "the step they resume from")
    finally:
        ckpt.close()
    primary = parallel.is_primary()
    record = Record(cfg, workdir, steps_per_epoch=spe, meta=meta, writes=primary)
    engine = _engine(cfg, programs, data_key, splits)
    shown = None
    if progress and primary:
        if record.step:
            print(f"bnlab: resuming {workdir} from step {record.step}", file=sys.stderr)
        shown = Progress(
            spe * cfg.train.epochs,
            record.step,
            cfg.train.batch_size,
            speed=lambda: record.pace or record.examples_per_s(),
        )
        record.listener = shown.on_record
    record.start(
        purge_step=record.step + 1 if record.step else None,
        experiment=None if experiment is None else str(experiment),
    )
    try:
        with StopSignals() as stop, parallel.Watchdog(cfg.parallel.timeout_s) as watchdog:

            def on_chunk(records, epoch_end):
                del epoch_end  # the display follows the steps
                watchdog.kick()
                if shown is not None:
                    shown.on_chunk(record.step, record.train_time_s, record.timed_steps)

            loop.train(engine, state, [record], stop=stop, on_chunk=on_chunk)
    finally:
        record.close()
        if shown is not None:
            shown.close()
    return record.summary


def _same_step_everywhere(step: int, workdir: Path, what: str) -> None:
    """Every process of a run resumes from the same step, or none does."""
    try:
        parallel.same_everywhere(step, what)
    except ValueError as err:
        raise CheckpointError(
            f"{err}: their views of {workdir / CHECKPOINT_DIR} differ (a shared folder out of "
            "sync, or one process pointed at another copy). Give every process the same "
            "workdir on one shared file system, then start them again."
        ) from None


def _engine(cfg: Config, programs, data_key, splits: Splits) -> loop.Engine:
    """The single-run programs as the loop drives them (host metrics, host checkpoints)."""
    rng = train_lib.run_rng(cfg.train.seed)
    train_set = splits.train

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
        return jax.device_get(evaluate_splits(programs.evaluate, state, splits))

    return loop.Engine(
        train=train,
        evaluate=evaluate,
        end_epoch=plateau_program(cfg),
        # Host copies: in a multi-process run every process saves the same replicated values
        # (orbax writes them once); a process-local device array cannot be saved there.
        host_states=lambda state: [jax.device_get(state)],
        steps_per_epoch=programs.steps_per_epoch,
        **diagnose_program(cfg, programs.model, programs.tx, train_set, rng),
    )


def evaluate_splits(evaluate, state, splits: Splits) -> dict[str, Any]:
    """`{split: metrics}` of the evaluation splits (train_eval and validation when asked for,
    test)."""
    out = {}
    if splits.train_eval is not None:
        t = splits.train_eval
        out["train_eval"] = evaluate(state.params, state.batch_stats, t.images, t.labels)
    if splits.validation is not None:
        v = splits.validation
        out["validation"] = evaluate(state.params, state.batch_stats, v.images, v.labels)
    out["test"] = evaluate(state.params, state.batch_stats, splits.test.images, splits.test.labels)
    return out


def plateau_program(cfg: Config, trials: list[Config] | None = None):
    """The epoch-end update of reduce-on-plateau (`opt.schedule=plateau`) from the validation
    loss, or None for other schedules. With `trials` (one config per trial of a vmapped
    group, which may differ in `opt.decay_rate`), the state has a leading trial axis."""
    if cfg.opt.schedule != "plateau":
        return None
    stacked = trials is not None
    configs = trials if stacked else [cfg]
    factors = sorted({c.opt.decay_rate for c in configs})

    @jax.jit
    def update(opt_state, losses):
        for factor in factors:
            step = functools.partial(
                optim.plateau_step, c=dataclasses.replace(cfg.opt, decay_rate=factor)
            )
            if not stacked:
                return step(opt_state, losses)
            new = jax.vmap(step)(opt_state, losses)
            mine = jnp.asarray([c.opt.decay_rate == factor for c in configs])
            opt_state = jax.tree.map(
                lambda n, o, mine=mine: jnp.where(mine.reshape((-1,) + (1,) * (o.ndim - 1)), n, o),
                new,
                opt_state,
            )
        return opt_state

    def end_epoch(state, evals):
        losses = jnp.asarray(evals["validation"]["loss"], jnp.float32)
        return state._replace(opt_state=update(state.opt_state, losses))

    return end_epoch


def diagnose_program(cfg: Config, model, tx, train_set, rng, *, trials: bool = False) -> dict:
    """The `Engine` fields that measure `cfg.diagnostics` (none when no diagnostic is named):
    `measure` on the first `diagnostics.batch_size` training examples, jitted per set of
    names; with `trials`, vmapped over a leading trial axis of the state and `rng`."""
    d = cfg.diagnostics
    if not diagnostics.parse_names(d.names):
        return {}
    if d.batch_size > train_set.size:
        raise ConfigError(
            f"diagnostics.batch_size={d.batch_size} exceeds the {train_set.size} training "
            "examples; lower it."
        )
    batch = (
        data_lib.to_float(train_set.images[: d.batch_size]),
        train_set.labels[: d.batch_size],
    )

    steps_per_epoch = train_set.size // cfg.train.batch_size
    total = steps_per_epoch * cfg.train.epochs
    # Statistics from the data are recomputed before a refresh step trains (`stats_refresh`):
    # a measurement at that step sees them as that step will, not the previous ones (at step
    # 0, not the initial 0/1).
    refresh = train_lib.stats_refresh(cfg, model)
    refresh_images = None if refresh is None else train_set.images[: refresh.examples]

    def measure(state, run_rng, step, names):
        if refresh is not None:
            state = refresh(state, refresh_images, step % steps_per_epoch)
        lr = optim.lr_now(cfg.opt, state.opt_state, state.step, total)
        key = diagnostics.measurement_key(run_rng, step)
        ctx = diagnostics.Context(model, tx, state, batch, key, cfg, lr)
        return diagnostics.measure(ctx, names)

    @functools.cache
    def program(names):
        fn = functools.partial(measure, names=names)
        return jax.jit(jax.vmap(fn, in_axes=(0, 0, None)) if trials else fn)

    def diagnose(state, step):
        names = diagnostics.names_at(d, step)
        return jax.device_get(program(names)(state, rng, step)) if names else {}

    return {"diagnose": diagnose, "diagnose_every": d.every_steps}


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
