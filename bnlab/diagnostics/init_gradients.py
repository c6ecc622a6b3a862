"""`init_gradients`: per-layer gradient norms at initialization of MLPs of growing depth, with
and without normalization (Yang et al. 2019: with BN they explode exponentially with depth)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnlab.diagnostics.common import call_order, measurement_rngs, model_loss, split_names
from bnlab.nn import models, norms
from bnlab.types import Array

ModuleDef = Any
LECUN_NORMAL = nn.initializers.lecun_normal()


def init_gradient_norms(
    norm: ModuleDef,
    *,
    depth: int,
    width: int,
    images: Array,
    labels: Array,
    key: Array,
    num_classes: int,
    act: Callable[[Array], Array] = nn.relu,
    kernel_init: Callable = LECUN_NORMAL,
    placement: str = "before",
    kernel_norm: ModuleDef | None = None,
) -> Array:
    """`||dL/dW_l||_F` of every weight layer of a freshly initialized MLP (Yang et al. 2019).

    The MLP is `bnlab.models.MLP` with `depth - 1` hidden layers of `width` units, each
    followed by `norm` and `act`, and a linear head: `depth` weight matrices `W_1..W_depth`.
    `L` is the mean cross-entropy on `(images, labels)` with batch statistics (training mode).
    Yang et al. predict `||dL/dW_l||` growing like `lambda^(depth - l)` with BN, `lambda > 1`.

    Args:
      norm: the normalization layer factory (`bnlab.norms.build`'s kind; `Identity` for none).
      depth: weight layers, >= 2.
      width: hidden units per layer.
      images, labels: the batch.
      key: the initialization key (the same key gives the same kernels whatever `norm`).
      num_classes: outputs of the head.
      act, kernel_init, placement, kernel_norm: as `bnlab.models.MLP` (`kernel_norm`: the
        normalization of the hidden layers' kernels, `bnlab.norms.build_kernel`'s kind).

    Returns:
      `f32[depth]`: the first layer's kernel gradient norm first, the head's last.
    """
    model = models.MLP(
        norm=norm,
        hidden=(width,) * (depth - 1),
        num_classes=num_classes,
        act=act,
        placement=placement,
        kernel_init=kernel_init,
        kernel_norm=kernel_norm,
    )
    variables = model.init(key, images, train=False)
    loss = model_loss(
        model,
        variables.get("batch_stats", {}),
        images,
        labels,
        train=True,
        rngs=measurement_rngs(key),
    )
    grads = jax.grad(loss)(variables["params"])
    layers = [n for n in call_order(model, variables, images) if "kernel" in grads.get(n, {})]
    return jnp.stack([jnp.linalg.norm(grads[n]["kernel"]) for n in layers])


def measure(ctx: Any) -> dict[str, Array]:
    """`<norm>/depth<d>`: `f32[d]` per-layer gradient norms, for each normalization of
    `diagnostics.init_gradients_norms` and each depth `2..init_gradients_max_depth`, with the
    run's activation, initialization and placement (`cfg.model`), its `cfg.norm` settings,
    and the fixed batch. Depth `d` uses one key for every normalization."""
    d, m = ctx.cfg.diagnostics, ctx.cfg.model
    images, labels = ctx.batch
    kwargs = {
        "width": d.init_gradients_width,
        "images": images,
        "labels": labels,
        "num_classes": ctx.model.num_classes,
        "act": models.ACTIVATIONS[m.activation],
        "kernel_init": models.INITS[m.init](m.init_std),
        "placement": m.placement,
    }
    out = {}
    for name in split_names(d.init_gradients_norms):
        spec = norms.get(name)
        norm = spec.layer(ctx.cfg.norm, {})
        kernel_norm = spec.kernel(ctx.cfg.norm) if spec.on_kernel else None
        for depth in range(2, d.init_gradients_max_depth + 1):
            key = jax.random.fold_in(ctx.rng, depth)
            out[f"{name}/depth{depth}"] = init_gradient_norms(
                norm, depth=depth, key=key, kernel_norm=kernel_norm, **kwargs
            )
    return out
