"""bnlab: batch normalization research with JAX, Flax and optax.

The package in layers, each importing only those below it (`bnlab.layout` states the rule and a
test checks every import against it):

    cli, export                  the command and what it calls that spans a whole run
    studies/                     sweeps, results and their statistics, reports, figures
    training/                    the train state and step, epochs, the loop, runs, checkpoints
    config/                      the config's groups, experiment files, overrides, validation
    diagnostics/, optim          the instruments' registry; the config -> optax chain
    nn/                          Flax: linen and NNX layers, models, the normalization registry
    data/                        MNIST: IDX files, the TFDS builder, the whole-array copy, load()
    ops/                         the pure normalizations (no Flax)
    schema, registry, types      what every layer reads

`bnlab.norm`, `bnlab.norms`, `bnlab.layers`, `bnlab.models`, `bnlab.nnx` and `bnlab.results` are
the public paths of `bnlab.ops`, `bnlab.nn.*` and `bnlab.studies.results`. The flat paths of
earlier versions (`bnlab.train`, `bnlab.run`, ...) still import, with a DeprecationWarning.
"""

import importlib

from bnlab import _moved

# Public name -> the module it comes from, imported on first use: `import bnlab.cli` (and so
# `bnlab --help` and a refused override) loads neither JAX nor Flax.
_PUBLIC = {
    **dict.fromkeys(
        (
            "BatchNorm",
            "BatchNormStopGrad",
            "BatchRenorm",
            "GhostBatchNorm",
            "GroupNorm",
            "Identity",
            "LayerNorm",
            "NoisyBatchNorm",
            "PopulationBatchNorm",
        ),
        "bnlab.nn.layers",
    ),
    **dict.fromkeys(
        (
            "batch_norm",
            "batch_norm_stopgrad",
            "batch_renorm",
            "ghost_batch_norm",
            "group_norm",
            "init_stats",
            "layer_norm",
            "moving_average",
            "noisy_batch_norm",
            "population_batch_norm",
            "renorm_schedule",
            "stats_from_torch",
            "torch_momentum",
        ),
        "bnlab.ops",
    ),
}
# Subpackages read as attributes of `bnlab` (`bnlab.ops.batch_norm` after `import bnlab`).
_SUBPACKAGES = ("config", "data", "diagnostics", "nn", "ops", "optim", "studies", "training")

_moved.install()

__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC, *_SUBPACKAGES})
