"""Pure normalizations: batch normalization, its variants, and layer and group normalization.

Arrays in, arrays out, explicit state, statistics in float32. No Flax, no configs: the Flax
wrappers live in `bnlab.nn.layers`, the config and registry in `bnlab.nn.norms`.

`batch_norm` follows Ioffe & Szegedy (2015), Algorithm 1 and Section 3 (`bnlab.ops.bn_core`). Its
variants reuse its one-pass moments and closed-form backward (`bnlab.ops.bn_variants`):
`ghost_batch_norm` (Hoffer et al. 2017), `batch_renorm` (Ioffe 2017), `noisy_batch_norm`
(Santurkar et al. 2018, Sec. 2), `population_batch_norm` (Ghorbani et al. 2019) and
`batch_norm_stopgrad` (BN without gradient through the batch statistics).
`group_norm` (Wu & He 2018) and `layer_norm` (Ba et al. 2016) normalize each example on its own
(`bnlab.ops.example_norms`); `weight_norm` (Salimans & Kingma 2016) and `weight_standardize`
(Qiao et al. 2019) normalize a layer's kernel (`bnlab.ops.kernel_norms`).
This module is where they are imported from.

May import: `bnlab.types` only (and jax). Imported by everything above it; users import it
as `bnlab.norm` or from `bnlab` itself.
"""

from bnlab.ops.bn_core import (
    BACKWARDS,
    CONVENTIONS,
    AxisGroups,
    Backward,
    Convention,
    batch_norm,
    feature_axes_of,
    init_stats,
    moving_average,
    stats_from_torch,
    torch_momentum,
)
from bnlab.ops.bn_math import check_values_per_feature
from bnlab.ops.bn_variants import (
    activation_noise,
    batch_norm_stopgrad,
    batch_renorm,
    ghost_batch_norm,
    noise_moments,
    noisy_batch_norm,
    population_batch_norm,
    renorm_schedule,
)
from bnlab.ops.example_norms import group_norm, layer_norm
from bnlab.ops.kernel_norms import (
    WEIGHT_NORM_EPSILON,
    unit_norms,
    weight_norm,
    weight_standardize,
)

__all__ = [
    "BACKWARDS",
    "CONVENTIONS",
    "WEIGHT_NORM_EPSILON",
    "AxisGroups",
    "Backward",
    "Convention",
    "activation_noise",
    "batch_norm",
    "batch_norm_stopgrad",
    "batch_renorm",
    "check_values_per_feature",
    "feature_axes_of",
    "ghost_batch_norm",
    "group_norm",
    "init_stats",
    "layer_norm",
    "moving_average",
    "noise_moments",
    "noisy_batch_norm",
    "population_batch_norm",
    "renorm_schedule",
    "stats_from_torch",
    "torch_momentum",
    "unit_norms",
    "weight_norm",
    "weight_standardize",
]
