"""Validation: a `ConfigDict` to the typed, frozen `Config`, with the checks that span groups
(batch sizes, devices, normalizations), and a stored config read back."""

import dataclasses
import os
from pathlib import Path
from typing import Any

import ml_collections

from bnlab import diagnostics, schema
from bnlab.config.spec import (
    COORDINATOR_ENV,
    NUM_PROCESSES_ENV,
    PROCESS_ID_ENV,
    Config,
    groups,
)
from bnlab.data import DataConfig
from bnlab.data.idx import MNIST_DIR_ENV
from bnlab.nn import model_config, norms
from bnlab.schema import ConfigError


def validate(cfg: ml_collections.ConfigDict) -> Config:
    """Checks every field and returns the typed config; `ConfigError` lists all problems.

    A field the config lacks takes its default (a config.json of an older bnlab); an unknown
    group or field is an error.
    """
    raw = cfg.to_dict()
    classes = groups()
    problems = [f"unknown config group {g!r}" for g in raw if g not in classes]
    values: dict[str, dict[str, Any]] = {}
    for name, cls in classes.items():
        given = dict(raw.get(name, {}))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems += [f"unknown field {name}.{k}" for k in given if k not in fields]
        values[name] = {}
        for key, f in fields.items():
            value, problem = schema.coerce(given.get(key, f.default), schema.field_type(cls, key))
            if problem:
                problems.append(f"{name}.{key}: {problem}")
            values[name][key] = value
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    data = values["data"]
    if data["mnist_dir"] is None:
        data["mnist_dir"] = os.environ.get(MNIST_DIR_ENV) or None
    data["mnist_dir"], data["tfds_dir"] = map(
        absolute_folder, (data["mnist_dir"], data["tfds_dir"])
    )
    try:
        _parallel_from_env(values["parallel"])
    except ValueError as err:
        raise ConfigError(f"invalid config: {err}") from err
    config = Config(**{name: cls(**values[name]) for name, cls in classes.items()})
    problems = [p for name in classes for p in schema.field_problems(name, getattr(config, name))]
    if not problems:  # the checks across groups assume each field is valid on its own
        problems = _check_across(config)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return config


def absolute_folder(path: str | None) -> str | None:
    """A data folder as an absolute path, so that config.json and checkpoints name it from
    anywhere. A relative path is taken from the working folder or, when nothing is there, from
    the root of the bnlab checkout (the README's paths are relative to the root; a notebook
    runs in notebooks/). None and "" (TFDS's default folder) stay as they are."""
    if not path:
        return path
    folder = Path(path).expanduser()
    if not folder.is_absolute() and not folder.exists():
        root = Path(__file__).resolve().parents[2]  # bnlab/config/checks.py -> the checkout
        if (root / "pyproject.toml").is_file() and (root / folder).exists():
            folder = root / folder
    return os.path.abspath(folder)


def data_now(
    data: DataConfig, *, mnist_dir: str | None = None, tfds_dir: str | None = None
) -> DataConfig:
    """A trained run's `data` group pointed at where the data is now: MNIST from `mnist_dir`,
    else `$BNLAB_MNIST_DIR`, else the run's folder; TFDS's folder `tfds_dir`, else the run's.
    Both are resumable fields: the files are checked, so any folder gives the same data."""
    mnist_dir = mnist_dir or os.environ.get(MNIST_DIR_ENV) or data.mnist_dir
    return dataclasses.replace(
        data,
        mnist_dir=absolute_folder(mnist_dir),
        tfds_dir=absolute_folder(tfds_dir or data.tfds_dir),
    )


def from_dict(raw: dict[str, Any]) -> Config:
    """The `Config` that `Config.to_dict()` (e.g. a workdir's `config.json`) describes."""
    return validate(ml_collections.ConfigDict(raw))


# Fields a resumed run may change: they do not change the state's structure or its past steps.


def _parallel_from_env(par: dict[str, Any]) -> None:
    """Fills the multi-host fields left at None from the environment (else 1 process)."""
    if par["coordinator_address"] is None:
        par["coordinator_address"] = os.environ.get(COORDINATOR_ENV) or None
    for key, env, default in (
        ("num_processes", NUM_PROCESSES_ENV, 1),
        ("process_id", PROCESS_ID_ENV, 0),
    ):
        if par[key] is None:
            text = os.environ.get(env)
            if text is not None and not text.strip().lstrip("-").isdigit():
                raise ValueError(f"${env}={text!r} must be an integer")
            par[key] = default if text is None else int(text)


