"""`probe`: Ioffe & Szegedy (2015), Fig. 1b,c. The 15th/50th/85th percentiles, over a whole
evaluated split and with the running statistics, of the input to one unit's nonlinearity in
the last hidden layer.

Unlike the diagnostics measured on the fixed training batch, this one is measured in
evaluation: `collect` picks the unit's values out of each evaluation batch, `reduce` takes the
percentiles over the split, and the split's records (`test`, `validation`) carry them as
`act_p15`, `act_p50`, `act_p85`. A run selects it with `train.probe_unit >= 0`.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from bnlab.nn import models
from bnlab.schema import ConfigError
from bnlab.types import Array

PERCENTILES = (15, 50, 85)


def selected(cfg: Any) -> int | None:
    """The unit that `cfg` probes, or None."""
    return cfg.train.probe_unit if cfg.train.probe_unit >= 0 else None


def collect(intermediates: dict, mask: Array, unit: int) -> Array:
    """The unit's nonlinearity input in the last hidden block of one evaluation batch (its
    first spatial position in conv blocks); NaN on padded rows.

    Raises:
      ConfigError: the model sows no nonlinearity input, or `unit` exceeds the layer's width.
    """
    blocks = [v for v in intermediates.get("intermediates", {}).values() if models.PROBE in v]
    if not blocks:
        raise ConfigError("train.probe_unit needs a model whose blocks have a nonlinearity.")
    (x,) = blocks[-1][models.PROBE]
    x = x.reshape(x.shape[0], -1, x.shape[-1])[:, 0]
    if unit >= x.shape[-1]:
        raise ConfigError(
            f"train.probe_unit={unit} but the last hidden layer has {x.shape[-1]} units; "
            "choose a smaller unit."
        )
    return jnp.where(mask, x[:, unit], jnp.nan)


def reduce(values: Array, unit: int) -> dict[str, Array]:
    """`act_p15`, `act_p50`, `act_p85` of the split's collected values (padding is NaN)."""
    del unit
    percentiles = jnp.nanpercentile(values.reshape(-1), jnp.array(PERCENTILES))
    return {f"act_p{q}": p for q, p in zip(PERCENTILES, percentiles, strict=True)}
