"""BN's training-mode math, shared by `batch_norm` and its variants: the one-pass shifted
moments in float32, the forward, the closed-form backward (a `jax.custom_vjp`), and the
collectives that take statistics across devices (`axis_name`, `axis_index_groups`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bnlab.types import Array


def _float_input(x: Array) -> Array:
    """`x` itself if it is floating, else promoted as flax's normalizations promote it: an
    integer or bool input would otherwise be truncated back to its dtype (a normalized int32 is
    -1, 0 or 1; a uint8 is 0 or 1). float32 with float32 statistics (`jnp.promote_types`)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return x
    return x.astype(jnp.promote_types(jnp.float32, x.dtype))


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
    broadcast does. Elsewhere the per-device gradient is kept, which `bnlab.training.parallel`
    averages.
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
