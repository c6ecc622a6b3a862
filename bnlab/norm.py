"""Pure batch normalization: statistics, normalization and moving averages.

Arrays in, arrays out. No Flax, no configs: the Flax wrapper lives in `bnlab.layers`.

Reference: Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift", Algorithm 1 and Section 3.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

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
    whatever their number on each device. `momentum` is always the weight of the old
    statistics, as in flax: PyTorch's `momentum=0.1` is `torch_momentum(0.1) == 0.9` here.

    Evaluation mode normalizes with `stats` and returns `stats` itself, unchanged.

    The statistics are computed in float32 whatever the dtype of `x`; `y` has the dtype of `x`.
    With `backward="analytic"` (default) the gradient is the closed form of Section 3 of the
    paper, as a `jax.custom_vjp`; `backward="autodiff"` differentiates the forward pass instead.

    Args:
      x: input, any float dtype.
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

    Returns:
      `(y, new_stats)`: `y` like `x`; `new_stats` like `stats`.

    Raises:
      ValueError: on an axis out of range, stats or affine parameters of the wrong shape, or an
        unknown `convention`/`backward`.
      NameError: if `axis_name` is not bound by an enclosing transform.
    """
    feature_axes = feature_axes_of(axis, x.ndim)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    _check_args(stats, scale, bias, feature_shape, momentum, epsilon, convention, backward)
    reduce_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
    bshape = tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))
    scale = jnp.ones(bshape, jnp.float32) if scale is None else jnp.reshape(scale, bshape)
    bias = jnp.zeros(bshape, jnp.float32) if bias is None else jnp.reshape(bias, bshape)

    epsilon = float(epsilon)  # static: a non-differentiable argument of the custom VJP
    if not training:
        mean = jnp.reshape(stats["mean"], bshape)
        var = jnp.reshape(stats["var"], bshape)
        return _affine(x, mean, lax.rsqrt(var + epsilon), scale, bias), stats

    groups = _freeze_groups(axis_index_groups)
    w = None if mask is None else _weights(mask, x.shape, bshape)
    train_fn = _train_analytic if backward == "analytic" else _train_autodiff
    y, mean, var = train_fn(x, scale, bias, w, epsilon, reduce_axes, axis_name, groups)
    if convention == "torch":
        n = _count(x, w, reduce_axes, axis_name, groups)
        var = var * (n / jnp.maximum(n - 1, 1))
    new_stats = {
        "mean": moving_average(stats["mean"], mean.reshape(feature_shape), momentum),
        "var": moving_average(stats["var"], var.reshape(feature_shape), momentum),
    }
    return y, new_stats


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
    """Initial statistics: mean 0, variance 1 (as flax and PyTorch)."""
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
    return {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}


def _affine(x, mean, rstd, scale, bias):
    # Folding scale into rstd saves one multiply per element.
    y = (x.astype(jnp.float32) - mean) * (rstd * scale) + bias
    return y.astype(x.dtype)


def _weights(mask, x_shape, bshape):
    """`mask` as float32 weights of rank `len(x_shape)`, 1 on the feature axes."""
    w = jnp.asarray(mask, jnp.float32)
    if w.ndim == 1 and len(x_shape) > 1:
        w = w.reshape((-1,) + (1,) * (len(x_shape) - 1))
    ok = w.ndim == len(x_shape) and all(
        m in (1, d) and (m == 1 or b == 1) for m, d, b in zip(w.shape, x_shape, bshape, strict=True)
    )
    if not ok:
        raise ValueError(
            f"batch_norm: mask of shape {jnp.shape(mask)} does not fit x of shape {x_shape}; "
            "pass per-example weights f32[B] for axis 0, or a shape broadcastable to x that "
            "is 1 on the feature axes."
        )
    # Broadcast over the reduced axes, so that its sum counts every reduced element.
    return lax.stop_gradient(
        jnp.broadcast_to(w, tuple(d if b == 1 else 1 for d, b in zip(x_shape, bshape, strict=True)))
    )


def _forward(x, scale, bias, w, epsilon, reduce_axes, axis_name, groups):
    x32 = x.astype(jnp.float32)
    # Shifted one-pass moments: with a shift taken from the data, E[d^2] - E[d]^2 of
    # d = x - shift has no catastrophic cancellation, needs one pass over x (both sums fuse),
    # and gives a constant feature exactly mean = shift, var = 0 on one device. The shift is a
    # constant of the math, hence stop_gradient; across devices it must be common (pmean).
    first = tuple(slice(0, 1) if a in reduce_axes else slice(None) for a in range(x.ndim))
    shift = lax.stop_gradient(x32[first])
    if axis_name is not None:
        shift = _psum(shift, axis_name, groups) / _axis_size(axis_name, groups)
    d = x32 - shift
    m1, m2 = _global_mean((d, jnp.square(d)), w, reduce_axes, axis_name, groups)
    mean = shift + m1
    var = jnp.maximum(m2 - jnp.square(m1), 0.0)
    rstd = lax.rsqrt(var + epsilon)
    return _affine(x, mean, rstd, scale, bias), mean, var, rstd


