"""`activations`: the distribution of every block's nonlinearity input (Ioffe & Szegedy 2015,
Fig. 1b,c, at every normalization site instead of one unit of the last layer)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from bnlab.diagnostics.common import measurement_rngs
from bnlab.nn import models
from bnlab.schema import ConfigError
from bnlab.types import Array

PERCENTILES = (15, 50, 85)


def nonlinearity_inputs(ctx: Any) -> dict[str, Array]:
    """`{block path: the input of its nonlinearity}` on the fixed batch, in training mode
    (batch statistics, as the training step sees it; the running statistics are untouched)."""
    _, state = ctx.model.apply(
        {"params": ctx.state.params, "batch_stats": ctx.state.batch_stats},
        ctx.batch[0],
        train=True,
        mutable=["intermediates", "batch_stats"],
        rngs=measurement_rngs(ctx.rng),
    )
    flat = traverse_util.flatten_dict(state.get("intermediates", {}))
    return {
        "/".join(path[:-1]): value[0] for path, value in flat.items() if path[-1] == models.PROBE
    }


def measure(ctx: Any) -> dict[str, Array]:
    """Per block `b`: `b/mean`, `b/std` and `b/p15`, `b/p50`, `b/p85` of the nonlinearity's
    input over the batch (and units and positions, unless `diagnostics.activations_unit`
    picks one unit).

    Raises:
      ConfigError: the model sows no nonlinearity input, or the unit exceeds a block's width.
    """
    inputs = nonlinearity_inputs(ctx)
    if not inputs:
        raise ConfigError(
            f"the activations diagnostic needs a model whose blocks sow {models.PROBE!r} "
            "(bnlab.models.PROBE); remove it from diagnostics.names."
        )
    unit = ctx.cfg.diagnostics.activations_unit
    out = {}
    for block, x in inputs.items():
        values = _unit_values(x, unit, block) if unit >= 0 else x.reshape(-1)
        values = values.astype(jnp.float32)
        out[f"{block}/mean"] = jnp.mean(values)
        out[f"{block}/std"] = jnp.std(values)
        for q, p in zip(PERCENTILES, jnp.percentile(values, jnp.array(PERCENTILES)), strict=True):
            out[f"{block}/p{q}"] = p
    return out


def _unit_values(x: Array, unit: int, block: str) -> Array:
    if unit >= x.shape[-1]:
        raise ConfigError(
            f"diagnostics.activations_unit={unit} but block {block!r} has {x.shape[-1]} units; "
            "choose a smaller unit or -1 (every unit)."
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])[:, 0, unit]
