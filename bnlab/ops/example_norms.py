"""The normalizations of each example on its own: `group_norm` (Wu & He 2018) and `layer_norm`
(Ba et al. 2016), no state and no batch statistics. Pure functions, re-exported by
`bnlab.norm`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from bnlab.ops.bn_core import _check_shape, _params_or_identity
from bnlab.ops.bn_math import _affine, _float_input, _moments
from bnlab.types import Array


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
      x: input `[B, ..., C, ...]`, any float dtype (an integer or bool one is promoted to
        float32, as in flax); axis 0 the batch.
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
    x = _float_input(x)
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
      x: input, any float dtype (an integer or bool one is promoted to float32); axis 0 the
        batch.
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
