"""Batch normalization as a pure function, and the math its variants share.

`batch_norm` follows Ioffe & Szegedy (2015), Algorithm 1 and Section 3: one-pass shifted
moments in float32, the closed-form backward as a `jax.custom_vjp` (or autodiff), statistics
across devices through `axis_name`, padding through `mask`. The private helpers below it
(layout, moments, the training-mode forward and backward, the collectives, the argument
checks) serve `bnlab.ops.bn_variants` and `bnlab.ops.example_norms` too; the training-mode math
is in `bnlab.ops.bn_math`. Import the public names from `bnlab.ops` (or `bnlab.norm`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnlab.ops.bn_math import (
    _affine,
    _count,
    _float_input,
    _train,
    _weights,
    _without_padding,
    check_values_per_feature,
)
from bnlab.types import Array, Stats

Convention = Literal["flax", "torch"]
Backward = Literal["analytic", "autodiff"]
CONVENTIONS: tuple[str, ...] = ("flax", "torch")
BACKWARDS: tuple[str, ...] = ("analytic", "autodiff")
AxisGroups = tuple[tuple[int, ...], ...] | None


def batch_norm(
    x: Array,
    stats: Stats,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    momentum: float | Array = 0.99,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    convention: Convention = "flax",
    backward: Backward = "analytic",
    mask: Array | None = None,
    allow_single_value: bool = False,
) -> tuple[Array, Stats]:
    """Batch-normalizes `x` and returns `(y, new_stats)`.

    Training mode (Ioffe & Szegedy 2015, Alg. 1), with reductions over every axis but `axis`
    (and over the devices of `axis_name` when given)::

        mu = mean(x)          var = mean((x - mu)**2)         # float32
        y = (x - mu) / sqrt(var + epsilon) * scale + bias
        new_mean = momentum * mean_old + (1 - momentum) * mu
        new_var  = momentum * var_old  + (1 - momentum) * var_b

    where `var_b = var` for `convention="flax"` and `var_b = var * n / (n - 1)` (the unbiased
    estimate PyTorch stores) for `convention="torch"`; `n` is the number of reduced elements
    per feature over all devices. With `mask`, every mean above is weighted by it (`n` is the
    total weight): padding rows with weight 0 leave the statistics of the real examples exact,
    whatever their number on each device, and whatever their values: padding (weight 0) is
    replaced by a real example's values before anything is computed, so NaN or infinite
    padding reaches neither the statistics nor any gradient (its rows' outputs are then those
    of that example; their gradient is zero). `momentum` is always the weight of the old
    statistics, as in flax: PyTorch's `momentum=0.1` is `torch_momentum(0.1) == 0.9` here.

    As PyTorch does, training refuses a batch that has one value per feature (a batch of one
    example in a dense layer, on one device): its variance is 0, `y` would be `bias` whatever
    `x`, and the running variance would move toward 0. `allow_single_value=True` allows it.

    Evaluation mode normalizes with `stats` and returns `stats` itself, unchanged.

    The statistics are computed in float32 whatever the dtype of `x`; `y` has the dtype of `x`,
    except that an integer or bool `x` gives a float32 `y`, as in flax.
    With `backward="analytic"` (default) the gradient is the closed form of Section 3 of the
    paper, as a `jax.custom_vjp`; `backward="autodiff"` differentiates the forward pass instead.

    Args:
      x: input, any float dtype (an integer or bool one is promoted to float32).
      stats: `{"mean": f32[F], "var": f32[F]}` with `F` the shape of `x` on `axis`.
      scale: optional `gamma`, shape `F`; `None` means 1.
      bias: optional `beta`, shape `F`; `None` means 0.
      training: normalize with the batch's statistics and update `stats` if True.
      momentum: weight of the old statistics in the moving average, in [0, 1].
      epsilon: added to the variance before the square root; a Python number > 0 (static).
      axis: feature axis or axes (kept); every other axis is reduced.
      axis_name: named axis (pmap, vmap, shard_map) to compute statistics across devices.
      axis_index_groups: optional groups of device indices that share statistics.
      convention: "flax" (biased running variance) or "torch" (unbiased running variance).
      backward: "analytic" (custom VJP) or "autodiff".
      mask: optional per-example weights along axis 0 (`f32[B]` or bool, 0 for padding) or an
        array broadcastable to `x` that is 1 on the feature axes; ignored in evaluation. Its
        gradient is zero.
      allow_single_value: allow training statistics over one value per feature.

    Returns:
      `(y, new_stats)`: `y` like `x`; `new_stats` like `stats`.

    Raises:
      ValueError: on an axis out of range, stats or affine parameters of the wrong shape, an
        unknown `convention`/`backward`, or one value per feature in training.
      NameError: if `axis_name` is not bound by an enclosing transform.
    """
    x = _float_input(x)
    lay = _layout(x, stats, scale, bias, axis, momentum, epsilon, convention, backward)
    if not training:
        return _normalize_with(x, stats, lay, epsilon), stats
    groups = _freeze_groups(axis_index_groups)
    w = None if mask is None else _weights(mask, x.shape, lay.bshape)
    if w is None and axis_name is None and not allow_single_value:
        check_values_per_feature(x.shape, lay.reduce_axes)
    if w is not None:
        x = _without_padding(x, w)
    axes = (lay.reduce_axes, axis_name, groups)
    y, mean, var = _train(x, lay.scale, lay.bias, w, None, epsilon, *axes, backward)
    return y, _batch_update(stats, x, w, mean, var, momentum, convention, axes)


def moving_average(old: Array, batch: Array, momentum: float | Array) -> Array:
    """`momentum * old + (1 - momentum) * batch`, in the dtype of `old`."""
    return (momentum * old + (1 - momentum) * batch).astype(old.dtype)


def torch_momentum(momentum: float) -> float:
    """Converts PyTorch's BN momentum (weight of the new batch) to bnlab's (weight of the old)."""
    return 1.0 - momentum


def stats_from_torch(running_mean, running_var) -> Stats:
    """Statistics of a `torch.nn.BatchNorm*` (as arrays) in bnlab's layout.

    Both conventions normalize with the stored variance at evaluation, so the values carry over
    unchanged; keep training them with `convention="torch"` to stay on PyTorch's estimator.
    """
    return {
        "mean": jnp.asarray(running_mean, jnp.float32),
        "var": jnp.asarray(running_var, jnp.float32),
    }


def init_stats(feature_shape: int | Sequence[int], dtype=jnp.float32) -> Stats:
    """Initial statistics: mean 0, variance 1 (as flax and PyTorch).

    Raises:
      ValueError: a feature size that is not a positive int (no features hold no statistics).
    """
    shape = tuple(feature_shape) if isinstance(feature_shape, Iterable) else (feature_shape,)
    if not shape or not all(isinstance(n, Integral) and not isinstance(n, bool) for n in shape):
        raise ValueError(
            f"init_stats: feature_shape={feature_shape!r} must be a positive int (the number of "
            "features) or a tuple of them."
        )
    if min(shape) < 1:
        raise ValueError(
            f"init_stats: feature_shape={feature_shape!r} has no features; every size must be >= 1."
        )
    return {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}


def _params_or_identity(scale, bias, shape):
    """`scale`, `bias` reshaped to `shape`; 1 and 0 where None."""
    scale = jnp.ones(shape, jnp.float32) if scale is None else jnp.reshape(scale, shape)
    return scale, jnp.zeros(shape, jnp.float32) if bias is None else jnp.reshape(bias, shape)


class _Layout(NamedTuple):
    """Where `x`'s features are, and the affine parameters broadcast to them."""

    feature_shape: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    bshape: tuple[int, ...]  # the shape of x with 1 on every reduced axis
    scale: Array
    bias: Array


