"""The config's groups (`train`, `checkpoint` and `parallel` declared here, the others taken
from the modules that read them), the `Config` they form, its defaults, and what may change on
resume."""

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

from bnlab import diagnostics, schema
from bnlab.data import DataConfig
from bnlab.nn import model_config, norms
from bnlab.optim import OptConfig, depends_on_length
from bnlab.schema import field

# Multi-host settings read from the environment when the config leaves them at None.
COORDINATOR_ENV = "BNLAB_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "BNLAB_NUM_PROCESSES"
PROCESS_ID_ENV = "BNLAB_PROCESS_ID"
PARALLEL_MODES = ("none", "pmap", "sharded")
BN_SYNCS = ("sync", "local")
BEST_METRICS = {"": None, "accuracy": "max", "loss": "min"}  # test metric -> better direction


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
    progress_seconds: float = field(
        5.0,
        "a chunk of compiled steps lasts about this long (from the measured step time), so the "
        "progress display and log lines move every few seconds; 0: chunks of "
        "checkpoint.every_steps or a whole epoch (the results are the same bits either way)",
        check=schema.non_negative,
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
    model: model_config.ModelConfig
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
        "model": model_config.ModelConfig,
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


RESUMABLE = (
    "train.epochs",
    "train.eval_batch_size",
    "train.progress_seconds",
    "data.mnist_dir",
    "data.tfds_dir",
    "parallel.coordinator_address",  # a restarted multi-host job may get another port
    "parallel.process_id",  # each process of one run has its own
    "parallel.timeout_s",
)


def resume_differences(old: Config, new: Config) -> list[str]:
    """The changes from `old` to `new` that a run cannot resume across (`"opt.lr: 0.1 -> 0.2"`);
    the `checkpoint` group and the `RESUMABLE` fields may change, except `train.epochs` when the
    learning-rate schedule is built from the run's length (`bnlab.optim.depends_on_length`)."""
    old_d, new_d = old.to_dict(), new.to_dict()
    changes = [
        f"{group}.{field}: {old_d[group][field]!r} -> {new_d[group][field]!r}"
        for group in old_d
        if group != "checkpoint"
        for field in old_d[group]
        if f"{group}.{field}" not in RESUMABLE and old_d[group][field] != new_d[group][field]
    ]
    if old.train.epochs != new.train.epochs and depends_on_length(old.opt):
        changes.append(
            f"train.epochs: {old.train.epochs} -> {new.train.epochs} (opt.schedule="
            f"{old.opt.schedule!r} is built from the run's total steps, so the learning rate "
            "would jump mid-run to a curve that matches neither length; keep train.epochs, or "
            "start a new run)"
        )
    return changes
