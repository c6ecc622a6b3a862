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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bnlab.diagnostics.common import call_order
from bnlab.nn.model_config import NORM_MODULE
from bnlab.types import Array, Params


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


def kernel_scales(ctx: Any) -> Params:
    """A pytree like `ctx.state.params`: `||W||` (Frobenius) at each kernel that feeds a
    normalization (`weight_norms.feeds_normalization`), 1 everywhere else."""
    params = ctx.state.params
    variables = {"params": params, "batch_stats": ctx.state.batch_stats}
    order = call_order(ctx.model, variables, ctx.batch[0])
    scales = jax.tree.map(lambda x: jnp.ones((), x.dtype), params)
    for name, normalized in feeds_normalization(params, order).items():
        if normalized:
            scales[name] = {**scales[name], "kernel": optax.tree.norm(params[name]["kernel"])}
    return scales


def in_units(
    ctx: Any, loss_fn: Callable[[Params], Array], units: str
) -> tuple[Callable[[Params], Array], Params]:
    """`(loss, params)` whose Hessian is the one to measure in `units`.

    `"raw"`: `loss_fn` at `ctx.state.params`. `"scale_invariant"`: the loss of `u` with
    `w = D u`, at `u = D^-1 w`, `D` = `kernel_scales` (per kernel that feeds a normalization,
    its norm): its Hessian is `D H D` and its gradient `D g`. A kernel `W` that a
    normalization follows leaves the loss unchanged when rescaled, while its block of `H`
    scales as `1/||W||^2`; in these units the spectrum is the same for every rescaling of
    such kernels (van Laarhoven 2017; Arora et al. 2019), so a run whose kernels grow
    (BN's) and one whose kernels do not are compared on the same footing.

    Exact where the loss is invariant: batch statistics after the layer (BN and its
    batch-statistics variants, `placement="before"`). Not where it is not: a normalization
    after the nonlinearity (`placement="after"`), per-example normalizations (LayerNorm,
    GroupNorm) of a layer with a bias, or fixed statistics (`hessian_statistics="running"`,
    the population variants); there these units rescale without the invariance.
    """
    if units == "raw":
        return loss_fn, ctx.state.params
    scales = kernel_scales(ctx)

    def loss_u(u):
        return loss_fn(jax.tree.map(jnp.multiply, u, scales))

    return loss_u, jax.tree.map(jnp.divide, ctx.state.params, scales)