def _layout(x, stats, scale, bias, axis, momentum, epsilon, convention, backward) -> _Layout:
    feature_axes = feature_axes_of(axis, x.ndim)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    _check_args(stats, scale, bias, feature_shape, momentum, epsilon, convention, backward)
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    scale, bias = _params_or_identity(scale, bias, bshape)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    return _Layout(feature_shape, reduce_axes, bshape, scale, bias)


def _normalize_with(x, stats, lay: _Layout, epsilon):
    """`x` normalized with given statistics (evaluation mode)."""
    mean = jnp.reshape(stats["mean"], lay.bshape)
    var = jnp.reshape(stats["var"], lay.bshape)
    return _affine(x, mean, lax.rsqrt(var + float(epsilon)), lay.scale, lay.bias)


def _stored_var(var, convention, count):
    """The batch variance as the running statistics store it: unbiased for PyTorch's, with
    `count()` the number of reduced elements (only then computed: a collective with a mask)."""
    if convention != "torch":
        return var
    n = count()
    return var * (n / jnp.maximum(n - 1, 1))


def _batch_update(stats, x, w, mean, var, momentum, convention, axes) -> Stats:
    """The running statistics moved by the batch's, `axes = (reduce_axes, axis_name, groups)`."""
    var = _stored_var(var, convention, lambda: _count(x, w, *axes))
    return _updated(stats, mean, var, momentum)


