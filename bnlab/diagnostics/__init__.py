"""The diagnostics registry: `diagnostics.names` -> measurements of a run at one step.

A diagnostic is a pure, jittable function of a `Context` (the run's model, optimizer, state at
step t, a fixed training batch and a key) that returns named arrays. It is registered by name,
from inside the package or from an experiment file::

    def weight_norm(ctx):
        return {"l2": optax.tree.norm(ctx.state.params)}

    register_diagnostic("weight_norm", DiagnosticSpec(fn=weight_norm, doc="||w||_2"))

A run selects diagnostics with `--config.diagnostics.names=ics,landscape`; `measure` returns
every selected one's arrays under `"<name>/<key>"`. Every function here is vmappable over a
leading trial axis of `state`, `rng` and the optimizer's injected hyperparameters: no host
callbacks, no Python branching on traced values, static shapes. Registering a different piece
under a taken name is an error that names both.

A diagnostic may instead be measured in evaluation, over every evaluated split with the
running statistics (`DiagnosticSpec.on_split`, a `SplitMeasure`): its arrays join the split's
records, and a config field of its own selects it rather than `diagnostics.names`.

The built-in diagnostics (docs/diagnostics.md): `activations`, `ics` (Santurkar et al. 2018),
`landscape` (Santurkar et al. 2018), `hessian` (Ghorbani et al. 2019), `hessian_data` (the
same over many batches, with its outliers), `weight_norms`, `rank`, `init_gradients`
(Yang et al. 2019), and `probe` (Ioffe & Szegedy 2015, Fig. 1b,c; in evaluation, selected by
`train.probe_unit`).

May import: the base modules, `bnlab.ops`, `bnlab.data` and `bnlab.nn`; never training (the
loop calls `measure`, not the reverse).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from bnlab import schema
from bnlab.diagnostics import fields
from bnlab.diagnostics.fields import split_names
from bnlab.registry import Registry
from bnlab.schema import ConfigError, field

if TYPE_CHECKING:
    import flax.linen as nn
    import optax

    from bnlab.types import Array

# Names of the measurement modules, imported when first read (`bnlab.diagnostics.hessian_matvec`):
# the registry and the `diagnostics` config group load without JAX.
_MEASURES = {
    "batch_loss": "common",
    "gaussian_density": "hessian",
    "hessian_eigenvalues": "hessian",
    "hessian_matvec": "hessian",
    "lanczos_quadrature": "hessian",
    "spectral_density": "hessian",
    "internal_covariate_shift": "ics",
    "init_gradient_norms": "init_gradients",
    "landscape_measures": "landscape",
}
_MODULES = ("activations", "common", "hessian", "hessian_data", "ics", "init_gradients",
            "landscape", "probe")  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _MEASURES:
        return getattr(importlib.import_module(f"{__name__}.{_MEASURES[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DIAGNOSTICS",
    "unregister_diagnostic",
    "Context",
    "batch_loss",
    "DiagnosticSpec",
    "SplitMeasure",
    "diagnostics_config_class",
    "gaussian_density",
    "get",
    "hessian_eigenvalues",
    "hessian_matvec",
    "init_gradient_norms",
    "internal_covariate_shift",
    "lanczos_quadrature",
    "landscape_measures",
    "measure",
    "measurement_key",
    "names_at",
    "parse_names",
    "problems",
    "register_diagnostic",
    "spectral_density",
    "split_measures",
]


class Context(NamedTuple):
    """What a diagnostic sees of a run at step t."""

    model: nn.Module  # model.apply(variables, images, train=bool, mutable=[...], rngs=...)
    tx: optax.GradientTransformation  # the run's optimizer: its update is the actual update
    state: Any  # bnlab.training.train.TrainState(step, params, batch_stats, opt_state) at step t
    batch: tuple[Array, Array]  # images f32[B,28,28,1] in [0, 1], labels i32[B]: fixed batch
    rng: Array  # this measurement's key (noisy normalizations draw from it)
    cfg: Any  # the run's validated Config: cfg.diagnostics.<field>, cfg.model, cfg.norm, ...
    lr: Any = None  # f32[]: the learning rate in force at step t (`bnlab.optim.lr_now`)


class SplitMeasure(NamedTuple):
    """A diagnostic measured in evaluation, over a whole split with the running statistics.

    `selected(cfg)` gives its argument for the run (None: off); `collect(intermediates, mask,
    arg)` turns one evaluation batch's sown intermediates (`mask`: the batch's real rows) into
    per-example values; `reduce(values, arg)` turns the split's stacked values into named
    scalars, which the split's records carry under these names (not `loss` or `accuracy`,
    nor another's: a clash is a ValueError). All pure and jittable.
    """

    selected: Callable[[Any], Any]
    collect: Callable[[dict, Array, Any], Array]
    reduce: Callable[[Array, Any], dict[str, Array]]


@dataclasses.dataclass(frozen=True)
class DiagnosticSpec:
    """One diagnostic: its function, config fields and checks."""

    # Pure and jittable; keys get "<name>/". None for one measured in evaluation (`on_split`).
    fn: Callable[[Context], dict[str, Array]] | None
    doc: str = ""  # one line, for the config reference and reports
    # Its own config fields under `diagnostics` (`schema.field(default, doc, check=...)`).
    fields: Mapping[str, dataclasses.Field] = dataclasses.field(default_factory=dict)
    at_init_only: bool = False  # measured once, at step 0
    # Problems of `cfg.diagnostics` that involve several fields (see `problems`), or None.
    check: Callable[[Any], list[str]] | None = None
    origin: str = ""  # where it was registered (file:line), set by `register_diagnostic`
    on_split: SplitMeasure | None = None  # measured in evaluation instead (see SplitMeasure)

    def __post_init__(self):
        if (self.fn is None) == (self.on_split is None):
            raise ValueError("a DiagnosticSpec has a `fn` or an `on_split`, exactly one of them")
        if self.on_split is not None and self.check is not None:
            raise ValueError(
                "a diagnostic measured in evaluation (`on_split`) is selected by its own field; "
                "check that field with `schema.field(check=...)` instead of `check`"
            )


def parse_names(text: str) -> tuple[str, ...]:
    """`"ics, landscape"` -> `("ics", "landscape")`; empty -> `()`.

    Raises:
      ConfigError: a name that is not registered (the message lists the registered ones), or
        one measured in evaluation (`on_split`), which its own field selects.
    """
    names = split_names(text)
    for name in names:
        if get(name).on_split is not None:
            raise ConfigError(f"diagnostics.names={text!r} {_names_problem(text)}")
    return names


def _names_problem(text: str) -> str | None:
    unknown = [n for n in split_names(text) if n not in DIAGNOSTICS]
    if unknown:
        batch = sorted(n for n, spec in DIAGNOSTICS.items() if spec.on_split is None)
        return (
            f"names unknown diagnostics {unknown}; registered: {batch} (an "
            "experiment file may register its own with bnlab.diagnostics.register_diagnostic)"
        )
    in_evaluation = [n for n in split_names(text) if DIAGNOSTICS[n].on_split is not None]
    if in_evaluation:
        docs = "; ".join(f"{n}: {DIAGNOSTICS[n].doc}" for n in in_evaluation)
        return (
            f"names {in_evaluation}, measured in evaluation rather than on the diagnostic "
            f"batch; remove it from diagnostics.names and select it with its own field ({docs})"
        )
    return None


# Fields every run has under `diagnostics`; each diagnostic adds its own.
BASE_FIELDS: dict[str, dataclasses.Field] = {
    "names": field(
        "",
        'comma-separated registered diagnostics, e.g. "ics,landscape" ("": none, no cost)',
        check=_names_problem,
    ),
    "every_steps": field(100, "measure every N optimizer steps", check=schema.positive),
    "batch_size": field(
        128,
        "the fixed diagnostic batch: the first N training examples",
        check=schema.positive,
    ),
}


DIAGNOSTICS: Registry[DiagnosticSpec] = Registry(
    "diagnostic", "diagnostics.names", "diagnostics", BASE_FIELDS, "every run"
)
# Adds a spec under a name and returns it; the same registration again (an experiment file
# imported twice) replaces itself; a taken name or config field is a ValueError naming both.
register_diagnostic = DIAGNOSTICS.register


def unregister_diagnostic(name: str) -> DiagnosticSpec:
    """Removes `name` from the registry and returns its spec: a test or a notebook that
    registered a diagnostic of its own leaves the table (and the config schema) as it found it."""
    return DIAGNOSTICS.pop(name)


def get(name: str) -> DiagnosticSpec:
    """The spec registered under `name`.

    Raises:
      ConfigError: `name` is not registered (the message lists the registered names).
    """
    return DIAGNOSTICS.lookup(name)


def diagnostics_config_class() -> type:
    """The frozen dataclass of the `diagnostics` group: the shared fields, then each
    registered diagnostic's own (rebuilt when the registry changes)."""
    return DIAGNOSTICS.config_class("DiagnosticsConfig")


