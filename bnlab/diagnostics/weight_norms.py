"""`weight_norms`: each kernel's norm and, for those that feed a normalization, its effective
learning rate (van Laarhoven 2017; Hoffer et al. 2018; Arora et al. 2019).

A normalization after a layer makes the loss invariant to the scale of that layer's kernel W:
L(cW) = L(W) for c > 0. The gradient is then orthogonal to W and shrinks as 1/||W||, the
curvature along the sphere as 1/||W||^2, and a step of learning rate lr moves the direction
W/||W|| as a step of lr/||W||^2 would on the unit sphere. As ||W|| grows during training this
*effective* learning rate falls by itself, an implicit schedule that a run without
normalization does not have.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from bnlab.diagnostics.common import call_order
from bnlab.nn.model_config import NORM_MODULE
from bnlab.types import Array


def feeds_normalization(params: Any, order: tuple[str, ...]) -> dict[str, bool]:
    """`{layer with a kernel: whether the module the forward pass calls next normalizes}` (a
    block whose parameters hold a normalization layer's: `bnlab.nn.model_config.NORM_MODULE`),
    or the layer normalizes its own kernel (weight normalization's `g`: `dense0/norm/scale`)."""
    out = {}
    for i, name in enumerate(order):
        if "kernel" not in params.get(name, {}):
            continue
        after = order[i + 1] if i + 1 < len(order) else None
        out[name] = NORM_MODULE in params[name] or (
            after is not None and NORM_MODULE in params.get(after, {})
        )
    return out


def measure(ctx: Any) -> dict[str, Array]:
    """Per layer `l` with a kernel: `l/weight_norm` (Frobenius norm of the kernel); for a
    layer that feeds a normalization, also `l/effective_lr` = lr_t / ||W||^2, with lr_t the
    learning rate in force (`ctx.lr`)."""
    params = ctx.state.params
    variables = {"params": params, "batch_stats": ctx.state.batch_stats}
    order = call_order(ctx.model, variables, ctx.batch[0])
    out = {}
    for name, normalized in feeds_normalization(params, order).items():
        norm = optax.tree.norm(params[name]["kernel"])
        out[f"{name}/weight_norm"] = norm
        if normalized:
            out[f"{name}/effective_lr"] = jnp.asarray(ctx.lr, jnp.float32) / jnp.square(norm)
    return out