def _updated(stats, mean, var, momentum) -> Stats:
    shape = jnp.shape(stats["mean"])
    return {
        "mean": moving_average(stats["mean"], jnp.reshape(mean, shape), momentum),
        "var": moving_average(stats["var"], jnp.reshape(var, shape), momentum),
    }


def feature_axes_of(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """The sorted, non-negative feature axes that `axis` names; raises on a bad axis."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"batch_norm: axis {a} is out of range for an input of rank {ndim}.")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"batch_norm: axis {axis} names the same axis twice.")
    if len(out) == ndim:
        raise ValueError(f"batch_norm: axis {axis} leaves no axis to compute statistics over.")
    return tuple(sorted(out))


def _freeze_groups(groups) -> AxisGroups:
    if groups is None:
        return None
    frozen = tuple(tuple(int(i) for i in g) for g in groups)
    if len({len(g) for g in frozen}) != 1:
        raise ValueError(f"batch_norm: axis_index_groups must have equal sizes, got {groups}.")
    return frozen


def _check_args(stats, scale, bias, feature_shape, momentum, epsilon, convention, backward):
    if convention not in CONVENTIONS:
        raise ValueError(
            f"batch_norm: unknown convention {convention!r}; use one of {CONVENTIONS}."
        )
    if backward not in BACKWARDS:
        raise ValueError(f"batch_norm: unknown backward {backward!r}; use one of {BACKWARDS}.")
    if not isinstance(momentum, jax.core.Tracer) and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"batch_norm: momentum={momentum} must lie in [0, 1] (flax convention).")
    if isinstance(epsilon, jax.core.Tracer):
        raise TypeError("batch_norm: epsilon must be a Python number, not a traced array.")
    if not float(epsilon) > 0:
        raise ValueError(f"batch_norm: epsilon={epsilon} must be > 0.")
    for key in ("mean", "var"):
        if key not in stats:
            raise ValueError(f"batch_norm: stats needs keys 'mean' and 'var', got {list(stats)}.")
        _check_shape(f"stats[{key!r}]", stats[key], feature_shape)
    for name, value in (("scale", scale), ("bias", bias)):
        if value is not None:
            _check_shape(name, value, feature_shape)


def _check_shape(name, value, feature_shape):
    if tuple(jnp.shape(value)) != feature_shape:
        raise ValueError(
            f"batch_norm: {name} has shape {tuple(jnp.shape(value))} but the feature axis of x "
            f"has shape {feature_shape}; check `axis` or re-initialize the statistics."
        )
