"""Batch normalization as a pure function, and the math its variants share.

`batch_norm` follows Ioffe & Szegedy (2015), Algorithm 1 and Section 3: one-pass shifted
moments in float32, the closed-form backward as a `jax.custom_vjp` (or autodiff), statistics
across devices through `axis_name`, padding through `mask`. The private helpers below it
(layout, moments, the training-mode forward and backward, the collectives, the argument
checks) serve `bnlab.bn_variants` and `bnlab.example_norms` too. Import the public names from
`bnlab.norm`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

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
      allow_single_value: allow training statistics over one value per feature.

    Returns:
      `(y, new_stats)`: `y` like `x`; `new_stats` like `stats`.

    Raises:
      ValueError: on an axis out of range, stats or affine parameters of the wrong shape, an
        unknown `convention`/`backward`, or one value per feature in training.
      NameError: if `axis_name` is not bound by an enclosing transform.
    """
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
    """Initial statistics: mean 0, variance 1 (as flax and PyTorch)."""
    shape = (feature_shape,) if isinstance(feature_shape, int) else tuple(feature_shape)
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


def check_values_per_feature(shape: Sequence[int], reduce_axes: Sequence[int]) -> None:
    """Raises if training statistics would see one value per feature (PyTorch refuses too)."""
    if math.prod(shape[a] for a in reduce_axes) == 1:
        raise ValueError(
            f"batch normalization in training got one value per feature (input of shape "
            f"{tuple(shape)}): its variance is 0, so every output would be the bias and the "
            "running variance would move toward 0. Use a batch of at least 2 examples, or "
            "allow it (batch_norm(..., allow_single_value=True); config "
            "norm.allow_single_value=true)."
        )


def _without_padding(x, w):
    """`x` with its padding (weight 0) replaced by the first real example's values, constants
    of the math: padding of any value, NaN or inf, reaches neither statistics nor gradients."""
    live = jnp.broadcast_to(w > 0, x.shape[:1] + w.shape[1:])
    real = jnp.argmax(jnp.any(live.reshape(live.shape[0], -1), axis=1))  # 0 if none is real
    fill = lax.stop_gradient(jnp.where(live[real], x[real], jnp.zeros_like(x[real])))
    return jnp.where(live, x, fill)


def _moments(x32, w, reduce_axes, axis_name, groups):
    """Mean and variance over `reduce_axes` (and the devices of `axis_name`), keepdims."""
    # Shifted one-pass moments: with a shift taken from the data, E[d^2] - E[d]^2 of
    # d = x - shift has no catastrophic cancellation, needs one pass over x (both sums fuse),
    # and gives a constant feature exactly mean = shift, var = 0 on one device. The shift is a
    # constant of the math, hence stop_gradient; across devices it must be common (pmean).
    first = tuple(slice(0, 1) if a in reduce_axes else slice(None) for a in range(x32.ndim))
    shift = lax.stop_gradient(x32[first])
    if axis_name is not None:
        shift = _psum(shift, axis_name, groups) / _axis_size(axis_name, groups)
    d = x32 - shift
    m1, m2 = _global_mean((d, jnp.square(d)), w, reduce_axes, axis_name, groups)
    return shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def _train(x, scale, bias, w, correction, epsilon, reduce_axes, axis_name, groups, backward):
    """Training-mode BN: `(y, batch mean, batch var)`, the statistics with keepdims."""
    fn = _train_analytic if backward == "analytic" else _train_autodiff
    return fn(x, scale, bias, w, correction, float(epsilon), reduce_axes, axis_name, groups)


def _forward(x, scale, bias, w, correction, epsilon, reduce_axes, axis_name, groups):
    mean, var = _moments(x.astype(jnp.float32), w, reduce_axes, axis_name, groups)
    rstd = lax.rsqrt(var + epsilon)
    rd = None if correction is None else _renorm_factors(mean, rstd, correction, epsilon)
    gain, shift = _corrected(scale, bias, rd)
    return _affine(x, mean, rstd, gain, shift), mean, var, rstd, rd


def _renorm_factors(mean, rstd, correction, epsilon):
    """Batch renorm's `(r, d)`, constants of the math (Ioffe 2017, Alg. 1)."""
    run_mean, run_var, r_max, d_max = correction
    run_rstd = lax.rsqrt(run_var + epsilon)
    r = jnp.clip(run_rstd / rstd, 1.0 / r_max, r_max)  # sigma_B / sigma
    d = jnp.clip((mean - run_mean) * run_rstd, -d_max, d_max)
    return lax.stop_gradient(r), lax.stop_gradient(d)


def _corrected(scale, bias, rd):
    """`x_hat * r + d` then the affine is `x_hat * (scale * r) + (bias + scale * d)`."""
    if rd is None:
        return scale, bias
    r, d = rd
    return scale * r, bias + scale * d