def problems(diagnostics_cfg: Any) -> list[str]:
    """What the selected diagnostics find wrong with the `diagnostics` group beyond each
    field's own check (e.g. more eigenvalues asked than Lanczos iterations)."""
    out = []
    for name in split_names(diagnostics_cfg.names):
        spec = DIAGNOSTICS.get(name)
        if spec is not None and spec.check is not None:
            out += spec.check(diagnostics_cfg)
    return out


def measure(ctx: Context, names: Sequence[str]) -> dict[str, Array]:
    """Every diagnostic of `names` on `ctx`, as `{"<name>/<key>": array}`.

    Pure and jittable (`names` static); `jax.vmap` over a leading trial axis of `ctx.state`
    and `ctx.rng` gives each trial's measurements. `at_init_only` diagnostics are measured
    whenever named here: the caller names them at step 0 only.

    Raises:
      ConfigError: an unknown name, or one measured in evaluation.
    """
    out = {}
    for name in names:
        spec = get(name)
        if spec.fn is None:
            raise ConfigError(f"diagnostic {name!r} is measured in evaluation: {spec.doc}")
        for key, value in spec.fn(ctx).items():
            out[f"{name}/{key}"] = value
    return out


def split_measures(cfg: Any) -> tuple[tuple[SplitMeasure, Any], ...]:
    """The diagnostics that `cfg` selects for its evaluations, each with its argument."""
    out = []
    for spec in DIAGNOSTICS.values():
        if spec.on_split is not None and (arg := spec.on_split.selected(cfg)) is not None:
            out.append((spec.on_split, arg))
    return tuple(out)


