"""Thin Flax linen wrappers around `bnlab.norm`: they only declare variables and delegate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bnlab import norm
from bnlab.types import Array


class BatchNorm(nn.Module):
    """Batch normalization whose variables match `flax.linen.BatchNorm` exactly.

    Variables: `params/scale`, `params/bias`, `batch_stats/mean`, `batch_stats/var`, so a
    variable dict moves between this module and flax's unchanged. Call it with
    `mutable=["batch_stats"]` when `use_running_average=False` (training). As in flax,
    `use_running_average` may be a field or a call argument (not both). The output has the
    dtype of `x` unless `dtype` is set (flax instead promotes bf16 inputs with float32 params).
    `mask` (per-example weights, 0 for padding) is passed to `bnlab.norm.batch_norm`.
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis: int | Sequence[int] = -1
    axis_name: str | None = None
    axis_index_groups: Any = None
    use_scale: bool = True
    use_bias: bool = True
    convention: norm.Convention = "flax"
    backward: norm.Backward = "analytic"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(
        self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None
    ) -> Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        feature_shape = tuple(x.shape[a] for a in norm.feature_axes_of(self.axis, x.ndim))
        mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)
        scale = (
            self.param("scale", self.scale_init, feature_shape, self.param_dtype)
            if self.use_scale
            else None
        )
        bias = (
            self.param("bias", self.bias_init, feature_shape, self.param_dtype)
            if self.use_bias
            else None
        )
        training = not use_running_average
        initializing = self.is_initializing()
        # As flax: init runs outside pmap/vmap, so it computes local statistics.
        axis_name = None if initializing else self.axis_name
        if training and not initializing and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                f"{self.name or 'BatchNorm'}: training mode (use_running_average=False) updates "
                "the running statistics; call apply(..., mutable=['batch_stats']) and keep the "
                "returned batch_stats, or pass use_running_average=True to evaluate."
            )
        y, new_stats = norm.batch_norm(
            x,
            {"mean": mean.value, "var": var.value},
            scale,
            bias,
            training=training,
            momentum=self.momentum,
            epsilon=self.epsilon,
            axis=self.axis,
            axis_name=axis_name,
            axis_index_groups=self.axis_index_groups,
            convention=self.convention,
            backward=self.backward,
            mask=mask,
        )
        # Like flax: initialization computes the output but leaves the statistics at 0/1.
        if training and not initializing:
            mean.value, var.value = new_stats["mean"], new_stats["var"]
        return y if self.dtype is None else y.astype(self.dtype)


class Identity(nn.Module):
    """The "none" normalization: same call signature as `BatchNorm`, no variables."""

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool) -> Array:
        del use_running_average  # nothing to normalize
        return x
