"""Thin Flax linen wrappers around `bnlab.norm`: they only declare variables and delegate.

The batch-statistics layers share `BatchNorm`'s variables and checks; each variant overrides
only `_normalize` (which pure function it calls) and, if it keeps more running state,
`_extra_stats`. The helpers are `nn.nowrap`, plain methods that flax does not intercept, so
`capture_intermediates` sees `__call__` alone. `LayerNorm` and `GroupNorm` have no state and
take the same call arguments. `WeightNorm` and `WeightStandardization` normalize a kernel, not
an output: a layer calls them on its own kernel (`bnlab.models.dense`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bnlab import ops as norm
from bnlab.types import Array, Stats


class BatchNorm(nn.Module):
    """Batch normalization whose variables match `flax.linen.BatchNorm` exactly.

    Variables: `params/scale`, `params/bias`, `batch_stats/mean`, `batch_stats/var`, so a
    variable dict moves between this module and flax's unchanged. Call it with
    `mutable=["batch_stats"]` when `use_running_average=False` (training). As in flax,
    `use_running_average` may be a field or a call argument (not both). The output has the
    dtype of `x` unless `dtype` is set (flax instead promotes bf16 inputs with float32 params);
    an integer or bool `x` gives float32, as in flax.
    `mask` (per-example weights, 0 for padding) is passed to `bnlab.norm.batch_norm`.
    `use_scale=use_bias=False` is BN without `gamma`, `beta` (`batchnorm_noaffine`).
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
    allow_single_value: bool = False  # training statistics over one value per feature
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
        state = {
            "mean": self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32),
            "var": self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32),
        }
        for key, init in self._extra_stats().items():
            state[key] = self.variable("batch_stats", key, init)
        scale, bias = _affine_params(self, feature_shape)
        training = not use_running_average
        initializing = self.is_initializing()
        # As flax: init runs outside pmap/vmap, so it computes local statistics.
        axis_name = None if initializing else self.axis_name
        if training and not initializing and not self.is_mutable_collection("batch_stats"):
            raise ValueError(
                f"{self.name or type(self).__name__}: training mode (use_running_average=False) "
                "updates the running statistics; call apply(..., mutable=['batch_stats']) and "
                "keep the returned batch_stats, or pass use_running_average=True to evaluate."
            )
        stats = {key: v.value for key, v in state.items()}
        y, new_stats = self._normalize(
            x, stats, scale, bias, training=training, axis_name=axis_name, mask=mask
        )
        # Like flax: initialization computes the output but leaves the statistics at 0/1.
        if training and not initializing:
            for key, v in state.items():
                v.value = new_stats[key]
        return y if self.dtype is None else y.astype(self.dtype)

    @nn.nowrap
    def _extra_stats(self) -> dict[str, Callable[[], Array]]:
        """Running state beyond `mean`/`var` kept in `batch_stats`: name -> initializer."""
        return {}

    @nn.nowrap
    def _normalize(self, x, stats, scale, bias, *, training, axis_name, mask):
        """`(y, new_stats)` of this layer's pure function; the variants override it."""
        return norm.batch_norm(
            x,
            stats,
            scale,
            bias,
            training=training,
            mask=mask,
            allow_single_value=self.allow_single_value,
            **self._bn_args(axis_name),
        )

    @nn.nowrap
    def _bn_args(self, axis_name: str | None) -> dict[str, Any]:
        return {
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "axis": self.axis,
            "axis_name": axis_name,
            "axis_index_groups": self.axis_index_groups,
            "convention": self.convention,
            "backward": self.backward,
        }

    @nn.nowrap
    def _refuse_mask(self, mask: Array | None) -> None:
        if mask is not None:
            raise ValueError(f"{type(self).__name__}: mask is supported by BatchNorm only.")