def names_at(diagnostics_cfg: Any, step: int) -> tuple[str, ...]:
    """The selected diagnostics measured at `step`: at multiples of `every_steps`, and the
    `at_init_only` ones at step 0 alone."""
    if step % diagnostics_cfg.every_steps:
        return ()
    names = split_names(diagnostics_cfg.names)
    return tuple(n for n in names if step == 0 or not get(n).at_init_only)


def measurement_key(rng: Array, step: Array | int) -> Array:
    """The key of the measurement at `step` from the run's rng (apart from the training
    steps' streams, which fold 0 and 1 into `fold_in(rng, step)`)."""
    import jax

    return jax.random.fold_in(jax.random.fold_in(rng, step), 2)


# --- the built-in diagnostics ----------------------------------------------------------------
# Their fields and checks are in `fields`; each function is imported when first called.


def _from(module: str, name: str) -> Callable[..., Any]:
    """`bnlab.diagnostics.<module>.<name>`, imported at its first call."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args, **kwargs)

    return call


register_diagnostic(
    "activations",
    DiagnosticSpec(
        fn=_from("activations", "measure"),
        doc="every block's nonlinearity input (training mode): mean, std, 15/50/85th pct.",
        fields=fields.ACTIVATIONS,
    ),
)
register_diagnostic(
    "weight_norms",
    DiagnosticSpec(
        fn=_from("weight_norms", "measure"),
        doc="each kernel's norm; lr_t / ||W||^2 where a normalization follows (effective lr)",
    ),
)
register_diagnostic(
    "rank",
    DiagnosticSpec(
        fn=_from("rank", "measure"),
        doc="effective rank of each layer's output on the batch (rank collapse with depth)",
    ),
)
register_diagnostic(
    "ics",
    DiagnosticSpec(
        fn=_from("ics", "measure"),
        doc="internal covariate shift per weight layer (Santurkar et al. 2018, Def. 2.1)",
    ),
)
register_diagnostic(
    "landscape",
    DiagnosticSpec(
        fn=_from("landscape", "measure"),
        doc="loss range, gradient predictiveness, beta-smoothness along the gradient",
        fields=fields.LANDSCAPE,
    ),
)
register_diagnostic(
    "hessian",
    DiagnosticSpec(
        fn=_from("hessian", "measure"),
        doc="top Hessian eigenvalues (Lanczos) and spectral density (SLQ)",
        fields=fields.HESSIAN,
        check=fields.hessian_check,
    ),
)
register_diagnostic(
    "hessian_data",
    DiagnosticSpec(
        fn=_from("hessian_data", "measure"),
        doc="Hessian of the loss over many batches: top eigenvalues, bulk edge, outliers, "
        "gradient in the top eigenspace, lr*lambda_max/2",
        fields=fields.HESSIAN_DATA,
        check=fields.hessian_data_check,
    ),
)
register_diagnostic(
    "init_gradients",
    DiagnosticSpec(
        fn=_from("init_gradients", "measure"),
        doc="per-layer gradient norms at initialization of MLPs vs depth (Yang et al. 2019)",
        fields=fields.INIT_GRADIENTS,
        at_init_only=True,
    ),
)
register_diagnostic(
    "probe",
    DiagnosticSpec(
        fn=None,
        doc="percentiles of one last-layer unit's nonlinearity input over each evaluated split "
        "(Ioffe & Szegedy 2015, Fig. 1b,c); on with train.probe_unit >= 0",
        on_split=SplitMeasure(
            _from("probe", "selected"), _from("probe", "collect"), _from("probe", "reduce")
        ),
    ),
)