def _train_autodiff(x, scale, bias, w, correction, epsilon, reduce_axes, axis_name, groups):
    y, mean, var, _, _ = _forward(
        x, scale, bias, w, correction, epsilon, reduce_axes, axis_name, groups
    )
    return y, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _train_analytic(x, scale, bias, w, correction, epsilon, reduce_axes, axis_name, groups):
    return _train_autodiff(x, scale, bias, w, correction, epsilon, reduce_axes, axis_name, groups)


def _train_analytic_fwd(x, scale, bias, w, correction, epsilon, reduce_axes, axis_name, groups):
    y, mean, var, rstd, rd = _forward(
        x, scale, bias, w, correction, epsilon, reduce_axes, axis_name, groups
    )
    # Keep x rather than x_hat: the previous layer holds x already, so this costs no memory.
    return (y, mean, var), (x, mean, rstd, scale, bias, w, correction, rd)


def _train_analytic_bwd(epsilon, reduce_axes, axis_name, groups, res, cotangents):
    """Closed-form gradients of Ioffe & Szegedy (2015), Section 3.

    With g = dy * scale, per-example weights w (1 without a mask, n their total) and sums over
    the batch (and devices)::

        dx = rstd * (g - w * sum(g) / n - w * x_hat * sum(g * x_hat) / n)
             + w * dmean / n + 2 * w * dvar * x_hat / (rstd * n)

    where dmean/dvar are the cotangents of the returned batch statistics (usually zero). The
    weights only enter through the statistics; the mask gets a zero cotangent. Batch renorm's
    constant `r`, `d` (Ioffe 2017) scale `g` by `r`, and give `dscale = r * sum(dy * x_hat) +
    d * sum(dy)`; the running statistics they come from get zero cotangents. `dscale`, `dbias`
    are this device's sums, except under `shard_map(check_vma=True)`, which types a replicated
    scale/bias as such: there they are summed over the devices, as autodiff does (`_unsummed`).
    """
    del epsilon
    x, mean, rstd, scale, bias, w, correction, rd = res
    dy, dmean, dvar = cotangents
    dy32 = dy.astype(jnp.float32)
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    dbias = jnp.sum(dy32, reduce_axes, keepdims=True)
    dscale = jnp.sum(dy32 * x_hat, reduce_axes, keepdims=True)
    sums = (dbias, dscale, dmean, dvar)
    if axis_name is not None:
        # One collective for the four sums: every device's loss depends on every x.
        sums = _psum(sums, axis_name, groups)
    if dscale.shape != scale.shape:
        # Ghost BN's per-group sums: XLA:CPU would fuse them into dx's loop (1.4x slower).
        sums = lax.optimization_barrier(sums)
    sum_dy, sum_dy_xhat, dmean, dvar = sums
    n = _count(x, w, reduce_axes, axis_name, groups)
    wn = 1.0 / n if w is None else w / n
    gain, _ = _corrected(scale, bias, rd)
    dx = (rstd * gain) * (dy32 - wn * (sum_dy + x_hat * sum_dy_xhat)) + wn * (
        dmean + 2.0 * dvar * x_hat / rstd
    )
    if axis_name is not None and groups is None and axis_name in _unsummed(dscale, scale):
        # A scale/bias that shard_map(check_vma=True) knows to be replicated over axis_name: its
        # gradient is the total over the devices, the four sums above already hold it.
        dscale, dbias = sum_dy_xhat, sum_dy
    if rd is not None:
        dscale = dscale * rd[0] + dbias * rd[1]
    # Statistics per group of a feature (ghost BN), affine parameters shared by the groups.
    dscale, dbias = _sum_to(dscale, scale.shape), _sum_to(dbias, bias.shape)
    dscale, dbias = _sum_over_unsummed(dscale, scale), _sum_over_unsummed(dbias, bias)
    dw = None if w is None else jnp.zeros_like(w)
    dcorrection = jax.tree.map(jnp.zeros_like, correction)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype), dw, dcorrection


def _unsummed(cotangent, primal) -> frozenset:
    """Mesh axes along which `cotangent` varies but `primal` does not.

    Only `shard_map(check_vma=True)` tracks this variation (pmap, vmap and check_vma=False
    leave it empty): a primal replicated over an axis is implicitly broadcast to the devices
    there, so its cotangent must be summed over them, as autodiff's transpose of that
    broadcast does. Elsewhere the per-device gradient is kept, which `bnlab.parallel` averages.
    """
    return jax.typeof(cotangent).mat.varying - jax.typeof(primal).mat.varying


def _sum_over_unsummed(cotangent, primal):
    """`cotangent` summed over the mesh axes of `_unsummed` (unchanged when there are none)."""
    axes = _unsummed(cotangent, primal)
    return lax.psum(cotangent, tuple(axes)) if axes else cotangent


def _sum_to(a, shape):
    """`a` summed over the axes where `shape` is 1 (the transpose of broadcasting to `a`)."""
    axes = tuple(i for i, (n, m) in enumerate(zip(a.shape, shape, strict=True)) if m == 1 < n)
    return jnp.sum(a, axes, keepdims=True) if axes else a


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
