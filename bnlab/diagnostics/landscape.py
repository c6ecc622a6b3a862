"""`landscape`: how the loss and its gradient change along the gradient (Santurkar et al. 2018,
Section 3.1, Fig. 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike

from bnlab.diagnostics.common import batch_loss, learning_rate
from bnlab.diagnostics.weight_norms import in_units
from bnlab.types import Array, Params


def landscape_measures(
    loss_fn: Callable[[Params], Array],
    params: Params,
    step_sizes: ArrayLike,
    *,
    grads: Params | None = None,
) -> dict[str, Array]:
    """Loss range, gradient predictiveness and effective beta-smoothness along `-grad`.

    With `g = grad L(w)` and `w_eta = w - eta g` for each `eta` of `step_sizes`
    (Santurkar et al. 2018, Section 3.1)::

        loss_range          = max_eta L(w_eta) - min_eta L(w_eta)
        grad_predictiveness = max_eta ||grad L(w_eta) - g||_2
        beta_smoothness     = max_eta ||grad L(w_eta) - g||_2 / ||eta g||_2

    Args:
      loss_fn: `params -> scalar loss` on a fixed batch.
      params: the weights `w`.
      step_sizes: `f32[n]`, each > 0 (may be traced, e.g. a multiple of a vmapped lr).
      grads: `grad(loss_fn)(params)` if already computed.

    Returns:
      `{"loss_range", "grad_predictiveness", "beta_smoothness"}`, each `f32[]`.
    """
    g = jax.grad(loss_fn)(params) if grads is None else grads
    g_norm = optax.tree.norm(g)

    def along(eta):
        loss, grad = jax.value_and_grad(loss_fn)(jax.tree.map(lambda w, d: w - eta * d, params, g))
        return loss, optax.tree.norm(jax.tree.map(jnp.subtract, grad, g))

    etas = jnp.asarray(step_sizes, jnp.float32)
    # One step size at a time: memory stays that of one gradient, whatever the grid.
    losses, changes = lax.map(along, etas)
    return {
        "loss_range": jnp.max(losses) - jnp.min(losses),
        "grad_predictiveness": jnp.max(changes),
        "beta_smoothness": jnp.max(changes / (etas * g_norm)),
    }


def step_scale(ctx: Any) -> Array:
    """What `diagnostics.landscape_step_sizes` multiplies: the run's peak learning rate
    (`landscape_scale="lr"`), the learning rate in force at this step (`"lr_now"`: late in a
    decayed run the optimizer's own steps are that small), or 1 (`"absolute"`)."""
    scale = ctx.cfg.diagnostics.landscape_scale
    if scale == "absolute":
        return jnp.ones((), jnp.float32)
    if scale == "lr_now":
        return jnp.asarray(ctx.lr, jnp.float32)
    return jnp.asarray(learning_rate(ctx.state.opt_state), jnp.float32)


def step_sizes(ctx: Any) -> Array:
    """The grid of `diagnostics.landscape_step_sizes` times `step_scale(ctx)`."""
    grid = jnp.asarray(ctx.cfg.diagnostics.landscape_step_sizes, jnp.float32)
    return grid * step_scale(ctx)


def measure(ctx: Any) -> dict[str, Array]:
    """The landscape measures at the state's weights on the fixed batch, BN in training mode,
    and `step_scale`, the factor its step sizes were multiplied by (recorded); in
    `landscape_units="scale_invariant"`, of the loss in the coordinates `u = D^-1 w` of
    `weight_norms.in_units` (steps `u - eta grad_u`, gradients `grad_u = D grad_w`)."""
    loss_fn, params = in_units(ctx, batch_loss(ctx), ctx.cfg.diagnostics.landscape_units)
    out = landscape_measures(loss_fn, params, step_sizes(ctx))
    return {**out, "step_scale": step_scale(ctx)}
