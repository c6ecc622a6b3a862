"""bnlab: batch normalization research with JAX, Flax and optax."""

from bnlab.layers import BatchNorm, Identity
from bnlab.norm import batch_norm, init_stats, moving_average, stats_from_torch, torch_momentum

__all__ = [
    "BatchNorm",
    "Identity",
    "batch_norm",
    "init_stats",
    "moving_average",
    "stats_from_torch",
    "torch_momentum",
]
__version__ = "0.1.0"
