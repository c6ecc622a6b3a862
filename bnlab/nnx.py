"""Flax NNX layers over bnlab's pure normalizations, one per registered normalization.

Each layer is built and called as flax's NNX layers are (`num_features`, keyword options,
`rngs`), holds the variables of its linen twin in `bnlab.layers` (`nnx.Param` scale/bias,
`nnx.BatchStat` running statistics), and computes with the same function of `bnlab.norm`.
`norm_from_config` builds the layer that a config's `model.norm` names, through the registry
(`NormSpec.nnx`). `to_linen`/`from_linen` (from `bnlab.nnx_state`) move a model's variables to
and from linen's dict. Import it as `bnlab.nnx`; `import bnlab` does not import NNX.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import errors, nnx
from flax.core import scope as linen_scope

from bnlab import norm, norms
from bnlab.nnx_state import (
    LinenVariables,
    dicts_to_states,
    from_linen,
    states_to_dicts,
    to_linen,
)
from bnlab.schema import ConfigError
from bnlab.types import Array, Stats

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "Identity",
    "LayerNorm",
    "LinenVariables",
    "NoisyBatchNorm",
    "PopulationBatchNorm",
    "dicts_to_states",
    "from_linen",
    "linen_rng",
    "noise_key",
    "norm_factory",
    "norm_from_config",
    "states_to_dicts",
    "to_linen",
]

Initializer = Callable[..., Array]  # (key, shape, dtype) -> array, as flax's initializers
# What a layer with randomness takes as `rngs`: an nnx.Rngs (its `noise` stream is drawn), one
# stream, or the key itself.
RngsLike = nnx.Rngs | nnx.RngStream | Array | None


class BatchNorm(nnx.Module):
    """Batch normalization with the constructor, call, variables and switches of
    `flax.nnx.BatchNorm`, computed by `bnlab.norm.batch_norm`.

    In training (`use_running_average=False`) the layer normalizes with the batch's statistics
    (over every axis but `axis`, and over the devices of `axis_name`) and updates its running
    statistics in place (Ioffe & Szegedy 2015, Alg. 1)::

        mu = mean(x)    var = mean((x - mu)**2)    y = (x - mu) / sqrt(var + epsilon) * scale + bias
        mean <- momentum * mean + (1 - momentum) * mu
        var  <- momentum * var  + (1 - momentum) * var_b

    with `var_b = var`, or `var * n / (n - 1)` for `convention="torch"`. In evaluation it
    normalizes with `mean`/`var` and changes nothing. Statistics are float32; the output has
    the dtype of `x` unless `dtype` is set (flax instead promotes bf16 inputs with float32
    parameters). The gradient is the closed form of the paper's Section 3 unless
    `backward="autodiff"`.

    Variables, as in flax (same names, shapes, dtypes, types), so `nnx.state` moves between the
    two unchanged: `scale`, `bias` (`nnx.Param`, absent when `use_scale`/`use_bias` is off) and
    `mean`, `var` (`nnx.BatchStat`, float32, initially 0 and 1).

    Training and evaluation switch as for flax's layer: the `use_running_average` attribute
    (set by the constructor, `model.train()`/`model.eval()`, or `nnx.view(model,
    use_running_average=...)` through `set_view`), overridden by the call's argument.

    The variants below subclass it: they override `_normalize` (which pure function) and, with
    more running state, `STATS` (the names of their `nnx.BatchStat`s).

    Args:
      num_features: the size of the feature axis (a tuple with several feature axes).
      use_running_average: evaluate with the running statistics if True; train if False.
      axis: the feature axis (or axes); statistics are computed over all the others.
      momentum: weight of the old statistics in the moving average (flax convention).
      epsilon: added to the variance; a Python number > 0.
      dtype: the output dtype (default: the dtype of `x`).
      param_dtype: dtype of `scale` and `bias`.
      use_bias: add the learned `bias` (beta).
      use_scale: multiply by the learned `scale` (gamma).
      bias_init: initializer of `bias`.
      scale_init: initializer of `scale`.
      axis_name: a named axis (`shard_map`, `pmap`, `vmap`) to compute statistics across.
      axis_index_groups: groups of indices along `axis_name` that share statistics.
      use_fast_variance: accepted for flax compatibility and ignored: bnlab always computes the
        variance in one pass over shifted data, which is as exact as flax's two-pass variance.
      convention: "flax" (biased running variance) or "torch" (unbiased, as PyTorch stores).
      backward: "analytic" (closed-form custom VJP) or "autodiff".
      allow_single_value: allow training statistics over one value per feature (refused by
        default, as PyTorch refuses it).
      rngs: the `nnx.Rngs` that `scale_init`/`bias_init` draw from (stream `params`).
      bias_metadata: metadata of the `bias` Param (e.g. a sharding).
      scale_metadata: metadata of the `scale` Param.

    Raises:
      ValueError: (when called) without a `use_running_average` anywhere, on an input whose
        feature shape differs from `num_features`, or on an unknown `convention`/`backward`.
      flax.errors.TraceContextError: when training inside a transform that captured the model
        in a closure instead of taking it as an argument (the message says how to fix it).
    """

    STATS: tuple[str, ...] = ("mean", "var")  # its nnx.BatchStats, in the call's `stats`

    def __init__(
        self,
        num_features: int | Sequence[int],
        *,
        use_running_average: bool | None = False,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = nnx.initializers.zeros,
        scale_init: Initializer = nnx.initializers.ones,
        axis_name: str | None = None,
        axis_index_groups: Sequence[Sequence[int]] | None = None,
        use_fast_variance: bool = True,
        convention: norm.Convention = "flax",
        backward: norm.Backward = "analytic",
        allow_single_value: bool = False,
        rngs: nnx.Rngs,
        bias_metadata: Mapping[str, Any] | None = None,
        scale_metadata: Mapping[str, Any] | None = None,
    ):
        stats = norm.init_stats(num_features)
        self.mean = nnx.BatchStat(stats["mean"])
        self.var = nnx.BatchStat(stats["var"])
        shape = stats["mean"].shape
        # Scale first, then bias: the order in which flax draws their keys.
        self.scale = _affine(use_scale, scale_init, shape, param_dtype, rngs, scale_metadata)
        self.bias = _affine(use_bias, bias_init, shape, param_dtype, rngs, bias_metadata)
        self.param_dtype, self.use_scale, self.use_bias = param_dtype, use_scale, use_bias
        self.num_features = num_features if isinstance(num_features, int) else shape
        self.use_running_average = use_running_average
        self.axis = axis if isinstance(axis, int) else tuple(axis)
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name
        self.axis_index_groups = _frozen(axis_index_groups)
        self.use_fast_variance = use_fast_variance
        self.convention = convention
        self.backward = backward
        self.allow_single_value = allow_single_value

    def __call__(
        self,
        x: Array,
        use_running_average: bool | None = None,
        *,
        mask: Array | None = None,
        rngs: RngsLike = None,
    ) -> Array:
        """Normalizes `x`; in training also updates the running statistics in place.

        Args:
          x: the input, any float dtype, with `num_features` on `axis`.
          use_running_average: overrides the attribute of that name for this call.
          mask: per-example weights (`f32[B]` or bool, 0 for padding) or an array broadcastable
            to `x` that is 1 on the feature axes; only the statistics use it (`BatchNorm` only).
          rngs: the noise of `NoisyBatchNorm`; the other layers ignore it, so that a model can
            pass it to whichever normalization it holds.

        Returns:
          The normalized `x`, in `dtype` if set, else in the dtype of `x`.
        """
        training = not _first_set(self, use_running_average, self.use_running_average)
        stats = {name: getattr(self, name)[...] for name in self.STATS}
        scale, bias = _value(self.scale), _value(self.bias)
        y, new_stats = self._normalize(
            x, stats, scale, bias, training=training, mask=mask, rngs=rngs
        )
        if training:
            _write_stats(self, new_stats)
        return y if self.dtype is None else y.astype(self.dtype)

    def _normalize(self, x, stats, scale, bias, *, training, mask, rngs):
        """`(y, new_stats)` of this layer's pure function; the variants override it."""
        del rngs  # deterministic
        allow = self.allow_single_value
        args = self._bn_args(training)
        return norm.batch_norm(x, stats, scale, bias, mask=mask, allow_single_value=allow, **args)

    def _bn_args(self, training: bool) -> dict[str, Any]:
        """The keyword arguments that every batch-statistics function of `bnlab.norm` takes."""
        return {
            "training": training,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "axis": self.axis,
            "axis_name": self.axis_name,
            "axis_index_groups": self.axis_index_groups,
            "convention": self.convention,
            "backward": self.backward,
        }

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Sets the mode for `nnx.view(model, use_running_average=...)`.

        Args:
          use_running_average: True evaluates with the running statistics, False trains; None
            leaves the mode as it is.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


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
        return norm.ghost_batch_norm(x, stats, scale, bias, virtual_batch_size=size, **args)


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
    `model(x, rngs=bnlab.train.step_rngs(key, step)["noise"])`; an `nnx.jit` step may pass an
    `nnx.Rngs(noise=seed)` kept across steps, whose stream advances at each draw. The layer
    uses the key it is given: the linen layer at module path `p` of a model applied with
    `rngs={"noise": key}` uses `linen_rng(key, *p)`, which `bnlab.nnx_models` pass their
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
                "bnlab.nnx_models passes its call's rngs on), or evaluate (model.eval())."
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
          x: the input, any float dtype.
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


