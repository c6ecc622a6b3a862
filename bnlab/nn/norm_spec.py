"""The normalization registry's table and its entries' type: `NormSpec`, the fields every
normalization shares, `register_norm`, `get`. `bnlab.nn.norms` registers the built-in
normalizations in it and re-exports these names; import them from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from bnlab import schema
from bnlab.registry import Registry
from bnlab.schema import field

ModuleDef = Any
# (cfg.norm, axis) -> a layer factory: `factory(name=...)` is a linen module called as
# `layer(x, use_running_average=...)`. `axis` holds `axis_name`/`axis_index_groups` for a
# normalization with batch statistics in a multi-device run, else nothing.
LayerBuilder = Callable[[Any, dict[str, Any]], ModuleDef]
# (cfg.norm, num_features, axis, rngs) -> a Flax NNX module called as `layer(x, rngs=...)`, in
# the mode its `use_running_average` attribute sets (`bnlab.nnx`); `axis` as for `layer`.
NNXBuilder = Callable[[Any, Any, dict[str, Any], Any], Any]
# cfg.norm -> a linen module factory: `factory(name=...)(kernel) -> kernel` (its variables, if
# any, initialized from the kernel's initial value).
KernelBuilder = Callable[[Any], ModuleDef]
# (cfg.norm, initial kernel, rngs) -> a Flax NNX module called as `module(kernel) -> kernel`.
NNXKernelBuilder = Callable[[Any, Any, Any], Any]


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How one normalization is built, configured, checked and exported."""

    layer: LayerBuilder
    doc: str = ""  # one line, for the config reference and reports
    # Its own config fields under `norm` (`schema.field(default, doc, check=...)`).
    fields: Mapping[str, dataclasses.Field] = dataclasses.field(default_factory=dict)
    # Statistics over the batch: across devices through `axis_name` in pmap/sharded runs.
    batch_stats: bool = False
    # Problems of the config when this normalization is selected: `check(cfg.norm, widths=,
    # batches=)` (see `problems`).
    check: Callable[..., list[str]] | None = None
    # PyTorch export: (module key, params, stats, cfg.norm, shape) -> state_dict entries; None
    # when PyTorch has no such layer (`bnlab export --format torch` then exits 2 saying so).
    torch: Callable[..., dict[str, Any]] | None = None
    # Float fields that a vmapped sweep may vary within one compiled program.
    injected: tuple[str, ...] = ()
    # (cfg.norm, step) -> scalars logged with the training metrics at that step (e.g. a
    # schedule's current value), or None.
    step_metrics: Callable[[Any, Any], dict[str, Any]] | None = None
    # Its Flax NNX layer, or None when it has none (`bnlab.nnx.norm_from_config` then raises a
    # ConfigError saying so). Import Flax inside the builders: a config validates without it.
    nnx: NNXBuilder | None = None
    # A normalization of weights: its action on the kernel of each layer that feeds a
    # normalization site (`bnlab.models.dense`, `Conv`), which declares it as its submodule
    # `norm` and computes with the kernel it returns; `layer` is then what normalizes the
    # site's output (`Identity` when nothing does). None: the normalization acts on outputs.
    kernel: KernelBuilder | None = None
    # Its NNX twin, or None (the NNX models then refuse the normalization).
    nnx_kernel: NNXKernelBuilder | None = None
    # Statistics computed from the data by the training loop: cfg.norm -> (every K steps,
    # over the first N training examples), recomputed with the weights of that step before it
    # trains (`bnlab.nn.recalibrate`); None: the layer keeps its own statistics.
    refresh: Callable[[Any], tuple[int, int]] | None = None
    origin: str = ""  # where it was registered (file:line), set by `register_norm`

    @property
    def on_kernel(self) -> bool:
        """Whether it reparameterizes the kernels of the layers before its sites."""
        return self.kernel is not None


# Fields every normalization shares (those with batch statistics read momentum/convention).
BASE_FIELDS: dict[str, dataclasses.Field] = {
    "momentum": field(
        0.99,
        "weight of the old running statistics (flax convention)",
        check=lambda v: schema.unit_interval(v) and "must lie in [0, 1] (weight of old statistics)",
    ),
    "epsilon": field(1e-5, "added to the variance", check=schema.positive),
    "convention": field(
        "flax",
        'running variance "flax" (biased) | "torch" (unbiased)',
        choices=("flax", "torch"),  # bnlab.ops.CONVENTIONS, named here: no JAX to validate
    ),
    "allow_single_value": field(
        False,
        "BN: allow training statistics over one value per feature (a batch of 1 in a dense "
        "layer; refused by default, as PyTorch refuses it)",
    ),
    "backward": field(
        "analytic",
        'BN gradient: "analytic" (closed-form custom VJP) | "autodiff"',
        choices=("analytic", "autodiff"),  # bnlab.ops.BACKWARDS
    ),
}

NORMS: Registry[NormSpec] = Registry(
    "normalization", "model.norm", "norm", BASE_FIELDS, "every normalization"
)
# Adds a spec under a name and returns it; the same registration again (an experiment file
# imported twice) replaces itself; a taken name or config field is a ValueError naming both.
register_norm = NORMS.register


def unregister_norm(name: str) -> NormSpec:
    """Removes `name` from the registry and returns its spec: a test or a notebook that
    registered a normalization of its own leaves the table as it found it."""
    return NORMS.pop(name)


def get(name: str) -> NormSpec:
    """The spec registered under `name`; a `ConfigError` listing the known names otherwise."""
    return NORMS.lookup(name)


def norm_config_class() -> type:
    """The frozen dataclass of the `norm` group: the shared fields, then each registered
    normalization's own (rebuilt when the registry changes)."""
    return NORMS.config_class("NormConfig")
