"""The configuration: its groups, loading experiment files, dotted overrides, and validation.

Every field is declared once, with its default, type, meaning and check (`bnlab.schema.field`),
on the frozen dataclass of its group. The group belongs to the module that reads it: `model` to
`bnlab.models`, `norm` to the normalization registry `bnlab.norms` (each registered
normalization adds its own fields), `opt` to `bnlab.optim`; `data`, `train`, `checkpoint` and
`parallel` are declared here, and `diagnostics` belongs to the diagnostics registry.
`default_config()` derives the `ml_collections.ConfigDict` that experiment files edit;
`validate` checks it and returns the typed, frozen `Config`.
"""

import copy
import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

from bnlab import diagnostics, models, norms, schema
from bnlab.idx import MNIST_DIR_ENV
from bnlab.optim import OptConfig
from bnlab.schema import ConfigError, field, parse_value

__all__ = ["MNIST_DIR_ENV", "ConfigError", "parse_value"]  # re-exported from where they live

# Multi-host settings read from the environment when the config leaves them at None.
COORDINATOR_ENV = "BNLAB_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "BNLAB_NUM_PROCESSES"
PROCESS_ID_ENV = "BNLAB_PROCESS_ID"
PARALLEL_MODES = ("none", "pmap", "sharded")
BN_SYNCS = ("sync", "local")
TASKS = {"mnist10": 10, "binary01": 2}  # task -> number of classes
BEST_METRICS = {"": None, "accuracy": "max", "loss": "min"}  # test metric -> better direction


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data` group: where MNIST comes from and which part of it trains."""

    mnist_dir: str | None = field(
        None, f"local IDX folder; None: ${MNIST_DIR_ENV} or TFDS download"
    )
    tfds_dir: str | None = field(None, "TFDS data dir; None: TFDS's default")
    task: str = field("mnist10", '"mnist10" (10 classes) | "binary01" (digits 0 vs 1)',
                      choices=TASKS)  # fmt: skip
    train_size: int = field(
        0, "use the first N training examples (0: all)", check=schema.non_negative
    )
    validation_size: int = field(
        0,
        "hold out the last N training examples (the same for every seed and train_size) as a "
        "validation split, evaluated at every epoch end (0: none)",
        check=schema.non_negative,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` group: length, batch sizes, seed and logging of a run."""

    epochs: int = field(2, "passes over the training set", check=schema.positive)
    batch_size: int = field(128, "examples per step", check=schema.positive)
    eval_batch_size: int = field(
        100,
        "examples per evaluation step (100: the reference CNN evaluates about 2x faster on CPU "
        "than at 1000, whose activations outgrow the cache; the results do not depend on it)",
        check=schema.positive,
    )
    seed: int = field(0, "seeds init, data order and any noise")
    log_every_steps: int = field(
        50, "train metrics averaged over this many steps per record", check=schema.positive
    )
    divergence_loss: float = field(
        1e4,
        "a train or evaluation loss above this (or any non-finite train metric) marks the run "
        "diverged",
        check=schema.positive,
    )
    early_stopping_patience: int = field(
        0,
        "stop when the validation metric has not improved for this many epochs (0: off; needs "
        "data.validation_size)",
        check=schema.non_negative,
    )
    early_stopping_metric: str = field(
        "loss",
        'validation metric that early stopping watches: "loss" | "accuracy"',
        choices=("loss", "accuracy"),
    )
    probe_unit: int = field(
        -1,
        ">= 0: test (and validation) records carry act_p15/50/85, the percentiles of the input "
        "to this unit's nonlinearity in the last hidden layer (the `probe` diagnostic; -1: off)",
        check=lambda v: None if v >= -1 else "must be -1 (off) or a unit index >= 0",
    )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` group: when checkpoints are saved and which are kept."""

    every_steps: int = field(
        500,
        "save the full train state about every N optimizer steps (at the first chunk end at or "
        "after each multiple of N; an epoch runs in chunks of N steps); 0: only at the end",
        check=schema.non_negative,
    )
    keep: int = field(
        3,
        "most recent checkpoints kept on disk (older ones are deleted)",
        check=schema.at_least(1, "the latest checkpoint is kept"),
    )
    best_metric: str = field(
        "",
        'also keep the checkpoint with the best test metric ("" off | "accuracy" | "loss"); '
        "test metrics exist at epoch ends, so it also saves at every epoch end",
        choices=BEST_METRICS,
    )


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """The `parallel` group: data parallelism over devices, and multi-host runs."""

    mode: str = field(
        "none",
        '"none" (one device) | "pmap" | "sharded" (jit over a device Mesh)',
        choices=PARALLEL_MODES,
    )
    bn: str = field(
        "sync",
        'BN statistics across devices: "sync" (global batch, every step) | "local" (ghost BN: '
        "per device or group; running statistics averaged over the devices)",
        choices=BN_SYNCS,
    )
    bn_group_size: int = field(
        1,
        "local: consecutive devices sharing statistics (1: each device alone)",
        check=schema.at_least(1),
    )
    num_devices: int = field(
        0,
        "devices splitting each batch, over all processes (0: all of them)",
        check=schema.non_negative,
    )
    coordinator_address: str | None = field(
        None, f'multi-host: "host:port" of process 0; None: ${COORDINATOR_ENV}'
    )
    num_processes: int | None = field(
        None,
        f"multi-host: number of processes; None: ${NUM_PROCESSES_ENV}, else 1",
        check=lambda v: None if v is None or v >= 1 else "must be >= 1",
    )
    process_id: int | None = field(
        None,
        f"multi-host: this process's 0-based id; None: ${PROCESS_ID_ENV}, else 0",
        check=lambda v: None if v is None or v >= 0 else "must be >= 0",
    )
    timeout_s: float = field(
        600.0,
        "multi-host: a process that sees no progress for this long (another process stopped "
        "or hangs) stops with a message (exit status 5) instead of waiting forever",
        check=schema.positive,
    )