def noise_key(rngs: RngsLike, stream: str = "noise") -> Array | None:
    """The key that `rngs` gives a layer with randomness (None stays None).

    Args:
      rngs: an `nnx.Rngs` (its stream `stream` is drawn, which advances it), an
        `nnx.RngStream` (drawn), or a key (returned as it is).
      stream: the stream of an `nnx.Rngs` to draw.

    Returns:
      A key, or None.
    """
    if isinstance(rngs, nnx.Rngs):
        return rngs[stream]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    return rngs


def linen_rng(key: Array, *path: str) -> Array:
    """The key that linen's `make_rng` returns at its first call in the module at `path`
    (e.g. `"block0", "norm"`) of a model applied with `rngs={stream: key}`.

    linen folds the module path and a per-module call count into the stream's key; an NNX
    model that passes each layer this key draws what its linen twin draws.

    Args:
      key: the key given to linen's `apply` for the stream.
      *path: the names of the modules from the root to the one that draws.

    Returns:
      The derived key.
    """
    return linen_scope.LazyRng.create(key, *path, 1).as_jax_rng()


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


def _affine(use, init, shape, param_dtype, rngs, metadata):
    """A learned scale or bias as flax's normalization layers declare it (None when off)."""
    if not use:
        return nnx.data(None)
    return nnx.Param(init(rngs.params(), shape, param_dtype), **dict(metadata or {}))


