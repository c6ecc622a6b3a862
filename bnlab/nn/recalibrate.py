"""Recalibration ("precise BN"): running statistics re-estimated from data with fixed weights.

A trained network evaluates with running statistics that a moving average gathered while the
weights were still changing; they lag the final weights (0.99^93 = 39% of the initial 0/1 after
93 steps at momentum 0.99) and, for tiny batches, average biased per-batch estimates. Wu &
Johnson (2021, "Rethinking 'Batch' in BatchNorm") and Summers & Dinneen (2020) replace them by
the statistics of the trained network's own layer inputs over many training examples:

    for each normalization layer l, in the order the forward pass calls them:
        mean_l, var_l = the exact mean and (biased) variance, per feature, of l's inputs over
                        the N examples, the layers before l normalizing with their new statistics

`recalibrate(model, variables, images)` does this in one pass per layer (the inputs of layer l
depend on the statistics of the layers before it), over chunks of `batch_size` examples, with
the parallel mean/variance update of Chan et al. (1979) so that float32 stays exact enough.
Pure: it returns new `batch_stats`; weights and every other variable are unchanged. The model is
called in evaluation mode throughout, so dropout is off and each layer sees what evaluation
feeds it. A layer's inputs are reduced over every axis but the last (the feature axis of
bnlab's and flax's BatchNorm); its `mean` and `var` leaves are replaced, any other state (batch
renorm's step counter) is kept.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from bnlab.types import Array


def stats_paths(batch_stats: Any) -> list[tuple[str, ...]]:
    """Module paths that hold running statistics (`mean` and `var` leaves)."""
    flat = traverse_util.flatten_dict(dict(batch_stats))
    owners = {path[:-1] for path in flat if path[-1] in ("mean", "var")}
    return sorted(p for p in owners if (*p, "mean") in flat and (*p, "var") in flat)


def call_order(model: nn.Module, variables: Any, images: Array) -> list[tuple[str, ...]]:
    """The statistics-holding modules in the order the forward pass calls them."""
    owners = set(stats_paths(variables.get("batch_stats", {})))
    order: list[tuple[str, ...]] = []

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if path in owners and path not in order:
            order.append(path)
        return next_fun(*args, **kwargs)

    def forward(variables, images):
        with nn.intercept_methods(record):
            return model.apply(variables, images, train=False)

    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                          (variables, images))  # fmt: skip
    jax.eval_shape(forward, *shapes)
    return order


def layer_moments(
    model: nn.Module, variables: Any, images: Array, path: tuple[str, ...], batch_size: int
) -> tuple[Array, Array]:
    """Mean and biased variance, per feature, of the inputs of the module at `path` over
    `images`, the model in evaluation mode with `variables`."""

    def inputs(chunk):
        captured = []

        def record(next_fun, args, kwargs, context):
            if tuple(context.module.path) == path and context.method_name == "__call__":
                captured.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply(variables, chunk, train=False)
        return captured[0].astype(jnp.float32)

    def update(carry, chunk):
        count, mean, m2 = carry
        x = inputs(chunk)
        x = x.reshape(-1, x.shape[-1])
        n = jnp.asarray(x.shape[0], jnp.float32)
        chunk_mean = jnp.mean(x, axis=0)
        chunk_m2 = jnp.sum(jnp.square(x - chunk_mean), axis=0)
        total = count + n
        delta = chunk_mean - mean
        mean = mean + delta * n / total
        m2 = m2 + chunk_m2 + jnp.square(delta) * count * n / total
        return (total, mean, m2), None

    n = images.shape[0]
    if n % batch_size:
        raise ValueError(
            f"recalibration uses {n} examples in chunks of {batch_size}; give a multiple "
            "of the chunk size"
        )
    chunks = images.reshape(n // batch_size, batch_size, *images.shape[1:])
    stats = variables["batch_stats"]
    features = traverse_util.flatten_dict(dict(stats))[(*path, "mean")].shape[-1]
    init = (jnp.zeros((), jnp.float32), jnp.zeros(features), jnp.zeros(features))
    (count, mean, m2), _ = jax.lax.scan(update, init, chunks)
    return mean, m2 / count


def recalibrate(
    model: nn.Module, variables: Any, images: Array, *, batch_size: int = 500
) -> dict[str, Any]:
    """New `batch_stats`: each normalization layer's exact input mean and variance over
    `images` (a multiple of `batch_size` examples), layer by layer in call order.

    Raises:
      ValueError: the model has no running statistics, or `images` is not a multiple of
        `batch_size`.
    """
    order = call_order(model, variables, images[:1])
    if not order:
        raise ValueError("this model keeps no running statistics (no BN layer): nothing to "
                         "recalibrate")  # fmt: skip
    flat = traverse_util.flatten_dict(dict(variables["batch_stats"]))
    for path in order:
        current = {**variables, "batch_stats": traverse_util.unflatten_dict(flat)}
        mean, var = layer_moments(model, current, images, path, batch_size)
        flat[(*path, "mean")] = mean.astype(flat[(*path, "mean")].dtype)
        flat[(*path, "var")] = var.astype(flat[(*path, "var")].dtype)
    return traverse_util.unflatten_dict(flat)
