"""The default configuration, loading experiment files, dotted overrides, and validation.

Experiments are Python files whose `get_config()` returns an `ml_collections.ConfigDict`
(usually `default_config()` with a few fields changed). The code uses the validated, typed,
frozen `Config` that `validate` returns.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import math
import os
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections import config_dict

MNIST_DIR_ENV = "BNLAB_MNIST_DIR"
# Multi-host settings read from the environment when the config leaves them at None.
COORDINATOR_ENV = "BNLAB_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "BNLAB_NUM_PROCESSES"
PROCESS_ID_ENV = "BNLAB_PROCESS_ID"
PARALLEL_MODES = ("none", "pmap", "sharded")
BN_SYNCS = ("sync", "local")
TASKS = {"mnist10": 10, "binary01": 2}  # task -> number of classes


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


def default_config() -> ml_collections.ConfigDict:
    """Base config: the reference CNN with BN on 10-class MNIST, SGD with momentum."""
    c = ml_collections.ConfigDict()
    c.model = dict(
        name="cnn",  # "cnn" (reference CNN) | "mlp" (Ioffe & Szegedy Fig. 1 MLP)
        norm="batchnorm",  # "batchnorm" | "none"
        placement="before",  # normalization "before" | "after" the nonlinearity
        activation="relu",  # "relu" | "sigmoid" | "tanh"
        init="lecun_normal",  # kernel init: "lecun_normal" | "he_normal" | "normal"
        init_std=0.01,  # standard deviation of the "normal" init
        conv_impl="im2col",  # CNN convolutions: "im2col" (fast on CPU) | "xla" (cuDNN on GPU)
    )
    c.norm = dict(
        momentum=0.99,  # weight of the old running statistics (flax convention)
        epsilon=1e-5,  # added to the variance
        convention="flax",  # running variance "flax" (biased) | "torch" (unbiased)
        backward="analytic",  # gradient: "analytic" (custom VJP) | "autodiff"
    )
    c.opt = dict(
        name="momentum",  # sgd | momentum | nesterov | adam | adamw | rmsprop | adagrad
        lr=0.05,  # peak learning rate
        momentum=0.9,  # momentum / nesterov: momentum coefficient
        rmsprop_momentum=0.0,  # rmsprop: momentum coefficient (0: none)
        b1=0.9,  # adam/adamw first-moment decay
        b2=0.999,  # adam/adamw second-moment decay
        eps=1e-8,  # adam/adamw/rmsprop/adagrad denominator epsilon
        decay=0.9,  # rmsprop squared-gradient decay
        weight_decay=0.0,  # L2 factor added to the gradient (decoupled for adamw)
        schedule="constant",  # constant | step | exponential | cosine | warmup_cosine
        boundaries=(0.5, 0.75),  # step: fractions of training where lr *= decay_rate
        decay_rate=0.1,  # step: factor per boundary; exponential: factor over the whole run
        warmup_steps=0,  # warmup_cosine: linear warmup length in steps
        clip="none",  # none | global_norm | value
        clip_value=1.0,  # max global norm ("global_norm") or max |g| ("value")
    )
    c.data = dict(
        mnist_dir=config_dict.placeholder(
            str
        ),  # local IDX folder; None: $BNLAB_MNIST_DIR or TFDS download
        tfds_dir=config_dict.placeholder(str),  # TFDS data dir; None: TFDS's default
        task="mnist10",  # "mnist10" (10 classes) | "binary01" (digits 0 vs 1)
        train_size=0,  # use the first N training examples (0: all)
    )
    c.train = dict(
        epochs=2,  # passes over the training set
        batch_size=128,  # examples per step
        eval_batch_size=1000,  # examples per evaluation step
        seed=0,  # seeds init and data order
        log_every_steps=50,  # train metrics averaged over this many steps per record
        probe_unit=-1,  # >= 0: test records carry act_p15/50/85, the percentiles of the
        # input to this unit's nonlinearity in the last hidden layer (-1: off)
    )
    c.checkpoint = dict(
        # Save the full train state about every N optimizer steps (at the first chunk end at or
        # after each multiple of N; an epoch runs in chunks of N steps). 0: only at the end.
        every_steps=500,
        keep=3,  # most recent checkpoints kept on disk (older ones are deleted)
        # Also keep the checkpoint with the best test metric ("" off | "accuracy" | "loss");
        # test metrics exist at epoch ends, so it also saves at every epoch end.
        best_metric="",
    )
    c.parallel = dict(
        mode="none",  # "none" (one device) | "pmap" | "sharded" (jit over a device Mesh)
        # BN statistics across devices: "sync" (global batch, every step) | "local" (ghost BN:
        # per device or group; running statistics averaged over the devices)
        bn="sync",
        bn_group_size=1,  # local: consecutive devices sharing statistics (1: each device alone)
        num_devices=0,  # devices splitting each batch, over all processes (0: all of them)
        # Multi-host, None reading the environment: "host:port" of process 0
        # ($BNLAB_COORDINATOR_ADDRESS), the number of processes ($BNLAB_NUM_PROCESSES, else 1)
        # and this process's 0-based id ($BNLAB_PROCESS_ID, else 0).
        coordinator_address=config_dict.placeholder(str),
        num_processes=config_dict.placeholder(int),
        process_id=config_dict.placeholder(int),
    )
    return c


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    norm: str
    placement: str
    activation: str
    init: str
    init_std: float
    conv_impl: str


@dataclasses.dataclass(frozen=True)
class NormConfig:
    momentum: float
    epsilon: float
    convention: str
    backward: str


@dataclasses.dataclass(frozen=True)
class OptConfig:
    name: str
    lr: float
    momentum: float
    rmsprop_momentum: float
    b1: float
    b2: float
    eps: float
    decay: float
    weight_decay: float
    schedule: str
    boundaries: tuple[float, ...]
    decay_rate: float
    warmup_steps: int
    clip: str
    clip_value: float


@dataclasses.dataclass(frozen=True)
class DataConfig:
    mnist_dir: str | None
    tfds_dir: str | None
    task: str
    train_size: int


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    eval_batch_size: int
    seed: int
    log_every_steps: int
    probe_unit: int


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int
    keep: int
    best_metric: str


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    mode: str
    bn: str
    bn_group_size: int
    num_devices: int
    coordinator_address: str | None
    num_processes: int
    process_id: int


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    norm: NormConfig
    opt: OptConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    parallel: ParallelConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_GROUPS = {
    "model": ModelConfig,
    "norm": NormConfig,
    "opt": OptConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "parallel": ParallelConfig,
}
BEST_METRICS = {"": None, "accuracy": "max", "loss": "min"}  # test metric -> better direction


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


def parse_value(text: str) -> Any:
    """`"0.1" -> 0.1`, `"(1, 2)" -> (1, 2)`, `"None" -> None`, `"true" -> True`, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


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
    """Checks every field and returns the typed config; `ConfigError` lists all problems."""
    raw = cfg.to_dict()
    problems = [f"unknown config group {g!r}" for g in raw if g not in _GROUPS]
    groups = {}
    for name, cls in _GROUPS.items():
        values = dict(raw.get(name, {}))
        fields = {f.name for f in dataclasses.fields(cls)}
        problems += [f"unknown field {name}.{k}" for k in values if k not in fields]
        problems += [f"missing field {name}.{k}" for k in sorted(fields - values.keys())]
        groups[name] = {k: v for k, v in values.items() if k in fields}
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    data = groups["data"]
    if data["mnist_dir"] is None:
        data["mnist_dir"] = os.environ.get(MNIST_DIR_ENV) or None
    groups["opt"]["boundaries"] = tuple(groups["opt"]["boundaries"])
    try:
        _parallel_from_env(groups["parallel"])
    except ValueError as err:
        raise ConfigError(f"invalid config: {err}") from err
    config = Config(**{name: cls(**groups[name]) for name, cls in _GROUPS.items()})
    problems = _check_values(config)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return config


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


