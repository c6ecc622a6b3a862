"""bnlab: batch normalization research with JAX, Flax and optax."""

from bnlab.layers import (
    BatchNorm,
    BatchRenorm,
    GhostBatchNorm,
    GroupNorm,
    Identity,
    LayerNorm,
    NoisyBatchNorm,
    PopulationBatchNorm,
)
from bnlab.norm import (
    batch_norm,
    batch_renorm,
    ghost_batch_norm,
    group_norm,
    init_stats,
    layer_norm,
    moving_average,
    noisy_batch_norm,
    population_batch_norm,
    renorm_schedule,
    stats_from_torch,
    torch_momentum,
)

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "Identity",
    "LayerNorm",
    "NoisyBatchNorm",
    "PopulationBatchNorm",
    "batch_norm",
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
]
__version__ = "0.1.0"
