"""Pure normalizations: batch normalization, its variants, and layer and group normalization.

Arrays in, arrays out, explicit state, statistics in float32. No Flax, no configs: the Flax
wrappers live in `bnlab.layers`, the config and registry in `bnlab.norms`.

`batch_norm` follows Ioffe & Szegedy (2015), Algorithm 1 and Section 3. Its variants reuse its
one-pass moments and closed-form backward: `ghost_batch_norm` (Hoffer et al. 2017),
`batch_renorm` (Ioffe 2017), `noisy_batch_norm` (Santurkar et al. 2018, Sec. 2) and
`population_batch_norm` (Ghorbani et al. 2019). `group_norm` (Wu & He 2018) and `layer_norm`
(Ba et al. 2016) normalize each example on its own.
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

    Returns:
      `(y, new_stats)` as `batch_norm`.

    Raises:
      ValueError: if `virtual_batch_size` does not divide the batch, if `axis` names the batch
        axis, or on `batch_norm`'s bad arguments.
    """
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
    lay = _layout(x, stats, scale, bias, axis, momentum, epsilon, convention, "autodiff")
    y = _normalize_with(x, lax.stop_gradient(stats), lay, epsilon)
    if not training:
        return y, stats
    axes = (lay.reduce_axes, axis_name, _freeze_groups(axis_index_groups))
    mean, var = _moments(x.astype(jnp.float32), None, *axes)
    return y, _batch_update(stats, x, None, mean, var, momentum, convention, axes)


def group_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    num_groups: int,
    epsilon: float = 1e-5,
    axis: int = -1,
) -> Array:
    """Group normalization (Wu & He 2018): each example's channels in `num_groups` groups.

    The `C` channels on `axis` form `num_groups` groups of consecutive channels; each example
    `i` and group `g` is normalized with the mean and variance over its channels and every
    other non-batch axis (float32), then an affine transform per channel::

        y[i, ..., c] = (x[i, ..., c] - mu[i, g(c)]) / sqrt(var[i, g(c)] + epsilon)
                       * scale[c] + bias[c]

    Equal to `flax.linen.GroupNorm(num_groups, epsilon=epsilon, use_fast_variance=False)`
    (channels last) and `torch.nn.GroupNorm`. No state, no batch statistics: training and
    evaluation are the same function.

    Args:
      x: input `[B, ..., C, ...]`, any float dtype; axis 0 the batch.
      scale: optional per-channel `gamma`, shape `[C]`; `None` means 1.
      bias: optional per-channel `beta`, shape `[C]`; `None` means 0.
      num_groups: number of groups, a divisor of `C`.
      epsilon: added to the variance; a Python number > 0.
      axis: the channel axis (not 0).

    Returns:
      `y` like `x`.

    Raises:
      ValueError: if `num_groups` does not divide `C`, `axis` is 0 or out of range, or
        `scale`/`bias` are not `[C]`.
    """
    if not -x.ndim < axis < x.ndim or axis % x.ndim == 0:
        raise ValueError(
            f"group_norm: axis {axis} must name a channel axis of the rank-{x.ndim} input, not "
            "the batch axis 0."
        )
    a, channels = axis % x.ndim, x.shape[axis]
    if not isinstance(num_groups, int) or num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"group_norm: num_groups={num_groups} does not divide the {channels} channels; "
            "choose a divisor of the channel count."
        )
    if not float(epsilon) > 0:
        raise ValueError(f"group_norm: epsilon={epsilon} must be > 0.")
    for name, value in (("scale", scale), ("bias", bias)):
        if value is not None:
            _check_shape(name, value, (channels,))
    epsilon = float(epsilon)
    size = channels // num_groups
    spatial = tuple(i for i in range(1, x.ndim) if i != a)
    if num_groups == 1 or not spatial:
        # Each group is one contiguous run of x (channels last): reduce the grouped view.
        gshape = x.shape[:a] + (num_groups, size) + x.shape[a + 1 :]
        xg = x.reshape(gshape)
        reduce_axes = tuple(i for i in range(1, xg.ndim) if i != a)
        mean, var = _moments(xg.astype(jnp.float32), None, reduce_axes, None, None)
        pshape = tuple(d if i in (a, a + 1) else 1 for i, d in enumerate(gshape))
        scale, bias = _params_or_identity(scale, bias, pshape)
        return _affine(xg, mean, lax.rsqrt(var + epsilon), scale, bias).reshape(x.shape)
    mean, var = _strided_group_moments(x.astype(jnp.float32), a, size, spatial)
    scale, bias = _params_or_identity(
        scale, bias, tuple(d if i == a else 1 for i, d in enumerate(x.shape))
    )
    return _affine(x, mean, lax.rsqrt(var + epsilon), scale, bias)