def _check_across(c: Config) -> list[str]:
    """Checks that involve more than one field."""
    p = _check_parallel(c)
    if c.data.train_size and c.data.train_size < c.train.batch_size:
        p.append(
            f"data.train_size={c.data.train_size} is smaller than train.batch_size="
            f"{c.train.batch_size}; raise train_size or lower batch_size"
        )
    validation = c.data.validation_size > 0
    if c.opt.schedule == "plateau" and not validation:
        p.append(
            "opt.schedule='plateau' lowers the learning rate when the validation loss stalls; "
            "set data.validation_size (e.g. 5000) to hold out a validation split"
        )
    if c.opt.schedule == "plateau" and not c.opt.decay_rate < 1.0:
        p.append(
            f"opt.decay_rate={c.opt.decay_rate} must lie in (0, 1) with opt.schedule='plateau' "
            "(the factor of each drop of the learning rate)"
        )
    if c.train.early_stopping_patience and not validation:
        p.append(
            f"train.early_stopping_patience={c.train.early_stopping_patience} watches the "
            "validation split; set data.validation_size (e.g. 5000) or set the patience to 0"
        )
    devices = c.parallel.num_devices if c.parallel.mode != "none" else 1
    measured = diagnostics.parse_names(c.diagnostics.names)
    p += norms.problems(
        c,
        widths=model_config.norm_widths(c.model),
        per_device_batch=c.train.batch_size // max(devices, 1),
        diagnostic_batch=c.diagnostics.batch_size if measured else None,
    )
    p += diagnostics.problems(c.diagnostics)
    last = model_config.norm_widths(c.model)[-1]
    if c.train.probe_unit >= last:
        p.append(
            f"train.probe_unit={c.train.probe_unit} but the last hidden layer of model.name="
            f"{c.model.name!r} has {last} units; choose a unit below {last} (or -1: off)"
        )
    p += _single_value_problems(c)
    if diagnostics.parse_names(c.diagnostics.names) and c.parallel.mode != "none":
        p.append(
            f"diagnostics.names={c.diagnostics.names!r} runs on one device; set "
            "parallel.mode=none to measure (or diagnostics.names='' to train on several)"
        )
    return p


def _single_value_problems(c: Config) -> list[str]:
    """Batch statistics over one example per step (refused, as PyTorch refuses it)."""
    par = c.parallel
    local = par.mode != "none" and par.bn == "local" and par.num_devices
    examples = c.train.batch_size // par.num_devices * par.bn_group_size if local else None
    examples = c.train.batch_size if par.mode == "none" else examples
    if examples == 1 and norms.get(c.model.norm).batch_stats and not c.norm.allow_single_value:
        return [
            f"train.batch_size={c.train.batch_size} gives model.norm={c.model.norm!r} one "
            "example per statistic: every dense layer's variance is 0 and its output the "
            "bias; use a larger batch or set norm.allow_single_value=true"
        ]
    return []


def _check_parallel(c: Config) -> list[str]:
    """The device split, checked before anything compiles (the device count is checked later)."""
    par, p = c.parallel, []
    if par.mode == "none":
        if par.num_processes > 1:
            p.append(
                f"parallel.num_processes={par.num_processes} needs parallel.mode='sharded' "
                "(multi-host runs use a global device mesh)"
            )
        return p
    if par.num_processes > 1 and par.mode != "sharded":
        p.append(
            f"parallel.mode={par.mode!r} runs on one host; multi-host "
            f"(parallel.num_processes={par.num_processes}) needs parallel.mode='sharded'"
        )
    if par.num_processes > 1 and not par.coordinator_address:
        p.append(
            "parallel.num_processes > 1 needs parallel.coordinator_address ('host:port' of "
            f"process 0) or ${COORDINATOR_ENV}"
        )
    if par.process_id >= par.num_processes:
        p.append(
            f"parallel.process_id={par.process_id} must be < parallel.num_processes="
            f"{par.num_processes}"
        )
    if par.num_devices:
        p.extend(split_problems(c.train.batch_size, par.num_devices, par.bn, par.bn_group_size))
    return p


def split_problems(batch_size: int, num_devices: int, bn: str, group_size: int) -> list[str]:
    """Why `batch_size` cannot be split over `num_devices` (an empty list if it can)."""
    if num_devices > batch_size:
        return [
            f"parallel.num_devices={num_devices} exceeds train.batch_size={batch_size}: each "
            "device needs at least one example; use fewer devices or a larger batch"
        ]
    p = []
    if batch_size % num_devices:
        p.append(
            f"train.batch_size={batch_size} does not split evenly over {num_devices} devices; "
            f"use a multiple of {num_devices} (e.g. {-(-batch_size // num_devices) * num_devices}) "
            "or a parallel.num_devices that divides it"
        )
    if bn == "local" and num_devices % group_size:
        p.append(
            f"parallel.bn_group_size={group_size} does not divide the {num_devices} devices; "
            "use a divisor of parallel.num_devices"
        )
    return p
