"""`rank`: the effective rank of each layer's representation of a batch (Roy & Vetterli 2007),
for rank collapse with depth (Daneshmand et al. 2020: without BN, a deep network's
representations of different inputs align, the rank falling towards 1; BN keeps it high).

For a layer's output `X` on the fixed batch (B examples, flattened to B x D), with singular
values `s_i` and `p_i = s_i / sum_j s_j`, the effective rank is `exp(-sum_i p_i log p_i)`:
1 when every example maps to the same direction, k for k equal singular values, at most
min(B, D). Singular values below numpy's `matrix_rank` tolerance count as zero.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bnlab.diagnostics.common import measurement_rngs, singular_values
from bnlab.types import Array


def effective_rank(x: Array) -> Array:
    """`exp(entropy(s / sum(s)))` of the singular values `s` of `x` (B x ...) flattened to
    B x D; 0 for an all-zero `x`."""
    x = jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)
    s = singular_values(x)
    # Singular values below numpy's matrix_rank tolerance are rounding noise, not directions.
    s = jnp.where(s > jnp.max(s) * max(x.shape) * jnp.finfo(jnp.float32).eps, s, 0.0)
    total = jnp.sum(s)
    p = s / jnp.where(total > 0, total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def layer_outputs(ctx: Any) -> dict[str, Array]:
    """`{top-level module: its output}` on the fixed batch, in training mode (batch statistics,
    as the training step sees it; the running statistics are untouched)."""
    outputs: dict[str, Array] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = context.module.path
        if len(path) == 1 and context.method_name == "__call__" and path[0] not in outputs:
            outputs[path[0]] = out
        return out

    with nn.intercept_methods(record):
        ctx.model.apply(
            {"params": ctx.state.params, "batch_stats": ctx.state.batch_stats},
            ctx.batch[0],
            train=True,
            mutable=["batch_stats"],
            rngs=measurement_rngs(ctx.rng),
        )
    return outputs


def measure(ctx: Any) -> dict[str, Array]:
    """`rank/<module>`: the effective rank of each top-level module's output on the batch."""
    return {name: effective_rank(out) for name, out in layer_outputs(ctx).items()}
