"""The normalization registry: `model.norm` name -> how that normalization enters a model.

Models, training, the vmapped engine, the parallel modes, checkpoints, export and reports read
this table and never test a normalization's name. A new normalization is a pure function (in
the style of `bnlab.norm.batch_norm`), a thin layer, and one `register_norm` call, made from
inside the package or from an experiment file::

    register_norm("rms", NormSpec(layer=lambda n, axis: functools.partial(RMSNorm, eps=n.rms_eps),
                                  fields={"rms_eps": field(1e-6, "added to the mean square",
                                                           check=schema.positive)}))

Registering a different piece under a taken name is an error that names both.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from bnlab import layers, norm, schema
from bnlab.schema import ConfigError, field

ModuleDef = Any
# (cfg.norm, axis) -> a layer factory: `factory(name=...)` is a linen module called as
# `layer(x, use_running_average=...)`. `axis` holds `axis_name`/`axis_index_groups` for a
# normalization with batch statistics in a multi-device run, else nothing.
LayerBuilder = Callable[[Any, dict[str, Any]], ModuleDef]


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How one normalization is built, configured, checked and exported."""

    layer: LayerBuilder
    doc: str = ""  # one line, for the config reference and reports
    # Its own config fields under `norm` (`schema.field(default, doc, check=...)`).
    fields: Mapping[str, dataclasses.Field] = dataclasses.field(default_factory=dict)
    # Statistics over the batch: across devices through `axis_name` in pmap/sharded runs.
    batch_stats: bool = False
    # Problems of the config when this normalization is selected (see `problems`).
    check: Callable[..., list[str]] | None = None
    # PyTorch export: (module key, params, stats, cfg.norm, shape) -> state_dict entries; None
    # when PyTorch has no such layer (`bnlab export --format torch` then exits 2 saying so).
    torch: Callable[..., dict[str, Any]] | None = None
    # Float fields that a vmapped sweep may vary within one compiled program.
    injected: tuple[str, ...] = ()
    # (cfg.norm, step) -> scalars logged with the training metrics at that step (e.g. a
    # schedule's current value), or None.
    step_metrics: Callable[[Any, Any], dict[str, Any]] | None = None
    origin: str = ""  # where it was registered (file:line), set by `register_norm`


# Fields every normalization shares (those with batch statistics read momentum/convention).
BASE_FIELDS: dict[str, dataclasses.Field] = {
    "momentum": field(
        0.99,
        "weight of the old running statistics (flax convention)",
        check=lambda v: schema.unit_interval(v) and "must lie in [0, 1] (weight of old statistics)",
    ),
    "epsilon": field(1e-5, "added to the variance", check=schema.positive),
    "convention": field(
        "flax", 'running variance "flax" (biased) | "torch" (unbiased)', choices=norm.CONVENTIONS
    ),
    "backward": field(
        "analytic",
        'BN gradient: "analytic" (closed-form custom VJP) | "autodiff"',
        choices=norm.BACKWARDS,
    ),
}

NORMS: dict[str, NormSpec] = {}


def register_norm(name: str, spec: NormSpec) -> NormSpec:
    """Adds `spec` under `name`; returns it. The same registration run again (an experiment
    file imported twice) replaces itself; another piece under a taken name is a `ValueError`."""
    caller = inspect.stack()[1]
    spec = dataclasses.replace(spec, origin=f"{caller.filename}:{caller.lineno}")
    old = NORMS.get(name)
    if old is not None and old.origin != spec.origin:
        raise ValueError(
            f"normalization {name!r} is already registered (at {old.origin}); the one at "
            f"{spec.origin} needs another name."
        )
    taken = {k: n for n, s in NORMS.items() if n != name for k in s.fields} | dict.fromkeys(
        BASE_FIELDS, "every normalization"
    )
    for key in spec.fields:
        if key in taken:
            raise ValueError(
                f"normalization {name!r} declares the config field norm.{key}, which "
                f"{taken[key]!r} already declares; give it another name."
            )
    NORMS[name] = spec
    norm_config_class.cache_clear()
    return spec


def get(name: str) -> NormSpec:
    """The spec registered under `name`; a `ConfigError` listing the known names otherwise."""
    if name not in NORMS:
        raise ConfigError(
            f"model.norm={name!r} is not one of {sorted(NORMS)} (the registered normalizations; "
            "an experiment file may register its own with bnlab.norms.register_norm)."
        )
    return NORMS[name]


@functools.cache
def norm_config_class() -> type:
    """The frozen dataclass of the `norm` group: the shared fields, then each registered
    normalization's own (rebuilt when the registry changes)."""
    specs = [("", BASE_FIELDS), *((n, s.fields) for n, s in NORMS.items())]
    fields = [
        (key, f.metadata.get("type") or _type_of(f.default), _copy(f))
        for _, group in specs
        for key, f in group.items()
    ]
    return dataclasses.make_dataclass("NormConfig", fields, frozen=True)


def _type_of(default: Any) -> type:
    return tuple if isinstance(default, tuple) else type(default)


def _copy(f: dataclasses.Field) -> dataclasses.Field:
    # A Field object may belong to one class only; every rebuild gets fresh ones.
    return dataclasses.field(default=f.default, metadata=f.metadata)


def problems(cfg: Any, *, widths: tuple[int, ...], per_device_batch: int) -> list[str]:
    """What the selected normalization finds wrong with `cfg` (e.g. a group count that does not
    divide a layer's width); `widths` are the features at each normalization site."""
    spec = NORMS.get(cfg.model.norm)
    if spec is None or spec.check is None:
        return []
    return spec.check(cfg.norm, widths=widths, per_device_batch=per_device_batch)


def build(cfg: Any, axis: dict[str, Any] | None = None) -> ModuleDef:
    """The layer factory of `cfg.model.norm` from `cfg.norm`; `axis` (axis_name and groups)
    reaches only normalizations with batch statistics."""
    spec = get(cfg.model.norm)
    return spec.layer(cfg.norm, dict(axis or {}) if spec.batch_stats else {})


# --- the built-in normalizations -------------------------------------------------------------


def _batchnorm(n, axis, **extra) -> ModuleDef:
    return functools.partial(
        layers.BatchNorm,
        momentum=n.momentum,
        epsilon=n.epsilon,
        convention=n.convention,
        backward=n.backward,
        **axis,
        **extra,
    )


def torch_batchnorm(key: str, params: dict, stats: dict, n, shape, *, step: int) -> dict:
    """`torch.nn.BatchNorm{1,2}d` entries: weight/bias (if affine), running_mean/var, and
    `num_batches_tracked` (a 0-d int64, as PyTorch stores it)."""
    import numpy as np

    del n, shape  # BN's entries do not depend on them
    out = {f"{key}.weight": params["scale"]} if "scale" in params else {}
    if "bias" in params:
        out[f"{key}.bias"] = params["bias"]
    out[f"{key}.running_mean"] = stats["mean"]
    out[f"{key}.running_var"] = stats["var"]
    out[f"{key}.num_batches_tracked"] = np.asarray(step, np.int64)
    return out


register_norm(
    "batchnorm",
    NormSpec(
        layer=_batchnorm,
        doc="batch normalization (Ioffe & Szegedy 2015)",
        batch_stats=True,
        torch=torch_batchnorm,
    ),
)
register_norm("none", NormSpec(layer=lambda n, axis: layers.Identity, doc="no normalization"))