@dataclasses.dataclass(frozen=True)
class Config:
    model: models.ModelConfig
    norm: Any  # norms.norm_config_class(): shared fields + each normalization's own
    opt: OptConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    parallel: ParallelConfig
    diagnostics: Any  # diagnostics.diagnostics_config_class(): shared fields + each one's own

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def groups() -> dict[str, type]:
    """Group name -> its dataclass, in config order (the `norm` group as registered now)."""
    return {
        "model": models.ModelConfig,
        "norm": norms.norm_config_class(),
        "opt": OptConfig,
        "data": DataConfig,
        "train": TrainConfig,
        "checkpoint": CheckpointConfig,
        "parallel": ParallelConfig,
        "diagnostics": diagnostics.diagnostics_config_class(),
    }


def default_config() -> ml_collections.ConfigDict:
    """Base config: the reference CNN with BN on 10-class MNIST, SGD with momentum. Each
    field's meaning is on its dataclass (`describe()` lists them all)."""
    c = ml_collections.ConfigDict()
    for name, cls in groups().items():
        group = {}
        for f in dataclasses.fields(cls):
            annotation = schema.field_type(cls, f.name)
            if f.default is None:  # typed, so that an override is checked
                kind = next(t for t in _options(annotation) if t is not type(None))
                group[f.name] = config_dict.placeholder(kind)
            else:
                group[f.name] = f.default
        c[name] = group
    return c


def describe() -> list[tuple[str, Any, str]]:
    """`(group.field, default, meaning)` of every field, for references and `--help`."""
    return [
        (f"{name}.{f.name}", f.default, schema.doc(f))
        for name, cls in groups().items()
        for f in dataclasses.fields(cls)
    ]


def _options(annotation) -> tuple:
    import typing

    return typing.get_args(annotation) or (annotation,)


def load_module(path: str | os.PathLike):
    """Imports an experiment file as a module; any error in it becomes a `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass e.g. experiments/mnist_cnn.py"
        )
    spec = importlib.util.spec_from_file_location(f"bnlab_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        message = f"config file {path} failed to load: {type(err).__name__}: {err}"
        raise ConfigError(message) from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(); an experiment file must define one.")
    return module


# A quick check of any experiment: few examples, one epoch (an experiment's SMOKE overrides).
DEFAULT_SMOKE = {"data.train_size": 1200, "train.epochs": 1}


def smoke_overrides(module) -> dict[str, str]:
    """The experiment's `SMOKE` overrides (or `DEFAULT_SMOKE`) as command-line texts."""
    smoke = getattr(module, "SMOKE", DEFAULT_SMOKE)
    return {k: v if isinstance(v, str) else repr(v) for k, v in smoke.items()}


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Imports an experiment file and returns its `get_config()`."""
    module = load_module(path)
    return config_of(module, path)


def config_of(module, path: str | os.PathLike = "experiment") -> ml_collections.ConfigDict:
    """An experiment module's `get_config()`, with its errors as `ConfigError`."""
    try:
        return module.get_config()
    except Exception as err:
        raise ConfigError(f"{path}: get_config() raised {type(err).__name__}: {err}") from err


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: dict[str, str]
) -> ml_collections.ConfigDict:
    """Sets dotted keys (`"opt.lr" -> "0.1"`) on a copy of `cfg`, parsing values as literals."""
    cfg = copy.deepcopy(cfg)
    for key, text in overrides.items():
        parent, leaf = _resolve(cfg, key)
        value = parse_value(text)
        old = parent[leaf]
        if isinstance(value, bool) and not isinstance(old, bool) and old is not None:
            raise ConfigError(f"--config.{key}={text}: expected {type(old).__name__}, got a bool.")
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            parent[leaf] = value
        except TypeError as err:
            raise ConfigError(
                f"--config.{key}={text}: expected a value of type {type(old).__name__}, "
                f"got {type(value).__name__} ({value!r})."
            ) from err
    return cfg


def _resolve(cfg, key):
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"unknown config key {key!r}: {where} has no field {part!r}. Known fields: {known}."
            )
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


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
        root = Path(__file__).resolve().parents[1]
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
RESUMABLE = (
    "train.epochs",
    "train.eval_batch_size",
    "data.mnist_dir",
    "data.tfds_dir",
    "parallel.coordinator_address",  # a restarted multi-host job may get another port
    "parallel.process_id",  # each process of one run has its own
    "parallel.timeout_s",
)


def resume_differences(old: Config, new: Config) -> list[str]:
    """The changes from `old` to `new` that a run cannot resume across (`"opt.lr: 0.1 -> 0.2"`);
    the `checkpoint` group and the `RESUMABLE` fields may change."""
    old_d, new_d = old.to_dict(), new.to_dict()
    return [
        f"{group}.{field}: {old_d[group][field]!r} -> {new_d[group][field]!r}"
        for group in old_d
        if group != "checkpoint"
        for field in old_d[group]
        if f"{group}.{field}" not in RESUMABLE and old_d[group][field] != new_d[group][field]
    ]


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
    p += norms.problems(
        c,
        widths=models.NORM_WIDTHS[c.model.name],
        per_device_batch=c.train.batch_size // max(devices, 1),
    )
    p += diagnostics.problems(c.diagnostics)
    last = models.NORM_WIDTHS[c.model.name][-1]
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