class GhostBatchNorm(BatchNorm):
    """Ghost BN (`bnlab.norm.ghost_batch_norm`): statistics per `virtual_batch_size` examples.

    Variables as `BatchNorm`. `virtual_batch_size` must divide each call's batch (per device).
    """

    virtual_batch_size: int = 32

    @nn.nowrap
    def _normalize(self, x, stats, scale, bias, *, training, axis_name, mask):
        self._refuse_mask(mask)
        return norm.ghost_batch_norm(
            x,
            stats,
            scale,
            bias,
            training=training,
            virtual_batch_size=self.virtual_batch_size,
            allow_single_value=self.allow_single_value,
            **self._bn_args(axis_name),
        )


class BatchRenorm(BatchNorm):
    """Batch renormalization (`bnlab.norm.batch_renorm`) with Ioffe (2017)'s schedule.

    Variables as `BatchNorm`, plus `batch_stats/steps` (f32[], the training calls so far):
    the layer's own clock for `bnlab.norm.renorm_schedule`, so the bounds relax without the
    caller passing the step. float32 (exact up to 2**24 steps) so that averaging the running
    statistics over devices (`lax.pmean`) keeps its type. The defaults apply `r_max`, `d_max`
    from the first step (no warm-up, no ramps).
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 0
    r_max_steps: int = 0
    d_max_steps: int = 0

    @nn.nowrap
    def _extra_stats(self) -> dict[str, Callable[[], Array]]:
        return {"steps": lambda: jnp.zeros((), jnp.float32)}

    @nn.nowrap
    def _normalize(self, x, stats, scale, bias, *, training, axis_name, mask):
        self._refuse_mask(mask)
        steps = stats["steps"]
        r_max, d_max = norm.renorm_schedule(
            steps,
            r_max=self.r_max,
            d_max=self.d_max,
            warmup_steps=self.warmup_steps,
            r_max_steps=self.r_max_steps,
            d_max_steps=self.d_max_steps,
        )
        y, new_stats = norm.batch_renorm(
            x,
            _mean_var(stats),
            scale,
            bias,
            training=training,
            r_max=r_max,
            d_max=d_max,
            **self._bn_args(axis_name),
        )
        return y, {**new_stats, "steps": steps + 1 if training else steps}


class NoisyBatchNorm(BatchNorm):
    """Santurkar et al. (2018)'s "noisy BN" (`bnlab.norm.noisy_batch_norm`).

    Variables as `BatchNorm`. In training it draws from the `noise` rng stream
    (`apply(..., rngs={"noise": key})`, a new key every step, the same on every device).
    """

    noise_mean: float = 0.5
    noise_std: float = 1.0

    @nn.nowrap
    def _normalize(self, x, stats, scale, bias, *, training, axis_name, mask):
        self._refuse_mask(mask)
        key = None
        if training:
            if not (self.has_rng("noise") or self.is_initializing()):
                raise ValueError(
                    f"{self.name or type(self).__name__}: training adds noise drawn from the "
                    "'noise' rng stream; call apply(..., rngs={'noise': key}) with a new key "
                    "every step (bnlab.training.train.step_rngs derives them from the run's key)."
                )
            key = self.make_rng("noise")
        return norm.noisy_batch_norm(
            x,
            stats,
            scale,
            bias,
            training=training,
            key=key,
            noise_mean=self.noise_mean,
            noise_std=self.noise_std,
            **self._bn_args(axis_name),
        )


class PopulationBatchNorm(BatchNorm):
    """BN normalizing with its running statistics in training too
    (`bnlab.norm.population_batch_norm`); variables as `BatchNorm`. `backward` is unused."""

    @nn.nowrap
    def _normalize(self, x, stats, scale, bias, *, training, axis_name, mask):
        self._refuse_mask(mask)
        args = self._bn_args(axis_name)
        del args["backward"]  # no gradient through batch statistics
        return norm.population_batch_norm(x, stats, scale, bias, training=training, **args)


class BatchNormStopGrad(BatchNorm):
    """BN without gradient through the batch statistics (`bnlab.norm.batch_norm_stopgrad`):
    `BatchNorm`'s values and variables; `backward` is unused."""

    @nn.nowrap
    def _normalize(self, x, stats, scale, bias, *, training, axis_name, mask):
        self._refuse_mask(mask)
        args = self._bn_args(axis_name)
        del args["backward"]  # no gradient through batch statistics
        allow = self.allow_single_value
        return norm.batch_norm_stopgrad(
            x, stats, scale, bias, training=training, allow_single_value=allow, **args
        )


