"""BN's variants, each `batch_norm`'s math with one change: `ghost_batch_norm` (Hoffer et al.
2017), `batch_renorm` with `renorm_schedule` (Ioffe 2017), `noisy_batch_norm` (Santurkar et al.
2018, Sec. 2), `population_batch_norm` (Ghorbani et al. 2019) and `batch_norm_stopgrad` (BN
without gradient through the batch statistics). Pure functions, re-exported by `bnlab.norm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from bnlab.ops.bn_core import (
    Backward,
    Convention,
    _batch_update,
    _freeze_groups,
    _layout,
    _normalize_with,
    _stored_var,
    _updated,
    batch_norm,
    feature_axes_of,
)
from bnlab.ops.bn_math import (
    _affine,
    _axis_size,
    _count,
    _float_input,
    _moments,
    _psum,
    _train,
    check_values_per_feature,
)
from bnlab.types import Array, Stats


def ghost_batch_norm(
    x: Array,
    stats: Stats,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    virtual_batch_size: int,
    momentum: float | Array = 0.99,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    convention: Convention = "flax",
    backward: Backward = "analytic",
    allow_single_value: bool = False,
) -> tuple[Array, Stats]:
    """Ghost batch normalization: `batch_norm` over consecutive virtual batches along axis 0.

    Hoffer, Hubara & Soudry (2017), Sec. 4: the batch `x[0:v], x[v:2v], ...` of
    `v = virtual_batch_size` examples each is normalized with its own statistics
    `mu_g`, `var_g`, and the running statistics move with their mean over the `G = B / v`
    virtual batches::

        y[g] = (x[g] - mu_g) / sqrt(var_g + epsilon) * scale + bias
        new_mean = momentum * mean_old + (1 - momentum) * mean_g(mu_g)
        new_var  = momentum * var_old  + (1 - momentum) * mean_g(var_g)

    (`var_g` unbiased within its virtual batch for `convention="torch"`). One pass over `x`
    computes every group's moments, and the closed-form backward of `batch_norm` serves: the
    group axis is kept as one more feature axis. With `axis_name`, the virtual batches stay
    within each device and the batch statistics are averaged over the devices before the
    moving average, so devices holding consecutive slices of a global batch give the result of
    the global batch on one device. Evaluation is `batch_norm`'s.

    Args:
      x: input, axis 0 the batch.
      stats, scale, bias, training, momentum, epsilon, axis, convention, backward: as in
        `batch_norm`; `axis` must not name axis 0.
      virtual_batch_size: examples per virtual batch; must divide `x.shape[0]`.
      axis_name, axis_index_groups: devices whose batch statistics are averaged.
      allow_single_value: allow statistics over one value per feature in a virtual batch
        (refused by default, as `batch_norm` refuses it).

    Returns:
      `(y, new_stats)` as `batch_norm`.

    Raises:
      ValueError: if `virtual_batch_size` does not divide the batch, if `axis` names the batch
        axis, on one value per feature in a virtual batch (unless allowed), or on
        `batch_norm`'s bad arguments.
    """
    x = _float_input(x)
    lay = _layout(x, stats, scale, bias, axis, momentum, epsilon, convention, backward)
    if not training:
        return _normalize_with(x, stats, lay, epsilon), stats
    batch = x.shape[0]
    if 0 not in lay.reduce_axes:
        raise ValueError(f"ghost_batch_norm: axis {axis} names the batch axis 0.")
    if virtual_batch_size <= 0 or batch % virtual_batch_size:
        raise ValueError(
            f"ghost_batch_norm: virtual_batch_size={virtual_batch_size} does not divide the "
            f"batch of {batch} examples; choose a divisor of {batch}."
        )
    groups = batch // virtual_batch_size
    # x as (G, v, ...): the group axis is a feature axis of the BN math, axis 0 a reduced one.
    xg = x.reshape((groups, virtual_batch_size) + x.shape[1:])
    scale, bias = lay.scale[None], lay.bias[None]  # shared by the groups
    reduce_axes = tuple(a + 1 for a in lay.reduce_axes)
    if not allow_single_value:
        check_values_per_feature(xg.shape, reduce_axes)
    y, mean, var = _train(xg, scale, bias, None, None, epsilon, reduce_axes, None, None, backward)
    var = _stored_var(var, convention, lambda: _count(xg, None, reduce_axes, None, None))
    mean, var = jnp.mean(mean, 0), jnp.mean(var, 0)
    if axis_name is not None:
        frozen = _freeze_groups(axis_index_groups)
        size = _axis_size(axis_name, frozen)
        mean, var = (s / size for s in _psum((mean, var), axis_name, frozen))
    return y.reshape(x.shape), _updated(stats, mean, var, momentum)


def batch_renorm(
    x: Array,
    stats: Stats,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    r_max: float | Array,
    d_max: float | Array,
    momentum: float | Array = 0.99,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    convention: Convention = "flax",
    backward: Backward = "analytic",
) -> tuple[Array, Stats]:
    """Batch renormalization (Ioffe 2017, Algorithm 1).

    With the batch statistics `mu_B`, `sigma_B = sqrt(var_B + epsilon)` (over the devices of
    `axis_name` too) and `sigma = sqrt(var + epsilon)` from the running statistics in `stats`
    (those before this step's update)::

        r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mean) / sigma, -d_max, d_max))
        y = ((x - mu_B) / sigma_B * r + d) * scale + bias

    and the running statistics move as in `batch_norm`. With `r_max=1, d_max=0` this is
    `batch_norm` exactly (outputs, gradients and statistics). `r` and `d` enter as a correction
    of the affine parameters, so the one-pass moments and the closed-form backward of
    `batch_norm` serve unchanged. Evaluation is `batch_norm`'s.

    Args:
      x, stats, scale, bias, training, momentum, epsilon, axis, axis_name, axis_index_groups,
        convention, backward: as in `batch_norm`.
      r_max: bound of `r`, >= 1; may be a traced array (a schedule, see `renorm_schedule`).
      d_max: bound of `|d|`, >= 0; may be a traced array.

    Returns:
      `(y, new_stats)` as `batch_norm`.

    Raises:
      ValueError: on a concrete `r_max < 1` or `d_max < 0`, or `batch_norm`'s bad arguments.
    """
    x = _float_input(x)
    lay = _layout(x, stats, scale, bias, axis, momentum, epsilon, convention, backward)
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if not isinstance(value, jax.core.Tracer) and not float(value) >= low:
            raise ValueError(f"batch_renorm: {name}={value} must be >= {low}.")
    if not training:
        return _normalize_with(x, stats, lay, epsilon), stats
    axes = (lay.reduce_axes, axis_name, _freeze_groups(axis_index_groups))
    correction = (
        jnp.reshape(stats["mean"], lay.bshape),
        jnp.reshape(stats["var"], lay.bshape),
        jnp.asarray(r_max, jnp.float32),
        jnp.asarray(d_max, jnp.float32),
    )
    y, mean, var = _train(x, lay.scale, lay.bias, None, correction, epsilon, *axes, backward)
    return y, _batch_update(stats, x, None, mean, var, momentum, convention, axes)


def renorm_schedule(
    step: int | Array,
    *,
    r_max: float | Array,
    d_max: float | Array,
    warmup_steps: int,
    r_max_steps: int,
    d_max_steps: int,
) -> tuple[Array, Array]:
    """`(r_max_t, d_max_t)` at `step`: Ioffe (2017)'s relaxation schedule (Sec. 4.1).

    Plain BN (`1`, `0`) for `warmup_steps` steps, then linear ramps reaching `r_max` after
    `r_max_steps` more steps and `d_max` after `d_max_steps` more (a ramp of 0 steps jumps)::

        r_max_t = 1 + (r_max - 1) * clip((step - warmup_steps) / r_max_steps, 0, 1)
        d_max_t = d_max * clip((step - warmup_steps) / d_max_steps, 0, 1)
    """
    t = jnp.asarray(step, jnp.float32) - warmup_steps

    def ramp(length):
        if length <= 0:
            return (t >= 0).astype(jnp.float32)
        return jnp.clip(t / length, 0.0, 1.0)

    return 1.0 + (r_max - 1.0) * ramp(r_max_steps), d_max * ramp(d_max_steps)


def noisy_batch_norm(
    x: Array,
    stats: Stats,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool,
    key: Array | None,
    noise_mean: float | Array,
    noise_std: float | Array,
    momentum: float | Array = 0.99,
    epsilon: float = 1e-5,
    axis: int | Sequence[int] = -1,
    axis_name: str | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    convention: Convention = "flax",
    backward: Backward = "analytic",
) -> tuple[Array, Stats]:
    """Santurkar et al. (2018, Sec. 2)'s "noisy" BN: `batch_norm`, then noise in training only.

    The noise shifts each activation's distribution on purpose, by a different amount every
    step (a new `key`). bnlab's definition: per feature `j`, `m_j ~ U(-noise_mean, noise_mean)`
    and `s_j ~ U(0, noise_std)` (`noise_moments`); per example `i` and activation (position `p`,
    feature `j`) of it, i.i.d.::

        y[i, p, j] = batch_norm(x)[i, p, j] + n[i, p, j],   n[i, p, j] ~ N(m_j, s_j**2)

    Example `i`'s noise is drawn from a key folded with its global index (device index times
    the per-device batch, plus `i`, when `axis_name` is bound), so that devices holding
    consecutive slices of a global batch add the noise of that batch on one device; give every
    device the same `key`. Zero `noise_mean` and `noise_std` give `batch_norm` exactly.

    Args:
      x, stats, scale, bias, training, momentum, epsilon, axis, axis_name, axis_index_groups,
        convention, backward: as in `batch_norm`; `axis` must not name axis 0.
      key: the step's noise key (needed in training; ignored in evaluation).
      noise_mean: bound of the per-feature noise means, >= 0 (may be traced).
      noise_std: bound of the per-feature noise standard deviations, >= 0 (may be traced).

    Returns:
      `(y, new_stats)` as `batch_norm`; the statistics are those of `x`, before the noise.

    Raises:
      ValueError: without a `key` in training, or on `batch_norm`'s bad arguments.
    """
    y, new_stats = batch_norm(
        x, stats, scale, bias, training=training, momentum=momentum, epsilon=epsilon,
        axis=axis, axis_name=axis_name, axis_index_groups=axis_index_groups,
        convention=convention, backward=backward,
    )  # fmt: skip
    if not training:
        return y, new_stats
    if key is None:
        raise ValueError("noisy_batch_norm: training needs a key (a new one every step).")
    noise = activation_noise(
        key, x.shape, noise_mean=noise_mean, noise_std=noise_std, axis=axis, axis_name=axis_name
    )
    return (y.astype(jnp.float32) + noise).astype(y.dtype), new_stats


def noise_moments(
    key: Array, feature_shape: tuple[int, ...], *, noise_mean, noise_std
) -> tuple[Array, Array]:
    """`(m, s)` of `noisy_batch_norm`'s noise at `key`: `m ~ U(-noise_mean, noise_mean)`,
    `s ~ U(0, noise_std)`, each `f32[feature_shape]`."""
    key_m, key_s = jax.random.split(jax.random.fold_in(key, 0))
    m = noise_mean * jax.random.uniform(key_m, feature_shape, minval=-1.0, maxval=1.0)
    return m, noise_std * jax.random.uniform(key_s, feature_shape)


def activation_noise(
    key: Array,
    shape: tuple[int, ...],
    *,
    noise_mean,
    noise_std,
    axis: int | Sequence[int] = -1,
    axis_name: str | None = None,
) -> Array:
    """`f32[shape]`: the noise that `noisy_batch_norm` adds to an input of `shape` at `key`."""
    feature_axes = feature_axes_of(axis, len(shape))
    if 0 in feature_axes:
        raise ValueError(f"noisy_batch_norm: axis {axis} names the batch axis 0.")
    bshape = tuple(shape[a] if a in feature_axes else 1 for a in range(len(shape)))
    m, s = noise_moments(
        key, tuple(shape[a] for a in feature_axes), noise_mean=noise_mean, noise_std=noise_std
    )
    start = 0 if axis_name is None else lax.axis_index(axis_name) * shape[0]
    key_n = jax.random.fold_in(key, 1)
    draw = lambda i: jax.random.normal(jax.random.fold_in(key_n, i), shape[1:])  # noqa: E731
    z = jax.vmap(draw)(start + jnp.arange(shape[0]))
    return jnp.reshape(m, bshape) + jnp.reshape(s, bshape) * z


def population_batch_norm(
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
) -> tuple[Array, Stats]:
    """BN that normalizes with the running (population) statistics in training too.

    The ablation of Ghorbani, Krishnan & Xiao (2019): the output uses the statistics before
    this step's update, as constants, while those move with each batch as in `batch_norm`::

        y = (x - stop_gradient(mean)) / sqrt(stop_gradient(var) + epsilon) * scale + bias
        new_mean = momentum * mean + (1 - momentum) * mu_B
        new_var  = momentum * var  + (1 - momentum) * var_B

    so `dy/dx = scale / sqrt(var + epsilon)`: no gradient through the batch statistics.

    Args:
      x, stats, scale, bias, training, momentum, epsilon, axis, axis_name, axis_index_groups,
        convention: as in `batch_norm` (`axis_name`: the batch statistics span the devices).

    Returns:
      `(y, new_stats)` as `batch_norm`.

    Raises:
      ValueError: on `batch_norm`'s bad arguments.
    """
    x = _float_input(x)
    lay = _layout(x, stats, scale, bias, axis, momentum, epsilon, convention, "autodiff")
    y = _normalize_with(x, lax.stop_gradient(stats), lay, epsilon)
    if not training:
        return y, stats
    axes = (lay.reduce_axes, axis_name, _freeze_groups(axis_index_groups))
    mean, var = _moments(x.astype(jnp.float32), None, *axes)
    return y, _batch_update(stats, x, None, mean, var, momentum, convention, axes)


def batch_norm_stopgrad(
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
    allow_single_value: bool = False,
) -> tuple[Array, Stats]:
    """BN without gradient through the batch statistics: `batch_norm`'s values, not its gradient.

    The ablation of the statistics' terms of BN's backward (Ioffe & Szegedy 2015, Sec. 3): the
    batch moments `mu_B`, `var_B` (over the devices of `axis_name` too) enter as constants::

        y = (x - stop_gradient(mu_B)) / sqrt(stop_gradient(var_B) + epsilon) * scale + bias

    so `dy/dx = scale / sqrt(var_B + epsilon)`. Output, running statistics and evaluation equal
    `batch_norm`'s exactly; only the gradient w.r.t. `x` lacks the two centring terms.

    Args:
      x, stats, scale, bias, training, momentum, epsilon, axis, axis_name, axis_index_groups,
        convention, allow_single_value: as in `batch_norm`.

    Returns:
      `(y, new_stats)` as `batch_norm`.

    Raises:
      ValueError: on `batch_norm`'s bad arguments.
    """
    x = _float_input(x)
    lay = _layout(x, stats, scale, bias, axis, momentum, epsilon, convention, "autodiff")
    if not training:
        return _normalize_with(x, stats, lay, epsilon), stats
    if axis_name is None and not allow_single_value:
        check_values_per_feature(x.shape, lay.reduce_axes)
    axes = (lay.reduce_axes, axis_name, _freeze_groups(axis_index_groups))
    mean, var = lax.stop_gradient(_moments(x.astype(jnp.float32), None, *axes))
    y = _affine(x, mean, lax.rsqrt(var + float(epsilon)), lay.scale, lay.bias)
    return y, _batch_update(stats, x, None, mean, var, momentum, convention, axes)
