"""The built-in diagnostics' config fields under `diagnostics`, and their checks.

Declared apart from the measurements (`activations`, `landscape`, `hessian`, `init_gradients`):
no JAX here, so a config validates before JAX loads. The registry (`bnlab.diagnostics`) adds
each diagnostic's fields to the `diagnostics` group.
"""

from __future__ import annotations

from typing import Any

from bnlab import schema
from bnlab.nn import norms
from bnlab.schema import field


def split_names(text: str) -> tuple[str, ...]:
    """The non-empty, stripped, comma-separated names of `text`, in order, without repeats."""
    return tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))


ACTIVATIONS = {
    "activations_unit": field(
        -1,
        "activations: -1 pools every unit of a block; >= 0 follows that unit only (its first "
        "spatial position in conv blocks)",
        check=lambda v: None if v >= -1 else "must be -1 (every unit) or a unit index >= 0",
    ),
}

SCALES = ("lr", "lr_now", "absolute")
UNITS = ("raw", "scale_invariant")


def _step_sizes_problem(v: tuple) -> str | None:
    ok = len(v) > 0 and all(isinstance(s, int | float) and s > 0 for s in v)
    return None if ok else "must be a non-empty tuple of step sizes > 0"


LANDSCAPE = {
    # Santurkar et al. (2018), App. A.2.2: steps of 1/2 to 4 times the training step size.
    "landscape_step_sizes": field(
        (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0),
        "landscape: step sizes eta along -grad (default: Santurkar et al.'s 1/2 to 4 times the "
        "learning rate)",
        check=_step_sizes_problem,
    ),
    "landscape_scale": field(
        "lr",
        'landscape: "lr" (step sizes are multiples of the run\'s peak learning rate) | "lr_now" '
        '(of the learning rate in force at that step) | "absolute"',
        choices=SCALES,
    ),
    "landscape_units": field(
        "raw",
        'landscape: "raw" | "scale_invariant" (the loss in coordinates u = w / ||W|| for each '
        "kernel that feeds a normalization: unchanged when such a kernel is rescaled; "
        'pair it with landscape_scale="absolute")',
        choices=UNITS,
    ),
}

STATISTICS = ("batch", "running")

HESSIAN = {
    "hessian_top_k": field(5, "hessian: how many top eigenvalues", check=schema.at_least(1)),
    "hessian_num_iters": field(
        20,
        "hessian: Lanczos iterations per probe (>= top_k; quadrature nodes of the density)",
        check=schema.positive,
    ),
    "hessian_num_probes": field(
        2,
        "hessian: random start vectors; the first gives the top eigenvalues, all the density",
        check=schema.at_least(1),
    ),
    "hessian_statistics": field(
        "batch",
        'hessian: BN normalizes with "batch" statistics (as in training) | "running" ones '
        "(population statistics, as in Ghorbani et al. 2019)",
        choices=STATISTICS,
    ),
    "hessian_units": field(
        "raw",
        'hessian: "raw" | "scale_invariant" (each kernel that feeds a normalization scaled '
        "by its norm: the eigenvalues of D H D, unchanged when such a kernel is rescaled where "
        "batch statistics follow it; see weight_norms.in_units)",
        choices=UNITS,
    ),
}


def hessian_check(d: Any) -> list[str]:
    """Problems across the hessian fields of the `diagnostics` group."""
    if d.hessian_top_k > d.hessian_num_iters:
        return [
            f"diagnostics.hessian_top_k={d.hessian_top_k} exceeds diagnostics.hessian_num_iters="
            f"{d.hessian_num_iters}: Lanczos gives at most one eigenvalue per iteration; raise "
            "num_iters or lower top_k"
        ]
    return []


HESSIAN_DATA = {
    "hessian_data_batch_size": field(
        128,
        "hessian_data: examples normalized together (as a training step sees them); the loss "
        "is the mean over diagnostics.batch_size / this many batches",
        check=schema.positive,
    ),
    "hessian_data_num_iters": field(
        90, "hessian_data: Lanczos iterations per probe", check=schema.positive
    ),
    "hessian_data_num_probes": field(
        4,
        "hessian_data: random start vectors; the first gives the top eigenvalues and their "
        "eigenspace, all the density and the bulk's edge",
        check=schema.at_least(1),
    ),
    "hessian_data_top_k": field(
        10, "hessian_data: how many top eigenvalues", check=schema.at_least(1)
    ),
    "hessian_data_bulk_weight": field(
        10.0,
        "hessian_data: the bulk's edge is the largest quadrature node that stands for at least "
        "this many eigenvalues (weight >= this / number of parameters)",
        check=schema.positive,
    ),
    "hessian_data_units": field(
        "raw", 'hessian_data: "raw" | "scale_invariant" (as hessian_units)', choices=UNITS
    ),
}


def hessian_data_check(d: Any) -> list[str]:
    """Problems across the hessian_data fields (and the batch they split)."""
    out = []
    if d.hessian_data_top_k > d.hessian_data_num_iters:
        out.append(
            f"diagnostics.hessian_data_top_k={d.hessian_data_top_k} exceeds "
            f"diagnostics.hessian_data_num_iters={d.hessian_data_num_iters}; raise num_iters or "
            "lower top_k"
        )
    if d.batch_size % d.hessian_data_batch_size:
        out.append(
            f"diagnostics.batch_size={d.batch_size} is not a multiple of "
            f"diagnostics.hessian_data_batch_size={d.hessian_data_batch_size}: the data Hessian "
            "averages whole batches (e.g. batch_size=10240 with 128 gives 80 batches)"
        )
    return out


def _norms_problem(text: str) -> str | None:
    names = split_names(text)
    unknown = [n for n in names if n not in norms.NORMS]
    if not names or unknown:
        return (
            f"must name registered normalizations, comma-separated (unknown: {unknown}); "
            f"registered: {sorted(norms.NORMS)}"
        )
    return None


INIT_GRADIENTS = {
    "init_gradients_max_depth": field(
        10,
        "init_gradients: the deepest MLP, in weight layers (depths 2 to N are measured)",
        check=schema.at_least(2, "the shallowest MLP has 2 weight layers"),
    ),
    "init_gradients_width": field(
        100, "init_gradients: hidden width (100: the Fig. 1 MLP's)", check=schema.positive
    ),
    "init_gradients_norms": field(
        "batchnorm,none",
        "init_gradients: normalizations to compare (bnlab.norms names, comma-separated)",
        check=_norms_problem,
    ),
}