def _train_autodiff(x, scale, bias, w, epsilon, reduce_axes, axis_name, groups):
    y, mean, var, _ = _forward(x, scale, bias, w, epsilon, reduce_axes, axis_name, groups)
    return y, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _train_analytic(x, scale, bias, w, epsilon, reduce_axes, axis_name, groups):
    return _train_autodiff(x, scale, bias, w, epsilon, reduce_axes, axis_name, groups)


def _train_analytic_fwd(x, scale, bias, w, epsilon, reduce_axes, axis_name, groups):
    y, mean, var, rstd = _forward(x, scale, bias, w, epsilon, reduce_axes, axis_name, groups)
    # Keep x rather than x_hat: the previous layer holds x already, so this costs no memory.
    return (y, mean, var), (x, mean, rstd, scale, bias, w)


def _train_analytic_bwd(epsilon, reduce_axes, axis_name, groups, res, cotangents):
    """Closed-form gradients of Ioffe & Szegedy (2015), Section 3.

    With g = dy * scale, per-example weights w (1 without a mask, n their total) and sums over
    the batch (and devices)::

        dx = rstd * (g - w * sum(g) / n - w * x_hat * sum(g * x_hat) / n)
             + w * dmean / n + 2 * w * dvar * x_hat / (rstd * n)

    where dmean/dvar are the cotangents of the returned batch statistics (usually zero). The
    weights only enter through the statistics; the mask gets a zero cotangent.
    """
    del epsilon
    x, mean, rstd, scale, bias, w = res
    dy, dmean, dvar = cotangents
    dy32 = dy.astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    dbias = jnp.sum(dy32, reduce_axes, keepdims=True)
    dscale = jnp.sum(dy32 * x_hat, reduce_axes, keepdims=True)
    sums = (dbias, dscale, dmean, dvar)
    if axis_name is not None:
        # One collective for the four sums: every device's loss depends on every x.
        sums = _psum(sums, axis_name, groups)
    sum_dy, sum_dy_xhat, dmean, dvar = sums
    n = _count(x, w, reduce_axes, axis_name, groups)
    wn = 1.0 / n if w is None else w / n
    dx = (rstd * scale) * (dy32 - wn * (sum_dy + x_hat * sum_dy_xhat)) + wn * (
        dmean + 2.0 * dvar * x_hat / rstd
    )
    dw = None if w is None else jnp.zeros_like(w)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype), dw


_train_analytic.defvjp(_train_analytic_fwd, _train_analytic_bwd)


def _global_mean(xs, w, reduce_axes, axis_name, groups):
    """(Weighted) means over `reduce_axes` and the devices of `axis_name`, in one collective."""
    if w is not None:
        # Sums and the total weight travel together, so unequal counts per device stay exact.
        sums = jax.tree.map(lambda x: jnp.sum(w * x, reduce_axes, keepdims=True), xs)
        n = jnp.sum(w, reduce_axes, keepdims=True)
        if axis_name is not None:
            sums, n = _psum((sums, n), axis_name, groups)
        return jax.tree.map(lambda s: s / n, sums)
    means = jax.tree.map(lambda x: jnp.mean(x, reduce_axes, keepdims=True), xs)
    if axis_name is None:
        return means
    size = _axis_size(axis_name, groups)
    return jax.tree.map(lambda m: m / size, _psum(means, axis_name, groups))


def _count(x, w, reduce_axes, axis_name, groups) -> int | Array:
    if w is not None:
        n = jnp.sum(w, reduce_axes, keepdims=True)
        return n if axis_name is None else _psum(n, axis_name, groups)
    n = 1
    for a in reduce_axes:
        n *= x.shape[a]
    if axis_name is not None:
        n = n * _axis_size(axis_name, groups)
    return n


def _axis_size(axis_name, groups):
    if groups is not None:
        return len(groups[0])
    return _psum(1, axis_name, None)


def _psum(tree, axis_name, groups):
    try:
        return lax.psum(tree, axis_name, axis_index_groups=groups)
    except NameError as err:
        raise NameError(
            f"batch_norm(axis_name={axis_name!r}): no enclosing transform binds that axis. "
            "Run it under jax.pmap/jax.vmap(..., axis_name=...) or shard_map with that axis "
            "name, or pass axis_name=None for single-device statistics."
        ) from err


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
