"""Many trials in one compiled program: `jax.vmap` over trials that share a structure.

Trials whose configs differ only in the seed, in the optimizer's injected hyperparameters
(`optim.INJECTED`: learning rate, momentum, clipping threshold, decay rate, weight decay) and in
their normalization's injected fields (`NormSpec.injected`, e.g. BN's momentum, batch renorm's
`r_max`/`d_max`, noisy BN's noise) have train states of one pytree structure. They train
together: the train state, the injected values and the data-order keys get a leading trial
axis, and the single-run epoch and evaluation are vmapped over it (the model is built inside
them from each trial's traced normalization values). Diagnostics measure the group's model as
its first trial builds it, so with `diagnostics.names` set, trials that differ in a
normalization field train in programs of their own. Each trial writes the same files as a single run
(`config.json`, `metrics.jsonl`, `tensorboard/`, `summary.json`, checkpoints); a trial whose
loss turns non-finite is marked diverged and stops being recorded while its siblings go on.

The trials train through the single run's loop (`bnlab.training.loop`) and write their files through
the same `records.Record`: checkpoints, one per trial in the single-run format, are saved at
the same steps as a single run's (chunk ends crossing `checkpoint.every_steps`, epoch ends with
`checkpoint.best_metric`, a trial's end, SIGTERM/SIGINT), so an interrupted trial resumes from
its latest checkpoint through `run.run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnlab import data as data_lib
from bnlab import diagnostics, optim
from bnlab.config import Config, ConfigError
from bnlab.nn import norms
from bnlab.training import loop
from bnlab.training import train as train_lib
from bnlab.training.records import Record
from bnlab.training.run import (
    diagnose_program,
    evaluate_splits,
    load_splits,
    plateau_program,
    speed_traps,
)
from bnlab.training.workdir import LOCK_FILE, hold_workdir

MEMORY_FRACTION = 0.5  # share of the device memory a chunk of trials may plan to use
MAX_CHUNK = 256  # trials per program at most: each keeps a metrics file and a TensorBoard writer


def structure_key(cfg: Config) -> str:
    """Equal for configs that can train in one vmapped program."""
    d = cfg.to_dict()
    d["train"]["seed"] = 0
    d["opt"] = dataclasses.asdict(optim.structure(cfg.opt))
    if not cfg.diagnostics.names:  # diagnostics build one model per group (see the module doc)
        d["norm"] |= dict.fromkeys(norm_injected(cfg), 0.0)
    return json.dumps(d, sort_keys=True)


def norm_injected(cfg: Config) -> tuple[str, ...]:
    """The fields of `cfg.norm` that trials of one vmapped program may hold apart."""
    spec = norms.NORMS.get_spec(cfg.model.norm)
    return () if spec is None else spec.injected


def with_norm_values(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with its normalization's injected fields set from `values` (traced or plain)."""
    return dataclasses.replace(cfg, norm=dataclasses.replace(cfg.norm, **values))


def trial_values(configs: Sequence[Config]) -> dict[str, Any]:
    """The per-trial values of a group: `f32[trials]` per `optim.INJECTED` name, and under
    "norm" per injected normalization field."""
    stack = lambda xs: jnp.asarray(list(xs), jnp.float32)
    values: dict[str, Any] = {k: stack(getattr(c.opt, k) for c in configs) for k in optim.INJECTED}
    names = norm_injected(configs[0])
    values["norm"] = {k: stack(getattr(c.norm, k) for c in configs) for k in names}
    return values