def _value(param):
    return None if param is None else param[...]


def _frozen(groups):
    # Hashable, so that the layer's static attributes can key compilation caches.
    return None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)


def _refuse_mask(layer, mask) -> None:
    if mask is not None:
        raise ValueError(
            f"{type(layer).__name__}: mask is supported by BatchNorm only (bnlab.norm.batch_norm)."
        )


def _first_set(layer, call_value: bool | None, attribute: bool | None) -> bool:
    if call_value is not None:
        return call_value
    if attribute is not None:
        return attribute
    name = type(layer).__name__
    raise ValueError(
        f"{name}: use_running_average is not set. Pass it to the constructor "
        f"({name}(..., use_running_average=False)), to the call (layer(x, "
        "use_running_average=True)), or set it on the whole model with model.train() / "
        "model.eval() or nnx.view(model, use_running_average=...)."
    )


def _write_stats(layer, new_stats: Stats) -> None:
    """Stores the updated running state in the layer's `BatchStat`s."""
    try:
        for name, value in new_stats.items():
            # State, not a function of the loss: no gradient may reach it (flax does the same
            # when variables are mutable array references).
            getattr(layer, name)[...] = jax.lax.stop_gradient(value)
    except errors.TraceContextError as err:
        raise errors.TraceContextError(
            f"{type(layer).__name__}: training updates the running statistics, but this model "
            "was captured by a transform (a closure such as jax.jit(lambda x: model(x)), or the "
            "model itself passed as the function: nnx.jit(model), nnx.eval_shape(model, x)). "
            "Pass the model as an argument instead (nnx.jit(lambda m, x: m(x))(model, x)), "
            "split it with nnx.split and return nnx.state(model) from a jax transform, or "
            "evaluate (model.eval())."
        ) from err
