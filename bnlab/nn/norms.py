"""The normalization registry: `model.norm` name -> how that normalization enters a model.

Models, training, the vmapped engine, the parallel modes, checkpoints, export and reports read
this table and never test a normalization's name. A new normalization is a pure function (in
the style of `bnlab.norm.batch_norm`), a thin layer, and one `register_norm` call, made from
inside the package or from an experiment file::

    register_norm("rms", NormSpec(layer=lambda n, axis: functools.partial(RMSNorm, eps=n.rms_eps),
                                  fields={"rms_eps": field(1e-6, "added to the mean square",
                                                           check=schema.positive)}))

A normalization of weights (`weightnorm`, `ws_groupnorm`) also sets `NormSpec.kernel`: the
models then reparameterize the kernel of each layer that feeds a normalization site with it.
The table and `NormSpec` live in `bnlab.nn.norm_spec`; this module re-exports them. Registering
a different piece under a taken name is an error that names both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from bnlab import schema
from bnlab.nn.norm_checks import batches_of, ghost_check, groupnorm_check
from bnlab.nn.norm_spec import (  # noqa: F401 - the registry's public names, re-exported
    BASE_FIELDS,
    NORMS,
    KernelBuilder,
    LayerBuilder,
    ModuleDef,
    NNXBuilder,
    NNXKernelBuilder,
    NormSpec,
    get,
    norm_config_class,
    register_norm,
    unregister_norm,
)
from bnlab.nn.torch_state import torch_batchnorm, torch_groupnorm, torch_layernorm
from bnlab.schema import field


def problems(
    cfg: Any,
    *,
    widths: tuple[int, ...],
    per_device_batch: int,
    diagnostic_batch: int | None = None,
) -> list[str]:
    """What the selected normalization finds wrong with `cfg` (e.g. a group count that does not
    divide a layer's width), before anything runs.

    Args:
      cfg: the config.
      widths: the features at each normalization site.
      per_device_batch: the examples of a training step on one device.
      diagnostic_batch: the examples of the diagnostics' fixed batch, which they normalize
        with its own statistics (None when the run measures no diagnostic).

    Returns:
      The messages of the selected normalization's `check`, given every batch the run
      normalizes (`norm_checks.Batch`), and a diagnostic batch of one example for a
      normalization with batch statistics (refused as in training, unless
      `norm.allow_single_value`).
    """
    spec = NORMS.get(cfg.model.norm)
    if spec is None:
        return []
    found = []
    if spec.batch_stats and diagnostic_batch == 1 and not cfg.norm.allow_single_value:
        found.append(
            f"diagnostics.batch_size=1 gives model.norm={cfg.model.norm!r} one example per "
            "statistic in the diagnostics' training-mode passes: every dense layer's variance "
            "is 0 and its output the bias; use a larger diagnostics.batch_size or set "
            "norm.allow_single_value=true"
        )
    if spec.check is not None:
        batches = batches_of(per_device_batch, diagnostic_batch)
        found += spec.check(cfg.norm, widths=widths, batches=batches)
    return found


def build(cfg: Any, axis: dict[str, Any] | None = None) -> ModuleDef:
    """The layer factory of `cfg.model.norm` from `cfg.norm`; `axis` (axis_name and groups)
    reaches only normalizations with batch statistics."""
    spec = get(cfg.model.norm)
    return spec.layer(cfg.norm, dict(axis or {}) if spec.batch_stats else {})


def build_kernel(cfg: Any) -> ModuleDef | None:
    """The kernel normalization factory of `cfg.model.norm` (`NormSpec.kernel`), for a model's
    `kernel_norm`; None for a normalization that acts on outputs alone."""
    spec = get(cfg.model.norm)
    return None if spec.kernel is None else spec.kernel(cfg.norm)


# --- the built-in normalizations -------------------------------------------------------------
# Each builds its layer from a module of layers, `bnlab.nn.layers` (linen) or
# `bnlab.nn.nnx_variants` (NNX), whose classes have the same names and options.

LayerOf = Callable[[Any, dict[str, Any], Any], ModuleDef]  # (cfg.norm, axis, module) -> factory


def _built_by(layer: LayerOf) -> dict[str, Any]:
    """`NormSpec`'s `layer` and `nnx` builders from one `layer(n, axis, module)`; Flax is
    imported when a layer is first built, not when a config is validated."""

    def linen(n, axis):
        from bnlab.nn import layers

        return layer(n, axis, layers)

    def nnx(n, num_features, axis, rngs):
        from bnlab.nn import nnx_variants

        return layer(n, axis, nnx_variants)(num_features, rngs=rngs)

    return {"layer": linen, "nnx": nnx}


KernelOf = Callable[[Any, Any], ModuleDef]  # (cfg.norm, module) -> kernel normalization factory


def _kernel_by(kernel: KernelOf) -> dict[str, Any]:
    """`NormSpec`'s `kernel` and `nnx_kernel` builders from one `kernel(n, module)`, as
    `_built_by` builds `layer` and `nnx`."""

    def linen(n):
        from bnlab.nn import layers

        return kernel(n, layers)

    def nnx(n, initial_kernel, rngs):
        from bnlab.nn import nnx_variants

        return kernel(n, nnx_variants)(initial_kernel, rngs=rngs)

    return {"kernel": linen, "nnx_kernel": nnx}


def _groupnorm(n, axis, m) -> ModuleDef:
    return functools.partial(m.GroupNorm, num_groups=n.num_groups, epsilon=n.epsilon)


def _batchnorm(n, axis, layer: type, **extra) -> ModuleDef:
    """A `BatchNorm` (or a variant) with the shared fields of `n`."""
    return functools.partial(
        layer,
        momentum=n.momentum,
        epsilon=n.epsilon,
        convention=n.convention,
        backward=n.backward,
        allow_single_value=n.allow_single_value,
        **axis,
        **extra,
    )


def _renorm_schedule(n) -> dict[str, Any]:
    """`bnlab.norm.renorm_schedule`'s arguments from the `norm` config group."""
    return {
        "r_max": n.r_max,
        "d_max": n.d_max,
        "warmup_steps": n.renorm_warmup_steps,
        "r_max_steps": n.r_max_steps,
        "d_max_steps": n.d_max_steps,
    }


def _renorm_metrics(n, step) -> dict[str, Any]:
    from bnlab.ops import renorm_schedule  # at run time: a config validates without JAX

    r_max, d_max = renorm_schedule(step, **_renorm_schedule(n))
    return {"renorm_r_max": r_max, "renorm_d_max": d_max}


def _count_field(default: int, doc: str) -> dataclasses.Field:
    return field(default, doc, check=schema.non_negative)


register_norm(
    "batchnorm",
    NormSpec(
        **_built_by(lambda n, axis, m: _batchnorm(n, axis, m.BatchNorm)),
        doc="batch normalization (Ioffe & Szegedy 2015)",
        batch_stats=True,
        torch=torch_batchnorm,
        injected=("momentum",),
    ),
)
register_norm(
    "none",
    NormSpec(
        **_built_by(lambda n, axis, m: m.Identity),
        doc="no normalization",
        torch=lambda *args, **kwargs: {},  # no layer, nothing to write
    ),
)
register_norm(
    "batchnorm_noaffine",
    NormSpec(
        **_built_by(
            lambda n, axis, m: _batchnorm(n, axis, m.BatchNorm, use_scale=False, use_bias=False)
        ),
        doc="batch normalization without gamma and beta",
        batch_stats=True,
        torch=torch_batchnorm,
        injected=("momentum",),
    ),
)
register_norm(
    "ghost_batchnorm",
    NormSpec(
        **_built_by(
            lambda n, axis, m: _batchnorm(
                n, axis, m.GhostBatchNorm, virtual_batch_size=n.virtual_batch_size
            )
        ),
        doc="ghost batch normalization over virtual batches (Hoffer et al. 2017)",
        fields={
            "virtual_batch_size": field(
                32,
                "ghost_batchnorm: examples per virtual batch; must divide the per-device batch",
                check=schema.positive,
            ),
        },
        batch_stats=True,
        check=ghost_check,
        injected=("momentum",),
    ),
)
register_norm(
    "batch_renorm",
    NormSpec(
        **_built_by(lambda n, axis, m: _batchnorm(n, axis, m.BatchRenorm, **_renorm_schedule(n))),
        doc="batch renormalization (Ioffe 2017)",
        fields={
            "r_max": field(
                3.0,
                "batch_renorm: final bound of r, reached by the schedule (paper: 3)",
                check=schema.at_least(1, "r_max=1 is plain BN"),
            ),
            "d_max": field(
                5.0,
                "batch_renorm: final bound of |d|, reached by the schedule (paper: 5)",
                check=schema.non_negative,
            ),
            # The paper's 5k / 40k / 25k steps divided by 50: a default run (2 epochs at batch
            # 128, 936 steps) relaxes fully, r_max at step 800 and d_max at step 500.
            "renorm_warmup_steps": _count_field(
                100, "batch_renorm: steps of plain BN (r_max=1, d_max=0) first (paper: 5000)"
            ),
            "r_max_steps": _count_field(
                700, "batch_renorm: steps of the linear ramp of r_max after the warm-up"
            ),
            "d_max_steps": _count_field(
                400, "batch_renorm: steps of the linear ramp of d_max after the warm-up"
            ),
        },
        batch_stats=True,
        injected=("momentum", "r_max", "d_max"),
        step_metrics=_renorm_metrics,
    ),
)
register_norm(
    "noisy_batchnorm",
    NormSpec(
        **_built_by(
            lambda n, axis, m: _batchnorm(
                n, axis, m.NoisyBatchNorm, noise_mean=n.noise_mean, noise_std=n.noise_std
            )
        ),
        doc='"noisy" BN: BN then noise of random mean and variance each step (Santurkar et al.)',
        fields={
            # Of the order of the unit-variance BN output, so the shift is severe on purpose.
            "noise_mean": field(
                0.5,
                "noisy_batchnorm: per-feature noise means are drawn from U(-noise_mean, "
                "noise_mean) each step",
                check=schema.non_negative,
            ),
            "noise_std": field(
                1.0,
                "noisy_batchnorm: per-feature noise standard deviations are drawn from "
                "U(0, noise_std) each step",
                check=schema.non_negative,
            ),
        },
        batch_stats=True,
        injected=("momentum", "noise_mean", "noise_std"),
    ),
)
register_norm(
    "population_batchnorm",
    NormSpec(
        **_built_by(lambda n, axis, m: _batchnorm(n, axis, m.PopulationBatchNorm)),
        doc="BN normalizing with the running statistics in training too (Ghorbani et al. 2019)",
        batch_stats=True,
        injected=("momentum",),
    ),
)
register_norm(
    "population_batchnorm_data",
    NormSpec(
        # The running statistics never move by themselves (momentum 1: all weight on the old
        # statistics); the training loop replaces them with the data's (`refresh`).
        **_built_by(
            lambda n, axis, m: functools.partial(
                _batchnorm(n, axis, m.PopulationBatchNorm), momentum=1.0
            )
        ),
        doc="population BN with statistics computed from the data: the exact mean and variance "
        "of each layer's inputs over norm.refresh_examples training examples, recomputed with "
        "the current weights every norm.refresh_every steps of each epoch",
        fields={
            "refresh_every": field(
                100,
                "population_batchnorm_data: recompute the statistics at each epoch's first step "
                "and every N steps after it",
                check=schema.positive,
            ),
            "refresh_examples": field(
                1024,
                "population_batchnorm_data: over the first N training examples",
                check=schema.positive,
            ),
        },
        batch_stats=True,
        refresh=lambda n: (n.refresh_every, n.refresh_examples),
    ),
)
register_norm(
    "batchnorm_stopgrad",
    NormSpec(
        **_built_by(lambda n, axis, m: _batchnorm(n, axis, m.BatchNormStopGrad)),
        doc="BN without gradient through the batch statistics (an ablation of BN's backward)",
        batch_stats=True,
        torch=torch_batchnorm,  # BN's values: PyTorch's BatchNorm evaluates it exactly
        injected=("momentum",),
    ),
)
register_norm(
    "layernorm",
    NormSpec(
        **_built_by(lambda n, axis, m: functools.partial(m.LayerNorm, epsilon=n.epsilon)),
        doc="layer normalization over all non-batch axes (Ba et al. 2016)",
        torch=torch_layernorm,
    ),
)
register_norm(
    "groupnorm",
    NormSpec(
        **_built_by(_groupnorm),
        doc="group normalization (Wu & He 2018)",
        fields={
            "num_groups": field(
                32,
                "groupnorm: channel groups per layer (a layer with fewer channels uses one per "
                "channel); must divide the others' channels",
                check=schema.positive,
            ),
        },
        check=groupnorm_check,
        torch=torch_groupnorm,
    ),
)
# The normalizations of weights: each wraps the kernel of the layer before every site
# (`NormSpec.kernel`); the site's own layer is the identity, or GroupNorm after WS.
register_norm(
    "weightnorm",
    NormSpec(
        **_built_by(lambda n, axis, m: m.Identity),
        **_kernel_by(lambda n, m: m.WeightNorm),
        doc="weight normalization w = g v / ||v|| of each kernel (Salimans & Kingma 2016)",
    ),
)
register_norm(
    "ws_groupnorm",
    NormSpec(
        **_built_by(_groupnorm),
        **_kernel_by(lambda n, m: functools.partial(m.WeightStandardization, epsilon=n.ws_epsilon)),
        doc="weight standardization of each kernel, then group normalization (Qiao et al. 2019)",
        fields={
            # Negligible beside a kernel's variance (1/fan-in >= 3e-4 at the fan-in scaled
            # inits, 1e-4 at the paper MLP's std 0.01), so w_hat has unit variance to float32
            # precision; the authors' PyTorch code adds 1e-5 to the unbiased std instead.
            "ws_epsilon": field(
                1e-8,
                "ws_groupnorm: added to each output unit's kernel variance (weight "
                "standardization; the groups are norm.num_groups)",
                check=schema.positive,
            ),
        },
        check=groupnorm_check,
    ),
)