def group_by_structure(configs: Sequence[Config]) -> list[list[int]]:
    """Indices of `configs` grouped by structure, groups and members in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(configs):
        groups.setdefault(structure_key(cfg), []).append(i)
    return list(groups.values())


class BatchedPrograms(NamedTuple):
    """The compiled pieces of a group of trials; every argument has a leading trial axis
    except the data."""

    init: Callable[..., train_lib.TrainState]  # (init_keys, values, sample) -> states
    # (states, values, x, y, keys, start, rngs, steps=) -> (states, host metrics of `steps`)
    train_epoch: Callable[..., tuple[train_lib.TrainState, dict]]
    evaluate: Callable[..., dict]  # (params, batch_stats, values, x, y) -> metrics per trial
    steps_per_epoch: int
    model: Any  # the trials' model and optimizer (their hyperparameters live in the state)
    tx: Any


def make_batched_programs(cfg: Config, num_train: int) -> BatchedPrograms:
    """The single-run programs of `cfg`'s structure, vmapped over trials.

    The injected values come per trial (`values`, from `trial_values`): the optimizer's live in
    each trial's optimizer state; the normalization's build each trial's model inside the
    traced programs.
    """
    single = train_lib.make_programs(cfg, num_train)  # also validates the run length
    total = single.steps_per_epoch * cfg.train.epochs

    def optimizer(values):
        return optim.make_optimizer(cfg.opt, total, {k: values[k] for k in optim.INJECTED})

    def trial_cfg(values):
        return with_norm_values(cfg, values["norm"])

    def init(key, values, sample):
        tx, _ = optimizer(values)
        return train_lib.init_state(train_lib.build_model(trial_cfg(values)), tx, key, sample)

    def epoch(state, values, images, labels, key, start, rng, steps, *, length):
        # The update reads the hyperparameters from the state; `values` only feed the logged lr.
        _, schedule = optimizer(values)
        model = train_lib.build_model(trial_cfg(values))
        step_fn = functools.partial(
            train_lib.train_step,
            model=model,
            tx=single.tx,
            schedule=schedule,
            extra_metrics=train_lib.norm_metrics(trial_cfg(values)),
        )
        return train_lib.train_epoch(
            state,
            images,
            labels,
            key,
            start,
            steps,
            batch_size=cfg.train.batch_size,
            step_fn=step_fn,
            length=length,
            rng=rng,
            refresh=train_lib.stats_refresh(trial_cfg(values), model),
        )

    def evaluate(params, batch_stats, values, images, labels):
        return train_lib.evaluate(
            params,
            batch_stats,
            images,
            labels,
            model=train_lib.build_model(trial_cfg(values)),
            batch_size=cfg.train.eval_batch_size,
            measures=diagnostics.split_measures(cfg),
        )

    def batched_epoch(s, v, x, y, k, start, r, steps, length):
        per_trial = functools.partial(epoch, length=length)
        return jax.vmap(per_trial, in_axes=(0, 0, None, None, 0, None, 0, None))(
            s, v, x, y, k, start, r, steps
        )

    program = jax.jit(batched_epoch, donate_argnums=0, static_argnums=8)
    return BatchedPrograms(
        init=jax.jit(jax.vmap(init, in_axes=(0, 0, None)), compiler_options=train_lib.RUN_ONCE),
        train_epoch=train_lib.one_program(
            program, train_lib.chunk_length(cfg, single.steps_per_epoch), trial_axis=True
        ),
        evaluate=jax.jit(jax.vmap(evaluate, in_axes=(0, 0, 0, None, None))),
        steps_per_epoch=single.steps_per_epoch,
        model=single.model,
        tx=single.tx,
    )


def chunk_size(cfg: Config, num_trials: int, sample: jax.Array) -> int:
    """How many trials of `cfg`'s structure fit `MEMORY_FRACTION` of the device memory.

    The estimate per trial: state, gradients and optimizer updates (4x the state), plus the
    forward activations kept for the backward pass, twice, at the training batch size, or the
    evaluation's at its batch size if more. At most `MAX_CHUNK` trials (each also holds files).
    """
    model = train_lib.build_model(cfg)
    tx, _ = optim.make_optimizer(cfg.opt, 1)
    state = jax.eval_shape(
        functools.partial(train_lib.init_state, model, tx), jax.random.key(0), sample
    )
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    _, inter = jax.eval_shape(
        functools.partial(
            model.apply,
            train=True,
            capture_intermediates=True,
            mutable=["intermediates", "batch_stats"],
            rngs=train_lib.step_rngs(jax.random.key(0), 0),  # for dropout and noisy layers
        ),
        variables,
        sample,
    )
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    activations = nbytes(inter) * max(2, cfg.train.eval_batch_size / sample.shape[0])
    per_trial = 4 * nbytes(state) + activations
    fit = MEMORY_FRACTION * _device_memory() // max(per_trial, 1)
    return int(max(1, min(num_trials, MAX_CHUNK, fit)))


def _device_memory() -> int:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # CPU: the host memory


def run_group(
    configs: Sequence[Config],
    workdirs: Sequence[str | os.PathLike],
    *,
    max_chunk: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Trains trials of one structure together, in chunks that fit memory; returns their
    summaries (also written to each workdir's `summary.json`)."""
    if len(configs) != len(workdirs) or not configs:
        raise ValueError("run_group needs one workdir per config, and at least one config")
    if any(c.parallel.mode != "none" for c in configs):
        raise ConfigError(
            "the vmapped engine trains on one device; a trial with parallel.mode != 'none' "
            "runs alone (bnlab sweep does this), or set parallel.mode=none."
        )
    keys = {structure_key(c) for c in configs}
    if len(keys) != 1:
        raise ConfigError(
            "run_group: the configs differ in more than the seed and injected values "
            "(optim.INJECTED, NormSpec.injected)"
        )
    cfg = configs[0]
    for trap in speed_traps(cfg, jax.default_backend()):
        warnings.warn(trap, stacklevel=2)
    splits = load_splits(cfg)
    train_set = splits.train
    with contextlib.ExitStack() as held:  # every trial's folder, for the group's life
        dirs = [_fresh_workdir(held.enter_context(hold_workdir(w))) for w in workdirs]
        sample = data_lib.to_float(train_set.images[: cfg.train.batch_size])
        size = chunk_size(cfg, len(configs), sample)
        size = min(size, max_chunk) if max_chunk else size
        programs = make_batched_programs(cfg, train_set.size)
        summaries: list[dict[str, Any]] = []
        for start in range(0, len(configs), size):
            part = slice(start, start + size)
            if log is not None:
                log(f"training trials {start + 1}-{start + len(configs[part])} of "
                    f"{len(configs)} in one program")  # fmt: skip
            summaries += _train_trials(programs, configs[part], dirs[part], splits)
        return summaries


