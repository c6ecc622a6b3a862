"""The configuration: its groups, loading experiment files, dotted overrides, and validation.

Every field is declared once, with its default, type, meaning and check (`bnlab.schema.field`),
on the frozen dataclass of its group. The group belongs to the module that reads it: `model` to
`bnlab.nn.models` (declared in `bnlab.nn.model_config`), `norm` to the normalization registry
`bnlab.nn.norms` (each registered normalization adds its own fields), `opt` to `bnlab.optim`,
`data` to `bnlab.data`, `diagnostics` to the diagnostics registry (the built-in ones' fields in
`bnlab.diagnostics.fields`); `train`, `checkpoint` and `parallel` are declared in `spec`.
`default_config()` derives the `ml_collections.ConfigDict` that experiment files edit (`files`:
loading them, their smoke variant, dotted overrides); `checks.validate` checks it and returns
the typed, frozen `Config`. None of this imports JAX or Flax: the CLI refuses a bad config
before they load.

May import: the base modules, `bnlab.ops`, `bnlab.nn`, `bnlab.data`, `bnlab.diagnostics`,
`bnlab.optim`. Imported by: training, studies, `bnlab.export`, the CLI.
"""

from bnlab.config.checks import (
    absolute_folder,
    data_now,
    from_dict,
    split_problems,
    validate,
)
from bnlab.config.files import (
    DEFAULT_SMOKE,
    apply_overrides,
    config_of,
    load_config,
    load_module,
    smoke_note,
    smoke_overrides,
)
from bnlab.config.spec import (
    BEST_METRICS,
    BN_SYNCS,
    COORDINATOR_ENV,
    NUM_PROCESSES_ENV,
    PARALLEL_MODES,
    PROCESS_ID_ENV,
    RESUMABLE,
    CheckpointConfig,
    Config,
    ParallelConfig,
    TrainConfig,
    default_config,
    describe,
    groups,
    resume_differences,
)
from bnlab.data import TASKS, DataConfig
from bnlab.data.idx import MNIST_DIR_ENV
from bnlab.schema import ConfigError, parse_value

__all__ = [
    "BEST_METRICS",
    "BN_SYNCS",
    "COORDINATOR_ENV",
    "DEFAULT_SMOKE",
    "MNIST_DIR_ENV",
    "NUM_PROCESSES_ENV",
    "PARALLEL_MODES",
    "PROCESS_ID_ENV",
    "RESUMABLE",
    "TASKS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ParallelConfig",
    "TrainConfig",
    "absolute_folder",
    "apply_overrides",
    "config_of",
    "data_now",
    "default_config",
    "describe",
    "from_dict",
    "groups",
    "load_config",
    "load_module",
    "parse_value",
    "resume_differences",
    "smoke_note",
    "smoke_overrides",
    "split_problems",
    "validate",
]
