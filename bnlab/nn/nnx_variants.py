"""The NNX variants of BN (ghost, renorm, noisy, population, stop-gradient), the per-example
normalizations (LayerNorm, GroupNorm), `Identity`, and the kernel normalizations (WeightNorm,
WeightStandardization), each over its `bnlab.ops` function."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from bnlab import ops as norm
from bnlab.nn.nnx_bn import (
    BatchNorm,
    Initializer,
    RngsLike,
    _affine,
    _check_num_features,
    _refuse_mask,
    _value,
    noise_key,
)
from bnlab.types import Array


class GhostBatchNorm(BatchNorm):
    """Ghost BN (`bnlab.norm.ghost_batch_norm`, Hoffer et al. 2017): statistics per
    `virtual_batch_size` consecutive examples, which must divide each call's batch (per
    device). Arguments, variables and call as `BatchNorm` (no `mask`), plus:

    Args:
      virtual_batch_size: examples per virtual batch.
    """

    def __init__(
        self, num_features: int | Sequence[int], *, virtual_batch_size: int = 32, **kwargs: Any
    ):
        super().__init__(num_features, **kwargs)
        self.virtual_batch_size = virtual_batch_size

    def _normalize(self, x, stats, scale, bias, *, training, mask, rngs):
        del rngs  # deterministic
        _refuse_mask(self, mask)
        size, args = self.virtual_batch_size, self._bn_args(training)
        allow = self.allow_single_value
        return norm.ghost_batch_norm(
            x, stats, scale, bias, virtual_batch_size=size, allow_single_value=allow, **args
        )


class BatchRenorm(BatchNorm):
    """Batch renormalization (`bnlab.norm.batch_renorm`, Ioffe 2017) with its relaxation
    schedule (`bnlab.norm.renorm_schedule`) counted by the layer itself.

    Arguments and call as `BatchNorm` (no `mask`); variables as `BatchNorm` plus `steps`
    (`nnx.BatchStat`, f32[], the training calls so far, as linen's `batch_stats/steps`). The
    defaults apply `r_max`, `d_max` from the first step (no warm-up, no ramps).

    Args:
      r_max: final bound of `r`, >= 1.
      d_max: final bound of `|d|`, >= 0.
      warmup_steps: steps of plain BN (`r_max=1`, `d_max=0`) first.
      r_max_steps: steps of the linear ramp of `r_max` after the warm-up.
      d_max_steps: steps of the linear ramp of `d_max` after the warm-up.
    """

    STATS = ("mean", "var", "steps")
    SCHEDULE = ("r_max", "d_max", "warmup_steps", "r_max_steps", "d_max_steps")  # its attributes

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        r_max_steps: int = 0,
        d_max_steps: int = 0,
        **kwargs: Any,
    ):
        super().__init__(num_features, **kwargs)
        self.steps = nnx.BatchStat(jnp.zeros((), jnp.float32))
        self.r_max = r_max
        self.d_max = d_max
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps

    def _normalize(self, x, stats, scale, bias, *, training, mask, rngs):
        del rngs  # deterministic
        _refuse_mask(self, mask)
        steps = stats["steps"]
        r_max, d_max = norm.renorm_schedule(steps, **{k: getattr(self, k) for k in self.SCHEDULE})
        mean_var, args = {"mean": stats["mean"], "var": stats["var"]}, self._bn_args(training)
        y, new_stats = norm.batch_renorm(x, mean_var, scale, bias, r_max=r_max, d_max=d_max, **args)
        return y, {**new_stats, "steps": steps + 1 if training else steps}


class NoisyBatchNorm(BatchNorm):
    """Santurkar et al. (2018)'s "noisy BN" (`bnlab.norm.noisy_batch_norm`): BN, then noise of
    random per-feature mean and variance, drawn anew every training step.

    Arguments, variables and call as `BatchNorm` (no `mask`). In training the call needs the
    step's noise as `rngs`: an `nnx.Rngs` (its `noise` stream is drawn, as `nnx.Dropout` draws
    `dropout`), an `nnx.RngStream`, or the key itself. The same key on every device; a new one
    every step. A pure training step passes the key it derives for the step, e.g.
    `model(x, rngs=bnlab.training.train.step_rngs(key, step)["noise"])`; an `nnx.jit` step may
    pass an `nnx.Rngs(noise=seed)` kept across steps, whose stream advances at each draw. The layer
    uses the key it is given: the linen layer at module path `p` of a model applied with
    `rngs={"noise": key}` uses `linen_rng(key, *p)`, which `bnlab.nn.nnx_models` pass their
    layers, so an NNX model and its linen twin draw the same noise from the same key.

    Args:
      noise_mean: bound of the per-feature noise means, >= 0.
      noise_std: bound of the per-feature noise standard deviations, >= 0.
    """

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        noise_mean: float = 0.5,
        noise_std: float = 1.0,
        **kwargs: Any,
    ):
        super().__init__(num_features, **kwargs)
        self.noise_mean = noise_mean
        self.noise_std = noise_std

    def _normalize(self, x, stats, scale, bias, *, training, mask, rngs):
        _refuse_mask(self, mask)
        key = noise_key(rngs) if training else None
        if training and key is None:
            raise ValueError(
                f"{type(self).__name__}: training adds noise drawn anew every step; pass the "
                "step's key: layer(x, rngs=key) or rngs=nnx.Rngs(noise=key) (a model built by "
                "bnlab.nn.nnx_models passes its call's rngs on), or evaluate (model.eval())."
            )
        noise = {"key": key, "noise_mean": self.noise_mean, "noise_std": self.noise_std}
        return norm.noisy_batch_norm(x, stats, scale, bias, **noise, **self._bn_args(training))


class PopulationBatchNorm(BatchNorm):
    """BN normalizing with its running statistics in training too
    (`bnlab.norm.population_batch_norm`, Ghorbani et al. 2019). Arguments, variables and call
    as `BatchNorm` (no `mask`); `backward` is unused (no gradient through batch statistics)."""

    def _normalize(self, x, stats, scale, bias, *, training, mask, rngs):
        del rngs  # deterministic
        _refuse_mask(self, mask)
        args = self._bn_args(training)
        del args["backward"]  # no gradient through batch statistics
        return norm.population_batch_norm(x, stats, scale, bias, **args)


class BatchNormStopGrad(BatchNorm):
    """BN without gradient through the batch statistics (`bnlab.norm.batch_norm_stopgrad`).
    Arguments, variables and call as `BatchNorm` (no `mask`); `backward` is unused."""

    def _normalize(self, x, stats, scale, bias, *, training, mask, rngs):
        del rngs  # deterministic
        _refuse_mask(self, mask)
        args, allow = self._bn_args(training), self.allow_single_value
        del args["backward"]  # no gradient through batch statistics
        return norm.batch_norm_stopgrad(x, stats, scale, bias, allow_single_value=allow, **args)


class _ExampleNorm(nnx.Module):
    """A normalization of each example on its own: no running state, training equals
    evaluation; `scale`/`bias` as flax's `nnx.LayerNorm`/`nnx.GroupNorm` declare them."""

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        use_fast_variance: bool = True,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] | None = None,
        scale_metadata: Mapping[str, Any] | None = None,
    ):
        _check_num_features(type(self).__name__, num_features)
        shape = (num_features,)
        # Scale first, then bias: the order in which flax draws their keys.
        self.scale = _affine(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _affine(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.param_dtype, self.use_scale, self.use_bias = param_dtype, use_scale, use_bias
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.use_fast_variance = use_fast_variance

    def __call__(self, x: Array, *, mask: Array | None = None, rngs: RngsLike = None) -> Array:
        """Normalizes `x` (its shape `[B, ..., num_features]`).

        Args:
          x: the input, any float dtype (an integer or bool one gives float32, as in flax).
          mask: not supported (an error when given); flax's layers take it.
          rngs: ignored (no randomness), so that a model can pass it to any normalization.

        Returns:
          The normalized `x`, in `dtype` if set, else in the dtype of `x`.
        """
        del rngs  # deterministic
        _refuse_mask(self, mask)
        y = self._normalize(x, _value(self.scale), _value(self.bias))
        return y if self.dtype is None else y.astype(self.dtype)

    def _normalize(self, x: Array, scale: Array | None, bias: Array | None) -> Array:
        raise NotImplementedError


class LayerNorm(_ExampleNorm):
    """Layer normalization (`bnlab.norm.layer_norm`, Ba et al. 2016) over all non-batch axes of
    each example, with `scale`/`bias` on `feature_axes`::

        y[i, ..., c] = (x[i, ..., c] - mu[i]) / sqrt(var[i] + epsilon) * scale[c] + bias[c]

    Built, called and holding variables as `flax.nnx.LayerNorm` (`scale`, `bias`: `nnx.Param`
    `[num_features]`), and equal to it with `reduction_axes=(1, ..., ndim - 1)` and
    `use_fast_variance=False`. The statistics always span the non-batch axes, so flax's
    `reduction_axes` is not taken; `epsilon` defaults to bnlab's (and PyTorch's) 1e-5, not
    flax's 1e-6; `use_fast_variance` is accepted and ignored (see `BatchNorm`).

    Args:
      num_features: the size of the feature axis.
      epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
        use_fast_variance, rngs, bias_metadata, scale_metadata: as in `BatchNorm`.
      feature_axes: the axis of `scale` and `bias` (one axis, not 0).

    Raises:
      ValueError: (when called) as `bnlab.norm.layer_norm`, or with a `mask`.
    """

    def __init__(self, num_features: int, *, feature_axes: int = -1, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        self.feature_axes = feature_axes

    def _normalize(self, x, scale, bias):
        return norm.layer_norm(x, scale, bias, epsilon=self.epsilon, axis=self.feature_axes)


class GroupNorm(_ExampleNorm):
    """Group normalization (`bnlab.norm.group_norm`, Wu & He 2018): each example's channels
    (the last axis) in groups of consecutive channels, normalized over the group and every
    other non-batch axis::

        y[i, ..., c] = (x[i, ..., c] - mu[i, g(c)]) / sqrt(var[i, g(c)] + epsilon)
                       * scale[c] + bias[c]

    Built, called and holding variables as `flax.nnx.GroupNorm` (`num_groups` or
    `group_size`; `scale`, `bias`: `nnx.Param` `[num_features]`), and equal to it with
    `use_fast_variance=False`. As `bnlab.layers.GroupNorm`, a layer with fewer channels than
    `num_groups` uses one group per channel (flax refuses it); `epsilon` defaults to 1e-5.

    Args:
      num_features: the number of channels.
      num_groups: the number of groups (None when `group_size` is given).
      group_size: the channels per group, instead of `num_groups`.
      epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init,
        use_fast_variance, rngs, bias_metadata, scale_metadata: as in `BatchNorm`.

    Raises:
      ValueError: unless exactly one of `num_groups`, `group_size` is given, or if the groups
        do not divide `num_features`.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int | None = 32,
        group_size: int | None = None,
        **kwargs: Any,
    ):
        _check_num_features("GroupNorm", num_features)
        if (num_groups is None) == (group_size is None):
            raise ValueError(
                "GroupNorm: give num_groups or group_size, not both (GroupNorm(C, None, "
                "group_size=...) sets the size)."
            )
        if group_size is not None:
            num_groups = num_features // group_size if 0 < group_size <= num_features else 0
        else:
            num_groups = min(num_groups, num_features)
        if num_groups <= 0 or num_features % num_groups:
            raise ValueError(
                f"GroupNorm: the groups do not divide the {num_features} channels "
                f"(num_groups={num_groups}, group_size={group_size}); choose a divisor of "
                f"{num_features}."
            )
        super().__init__(num_features, **kwargs)
        self.num_groups = num_groups
        self.group_size = num_features // num_groups

    def _normalize(self, x, scale, bias):
        return norm.group_norm(x, scale, bias, num_groups=self.num_groups, epsilon=self.epsilon)


class Identity(nnx.Module):
    """The "none" normalization: no variables, called like the others. The constructor takes
    (and ignores) a normalization's arguments, so the class itself is a model's `norm`."""

    def __init__(self, num_features: Any = None, *, rngs: nnx.Rngs | None = None):
        del num_features, rngs  # nothing to declare

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Any = None,
        rngs: RngsLike = None,
    ) -> Array:
        del use_running_average, mask, rngs  # nothing to normalize
        return x


class WeightNorm(nnx.Module):
    """Weight normalization of a kernel (Salimans & Kingma 2016), `bnlab.layers.WeightNorm` in
    NNX: `WeightNorm(initial_v, rngs=...)`, then `layer(v) -> g * v / ||v||` per output unit.

    Variable: Param `scale`, `g` (`[O]`), initialized to `||initial_v||`, so that the layer
    starts as it would without it, as the linen layer does.
    """

    def __init__(
        self,
        kernel: Array,
        *,
        epsilon: float = norm.WEIGHT_NORM_EPSILON,
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # `g` is drawn from no stream: it is the initial kernel's norm
        self.scale = nnx.Param(norm.unit_norms(kernel))
        self.epsilon = epsilon

    def __call__(self, v: Array) -> Array:
        return norm.weight_norm(v, self.scale[...], epsilon=self.epsilon)


class WeightStandardization(nnx.Module):
    """Weight standardization of a kernel (Qiao et al. 2019), `bnlab.layers.WeightStandardization`
    in NNX: no variables; the constructor takes (and ignores) the initial kernel."""

    def __init__(self, kernel: Any = None, *, epsilon: float = 1e-8, rngs: nnx.Rngs | None = None):
        del kernel, rngs  # nothing to declare
        self.epsilon = epsilon

    def __call__(self, w: Array) -> Array:
        return norm.weight_standardize(w, epsilon=self.epsilon)
