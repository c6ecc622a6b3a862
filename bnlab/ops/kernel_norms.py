"""The normalizations of a layer's kernel rather than its output: `weight_norm` (Salimans &
Kingma 2016) and `weight_standardize` (Qiao et al. 2019). Pure functions, re-exported by
`bnlab.norm`.

A kernel `w` holds one output unit per entry of its last axis (Dense `[I, O]`, Conv HWIO
`[H, W, I, O]`); both functions normalize each unit's kernel over every other axis, its fan-in.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from bnlab.types import Array

WEIGHT_NORM_EPSILON = 1e-12  # in ||v||^2: only keeps a zero kernel finite (flax's WeightNorm)


def _fan_in_axes(w: Array) -> tuple[int, ...]:
    if w.ndim < 2:
        raise ValueError(
            f"kernel normalization: a kernel of shape {w.shape} has no fan-in axis; pass a kernel "
            "with its output units on the last axis (Dense [I, O], Conv [H, W, I, O])."
        )
    return tuple(range(w.ndim - 1))


def unit_norms(v: Array) -> Array:
    """`||v_j||`, the L2 norm of each output unit's kernel (float32, shape `[O]`)."""
    v32 = v.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(v32), axis=_fan_in_axes(v)))


def weight_norm(v: Array, g: Array, *, epsilon: float = WEIGHT_NORM_EPSILON) -> Array:
    """Weight normalization (Salimans & Kingma 2016, eq. 2): `w = g * v / ||v||` per output unit.

    The direction of each unit's kernel is `v_j / ||v_j||` and its length `g_j`, learned apart:
    the loss is invariant to the scale of `v_j`, whose gradient is then orthogonal to `v_j`
    (eq. 3). Computed as flax's `WeightNorm` computes it, `v * rsqrt(||v||^2 + epsilon) * g`.

    Args:
      v: the kernel's direction parameter, `[..., O]` (the last axis the output units).
      g: the units' lengths, `[O]`.
      epsilon: added to `||v_j||^2`; tiny, so a zero kernel stays finite.

    Returns:
      `w` like `v`.

    Raises:
      ValueError: if `v` has no fan-in axis or `g` is not `[O]`.
    """
    axes = _fan_in_axes(v)
    if jnp.shape(g) != (v.shape[-1],):
        raise ValueError(
            f"weight_norm: g has shape {jnp.shape(g)}; it holds one length per output unit, "
            f"({v.shape[-1]},) for a kernel of shape {v.shape}."
        )
    v32 = v.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(jnp.square(v32), axis=axes, keepdims=True) + epsilon)
    return (v32 * inv * g).astype(v.dtype)


def weight_standardize(w: Array, *, epsilon: float) -> Array:
    """Weight standardization (Qiao et al. 2019): each output unit's kernel to zero mean
    and unit variance over its fan-in, `w_hat = (w - mean) / sqrt(var + epsilon)`.

    The variance is the biased one (mean of squares about the mean), in float32.

    Args:
      w: the kernel, `[..., O]` (the last axis the output units).
      epsilon: added to the variance; > 0.

    Returns:
      `w_hat` like `w`.

    Raises:
      ValueError: if `w` has no fan-in axis or `epsilon` is not > 0.
    """
    axes = _fan_in_axes(w)
    if not float(epsilon) > 0:
        raise ValueError(f"weight_standardize: epsilon={epsilon} must be > 0.")
    w32 = w.astype(jnp.float32)
    mean = jnp.mean(w32, axis=axes, keepdims=True)
    centred = w32 - mean
    var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True)
    return (centred * lax.rsqrt(var + epsilon)).astype(w.dtype)