def _check_values(c: Config) -> list[str]:
    # Local imports keep config a leaf: these modules only provide the name tables.
    from bnlab import models, norm, optim

    p = []

    def choice(key, value, options):
        if value not in options:
            p.append(f"{key}={value!r} is not one of {sorted(options)}")

    choice("model.name", c.model.name, models.MODELS)
    choice("model.norm", c.model.norm, models.NORMS)
    choice("model.placement", c.model.placement, models.PLACEMENTS)
    choice("model.activation", c.model.activation, models.ACTIVATIONS)
    choice("model.init", c.model.init, models.INITS)
    choice("model.conv_impl", c.model.conv_impl, models.CONV_IMPLS)
    choice("norm.convention", c.norm.convention, norm.CONVENTIONS)
    choice("norm.backward", c.norm.backward, norm.BACKWARDS)
    choice("opt.name", c.opt.name, optim.OPTIMIZERS)
    choice("opt.schedule", c.opt.schedule, optim.SCHEDULES)
    choice("opt.clip", c.opt.clip, optim.CLIPS)
    choice("data.task", c.data.task, TASKS)
    choice("checkpoint.best_metric", c.checkpoint.best_metric, BEST_METRICS)
    choice("parallel.mode", c.parallel.mode, PARALLEL_MODES)
    choice("parallel.bn", c.parallel.bn, BN_SYNCS)
    if not 0.0 <= c.norm.momentum <= 1.0:
        p.append(f"norm.momentum={c.norm.momentum} must lie in [0, 1] (weight of old statistics)")

    def require(keys: str, ok, requirement: str):
        for key in keys.split():
            group, field = key.split(".")
            value = getattr(getattr(c, group), field)
            if not ok(value):
                p.append(f"{key}={value} {requirement}")

    require(
        "norm.epsilon opt.lr opt.eps opt.decay_rate opt.clip_value model.init_std train.epochs "
        "train.batch_size train.eval_batch_size train.log_every_steps",
        lambda v: v > 0 and math.isfinite(v),
        "must be finite and > 0",
    )
    require(
        "opt.momentum opt.rmsprop_momentum opt.b1 opt.b2 opt.decay",
        lambda v: 0.0 <= v < 1.0,
        "must lie in [0, 1)",
    )
    require(
        "opt.weight_decay opt.warmup_steps data.train_size checkpoint.every_steps "
        "parallel.num_devices parallel.process_id",
        lambda v: v >= 0,
        "must be >= 0",
    )
    require("checkpoint.keep", lambda v: v >= 1, "must be >= 1 (the latest checkpoint is kept)")
    require("train.probe_unit", lambda v: v >= -1, "must be -1 (off) or a unit index >= 0")
    require("parallel.bn_group_size parallel.num_processes", lambda v: v >= 1, "must be >= 1")
    p.extend(_check_parallel(c))
    if not all(0.0 < b < 1.0 for b in c.opt.boundaries):
        p.append(f"opt.boundaries={c.opt.boundaries} must be fractions of training in (0, 1)")
    if c.data.train_size and c.data.train_size < c.train.batch_size:
        p.append(
            f"data.train_size={c.data.train_size} is smaller than train.batch_size="
            f"{c.train.batch_size}; raise train_size or lower batch_size"
        )
    return p


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