def _params_or_identity(scale, bias, shape):
    """`scale`, `bias` reshaped to `shape`; 1 and 0 where None."""
    scale = jnp.ones(shape, jnp.float32) if scale is None else jnp.reshape(scale, shape)
    return scale, jnp.zeros(shape, jnp.float32) if bias is None else jnp.reshape(bias, shape)


def _strided_group_moments(x32, a, size, spatial):
    """Mean and variance of each example's groups of `size` channels, per channel.

    When a group is strided in memory (several channels at every position), the sums run per
    channel over the `spatial` axes first, keeping the channels contiguous as BN's do
    (reducing the `[B, ..., G, C/G]` view instead is about 3x slower on CPU), then over each
    group's channels. The shift of the one-pass moments is each group's first element.
    """
    channels = x32.shape[a]
    num_groups = channels // size
    first = tuple(slice(0, 1) if i in spatial else slice(None) for i in range(x32.ndim))
    shift = lax.slice_in_dim(x32[first], 0, channels, size, axis=a)
    shift = lax.stop_gradient(jnp.repeat(shift, size, axis=a))
    d = x32 - shift

    def per_group(m):  # [B, .., C, ..] -> the mean over each group's channels, repeated
        grouped = m.reshape(m.shape[:a] + (num_groups, size) + m.shape[a + 1 :])
        return jnp.repeat(jnp.mean(grouped, a + 1), size, axis=a)

    m1 = per_group(jnp.mean(d, spatial, keepdims=True))
    m2 = per_group(jnp.mean(jnp.square(d), spatial, keepdims=True))
    return shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def layer_norm(
    x: Array,
    scale: Array | None = None,
    bias: Array | None = None,
    *,
    epsilon: float = 1e-5,
    axis: int = -1,
) -> Array:
    """Layer normalization (Ba, Kiros & Hinton 2016) over all non-batch axes of each example.

    Each example is normalized with the mean and variance over all its axes but 0 (float32);
    `scale` and `bias` act on the feature axis `axis` only::

        y[i, ..., c] = (x[i, ..., c] - mu[i]) / sqrt(var[i] + epsilon) * scale[c] + bias[c]

    which is `group_norm` with one group. Equal to `flax.linen.LayerNorm(reduction_axes=(1, ...,
    ndim - 1), feature_axes=axis, use_fast_variance=False)`; in PyTorch, `torch.nn.LayerNorm`
    over the whole non-batch shape with `scale`/`bias` broadcast to it.

    Args:
      x: input, any float dtype; axis 0 the batch.
      scale: optional `gamma`, shape `[x.shape[axis]]`; `None` means 1.
      bias: optional `beta`, shape `[x.shape[axis]]`; `None` means 0.
      epsilon: added to the variance; a Python number > 0.
      axis: the feature axis of `scale` and `bias` (not 0).

    Returns:
      `y` like `x`.

    Raises:
      ValueError: as `group_norm`.
    """
    return group_norm(x, scale, bias, num_groups=1, epsilon=epsilon, axis=axis)


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
