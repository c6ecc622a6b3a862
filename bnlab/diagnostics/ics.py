"""`ics`: internal covariate shift, Santurkar et al. (2018), Definition 2.1."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from bnlab.diagnostics.common import batch_loss, weight_layers
from bnlab.types import Array, Params


def internal_covariate_shift(
    loss_fn: Callable[[Params], Array],
    params: Params,
    updated: Params,
    *,
    order: Sequence[str],
    layers: Sequence[str],
    grads: Params | None = None,
) -> dict[str, Array]:
    """The change of each layer's gradient caused by the update of the layers before it.

    Santurkar et al. (2018), Definition 2.1: for layer `i` with weights `W_i`,

        G  = grad_{W_i} L(W_1,    ..., W_{i-1},    W_i, ..., W_k; x, y)
        G' = grad_{W_i} L(W_1',   ..., W_{i-1}',   W_i, ..., W_k; x, y)
        ics_i = ||G - G'||_2,        cos_i = <G, G'> / (||G||_2 ||G'||_2)

    where `W_j' = W_j + u_j` are the weights after the step's update `u` and `(x, y)` is the
    step's batch. `W_i` is all of the module's params (kernel and bias).

    Args:
      loss_fn: `params -> scalar loss` on the step's batch (for BN: batch statistics).
      params: the weights `W` at step t, a dict of top-level modules.
      updated: the weights `W'` after step t's update (same structure).
      order: every top-level module of `params`, in the order the forward pass calls them:
        "the layers before `i`" are the modules before it here (normalization layers too).
      layers: the modules to measure (those with weights), each in `order`.
      grads: `grad(loss_fn)(params)` if already computed.

    Returns:
      `{"<layer>/l2": f32[], "<layer>/cos": f32[]}` for each of `layers`.
    """
    grad_fn = jax.grad(loss_fn)
    grads = grad_fn(params) if grads is None else grads
    out = {}
    for layer in layers:
        before = order[: order.index(layer)]
        g = grads[layer]
        # Nothing before the first module: G' is G itself, without another backward pass.
        g_shifted = grad_fn({**params, **{n: updated[n] for n in before}})[layer] if before else g
        norm, norm_shifted = optax.tree.norm(g), optax.tree.norm(g_shifted)
        out[f"{layer}/l2"] = optax.tree.norm(optax.tree.sub(g, g_shifted))
        out[f"{layer}/cos"] = optax.tree.vdot(g, g_shifted) / (norm * norm_shifted)
    return out


def measure(ctx: Any) -> dict[str, Array]:
    """ICS of every layer with weights at the state's step, on the fixed batch.

    `G` is taken on the diagnostic batch; the update is the optimizer's actual update of
    step t (`ctx.tx.update` from that gradient and the state's optimizer state, momentum and
    adaptive scalings included); BN uses batch statistics in both gradients. The run itself
    does not advance.
    """
    loss_fn = batch_loss(ctx)
    params = ctx.state.params
    grads = jax.grad(loss_fn)(params)
    updates, _ = ctx.tx.update(grads, ctx.state.opt_state, params)
    order, layers = weight_layers(ctx)
    return internal_covariate_shift(
        loss_fn,
        params,
        optax.apply_updates(params, updates),
        order=order,
        layers=layers,
        grads=grads,
    )
