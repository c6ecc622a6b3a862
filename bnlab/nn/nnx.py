"""Flax NNX layers over bnlab's pure normalizations, one per registered normalization.

Each layer is built and called as flax's NNX layers are (`num_features`, keyword options,
`rngs`), holds the variables of its linen twin in `bnlab.layers` (`nnx.Param` scale/bias,
`nnx.BatchStat` running statistics), and computes with the same function of `bnlab.norm`.
`norm_from_config` builds the layer that a config's `model.norm` names, through the registry
(`NormSpec.nnx`). `to_linen`/`from_linen` (from `bnlab.nn.nnx_state`) move a model's variables to
and from linen's dict. Import it as `bnlab.nnx`; `import bnlab` does not import NNX.
"""

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from bnlab.nn import norms
from bnlab.nn.nnx_bn import BatchNorm, linen_rng, noise_key
from bnlab.nn.nnx_state import (
    LinenVariables,
    dicts_to_states,
    from_linen,
    states_to_dicts,
    to_linen,
)
from bnlab.nn.nnx_variants import (
    BatchNormStopGrad,
    BatchRenorm,
    GhostBatchNorm,
    GroupNorm,
    Identity,
    LayerNorm,
    NoisyBatchNorm,
    PopulationBatchNorm,
    WeightNorm,
    WeightStandardization,
)
from bnlab.schema import ConfigError

__all__ = [
    "BatchNorm",
    "BatchNormStopGrad",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "Identity",
    "LayerNorm",
    "LinenVariables",
    "NoisyBatchNorm",
    "PopulationBatchNorm",
    "WeightNorm",
    "WeightStandardization",
    "dicts_to_states",
    "from_linen",
    "kernel_norm_factory",
    "linen_rng",
    "noise_key",
    "norm_factory",
    "norm_from_config",
    "states_to_dicts",
    "to_linen",
]


def norm_factory(
    cfg: Any, *, axis: Mapping[str, Any] | None = None, name: str | None = None
) -> Callable[..., nnx.Module]:
    """The NNX layer factory of a config's normalization, for a model's `norm` argument.

    Args:
      cfg: the whole config (`cfg.model.norm` names the normalization, `cfg.norm` holds its
        fields), or its `norm` group with `name`.
      axis: `axis_name`/`axis_index_groups`, given only to normalizations with batch
        statistics (as `bnlab.norms.build` does).
      name: the registered name; overrides `cfg.model.norm`.

    Returns:
      `factory(num_features, *, rngs)` -> the layer.

    Raises:
      bnlab.schema.ConfigError: for an unknown name, or a normalization registered without an
        NNX layer (`NormSpec.nnx` is None).
      TypeError: for a `norm` group without `name`.
    """
    if name is None and not hasattr(cfg, "model"):
        raise TypeError(
            "norm_factory: pass the whole config, or its norm group with the normalization's "
            "name: norm_factory(cfg.norm, name='batchnorm')."
        )
    fields = cfg.norm if hasattr(cfg, "model") else cfg
    name = cfg.model.norm if name is None else name
    spec = norms.get(name)
    if spec.nnx is None:
        raise ConfigError(
            f"model.norm={name!r} (registered at {spec.origin}) has no NNX layer: its NormSpec "
            "has nnx=None. Give it one, NormSpec(..., nnx=lambda n, num_features, axis, rngs: "
            "layer), or train the linen model."
        )
    axis = dict(axis or {}) if spec.batch_stats else {}
    return lambda num_features, *, rngs: spec.nnx(fields, num_features, axis, rngs)


def kernel_norm_factory(cfg: Any) -> Callable[..., nnx.Module] | None:
    """The NNX factory of a config's kernel normalization (`NormSpec.nnx_kernel`), for a model's
    `kernel_norm`: `factory(initial_kernel, *, rngs)` -> a module called as `module(kernel)`.

    Args:
      cfg: the whole config.

    Returns:
      The factory, or None when `cfg.model.norm` acts on outputs alone.

    Raises:
      bnlab.schema.ConfigError: for a kernel normalization registered without an NNX module.
    """
    name = cfg.model.norm
    spec = norms.get(name)
    if spec.kernel is None:
        return None
    if spec.nnx_kernel is None:
        raise ConfigError(
            f"model.norm={name!r} (registered at {spec.origin}) normalizes kernels but has no NNX "
            "module for them: its NormSpec has nnx_kernel=None. Give it one, NormSpec(..., "
            "nnx_kernel=lambda n, kernel, rngs: module), or train the linen model."
        )
    return lambda kernel, *, rngs: spec.nnx_kernel(cfg.norm, kernel, rngs)


def norm_from_config(
    cfg: Any,
    num_features: int,
    *,
    rngs: nnx.Rngs,
    axis: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> nnx.Module:
    """The NNX layer of a config's normalization (`norm_factory(cfg, ...)(num_features, rngs)`).

    Args:
      cfg, axis, name: as in `norm_factory`.
      num_features: the features of the normalized layer.
      rngs: draws the layer's parameters.

    Returns:
      The layer, e.g. `bnlab.nnx.GroupNorm` for `model.norm="groupnorm"`.

    Raises:
      bnlab.schema.ConfigError, TypeError: as `norm_factory`.
    """
    return norm_factory(cfg, axis=axis, name=name)(num_features, rngs=rngs)