def _fresh_workdir(path: Path) -> Path:
    """A held workdir, refused if it holds an earlier attempt: a vmapped group cannot resume
    one."""
    if any(p.name != LOCK_FILE for p in path.iterdir()):
        raise ConfigError(
            f"workdir {path} holds an unfinished run; the vmapped engine starts trials from "
            "scratch, so remove it first (bnlab sweep does), or resume it with bnlab train."
        )
    return path


def _train_trials(programs, configs, dirs, splits) -> list[dict[str, Any]]:
    cfg, train_set = configs[0], splits.train
    values = trial_values(configs)
    keys = [train_lib.run_keys(c.train.seed) for c in configs]
    init_keys = jnp.stack([k[0] for k in keys])
    data_keys = jnp.stack([k[1] for k in keys])
    rngs = jnp.stack([train_lib.run_rng(c.train.seed) for c in configs])
    sample = data_lib.to_float(train_set.images[: cfg.train.batch_size])
    state = programs.init(init_keys, values, sample)
    spe = programs.steps_per_epoch
    records = [
        Record(c, d, steps_per_epoch=spe, engine="vmap") for c, d in zip(configs, dirs, strict=True)
    ]

    def train(state, epoch, start, steps):
        epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(data_keys, epoch)
        state, metrics = programs.train_epoch(
            state, values, train_set.images, train_set.labels, epoch_keys, start, rngs, steps=steps
        )
        return state, jax.device_get(metrics)

    def evaluate(state):
        program = lambda params, stats, x, y: programs.evaluate(params, stats, values, x, y)
        return jax.device_get(evaluate_splits(program, state, splits))

    def host_states(state):
        host = jax.device_get(state)  # one transfer; slicing on the host compiles nothing
        return [jax.tree.map(lambda x, i=i: x[i], host) for i in range(len(records))]

    engine = loop.Engine(
        train=train,
        evaluate=evaluate,
        host_states=host_states,
        steps_per_epoch=spe,
        stacked=True,
        end_epoch=plateau_program(cfg, list(configs)),
        **diagnose_program(cfg, programs.model, programs.tx, train_set, rngs, trials=True),
    )
    try:
        for record in records:
            record.start()
        with loop.StopSignals() as stop:
            loop.train(engine, state, records, stop=stop)
    finally:
        for record in records:
            record.close()
    return [r.summary for r in records]