class _ExampleNorm(nn.Module):
    """A normalization of each example on its own: no state, training equals evaluation.

    Variables as flax's `LayerNorm`/`GroupNorm`: `params/scale`, `params/bias`, shape `[C]`
    with `C = x.shape[axis]`. Called like `BatchNorm`, `use_running_average` is ignored.
    """

    epsilon: float = 1e-5
    axis: int = -1
    use_scale: bool = True
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        del use_running_average  # no running statistics: training and evaluation agree
        scale, bias = _affine_params(self, (x.shape[self.axis],))
        y = self._normalize(x, scale, bias)
        return y if self.dtype is None else y.astype(self.dtype)

    @nn.nowrap
    def _normalize(self, x: Array, scale: Array | None, bias: Array | None) -> Array:
        raise NotImplementedError


class LayerNorm(_ExampleNorm):
    """Layer normalization over all non-batch axes (`bnlab.norm.layer_norm`)."""

    @nn.nowrap
    def _normalize(self, x, scale, bias):
        return norm.layer_norm(x, scale, bias, epsilon=self.epsilon, axis=self.axis)


class GroupNorm(_ExampleNorm):
    """Group normalization (`bnlab.norm.group_norm`) with `min(num_groups, C)` groups: a layer
    with fewer channels than `num_groups` normalizes each channel on its own."""

    num_groups: int = 32

    @nn.nowrap
    def _normalize(self, x, scale, bias):
        groups = min(self.num_groups, x.shape[self.axis])
        return norm.group_norm(
            x, scale, bias, num_groups=groups, epsilon=self.epsilon, axis=self.axis
        )


class Identity(nn.Module):
    """The "none" normalization: same call signature as `BatchNorm`, no variables."""

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool) -> Array:
        del use_running_average  # nothing to normalize
        return x


class WeightNorm(nn.Module):
    """Weight normalization of the kernel of the layer it is declared in (Salimans & Kingma
    2016): `w = g * v / ||v||` per output unit (`bnlab.norm.weight_norm`), called as
    `WeightNorm(name=...)(v) -> w`.

    Variable: `params/scale`, `g`, one length per output unit (`[O]`), initialized to the
    initial `||v||`, so that the layer starts as it would without it (`w = v`), as PyTorch's
    `weight_norm` does (flax's `WeightNorm` starts at `g = 1`, `w = v / ||v||`).
    """

    epsilon: float = norm.WEIGHT_NORM_EPSILON

    @nn.compact
    def __call__(self, v: Array) -> Array:
        g = self.param("scale", lambda _: norm.unit_norms(v))
        return norm.weight_norm(v, g, epsilon=self.epsilon)


class WeightStandardization(nn.Module):
    """Weight standardization of the kernel of the layer it is declared in (Qiao et al. 2019):
    each output unit's kernel to zero mean and unit variance over its fan-in
    (`bnlab.norm.weight_standardize`). No variables."""

    epsilon: float = 1e-8

    def __call__(self, w: Array) -> Array:
        return norm.weight_standardize(w, epsilon=self.epsilon)


def _affine_params(module: nn.Module, feature_shape: tuple[int, ...]):
    """`(scale, bias)` declared in `module` as flax names them, `None` where switched off."""
    scale = (
        module.param("scale", module.scale_init, feature_shape, module.param_dtype)
        if module.use_scale
        else None
    )
    bias = (
        module.param("bias", module.bias_init, feature_shape, module.param_dtype)
        if module.use_bias
        else None
    )
    return scale, bias


def _mean_var(stats: Stats) -> Stats:
    return {"mean": stats["mean"], "var": stats["var"]}
