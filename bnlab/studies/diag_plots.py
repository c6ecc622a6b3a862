"""The figures of a report that the runs' diagnostics call for (`"split": "diag"` records).

Any diagnostic: each scalar it logs over steps, a panel per key, a line per setting (mean +-
std over the seeds with a result). Two get their own figures as well: `hessian` (the spectral
density from its Lanczos nodes and weights, at the first, a middle and the last measurement)
and `init_gradients` (the first layer's gradient norm at initialization vs depth).
"""

from __future__ import annotations

import math
import re

import numpy as np
from matplotlib.figure import Figure

from bnlab.studies.figure_kit import Plot, _curve, _figure, _legend, _mean_std, _ok_trials
from bnlab.studies.results import Group, Sweep

MAX_PANELS = 12  # keys per figure; a diagnostic with more gets several figures
DEPTH_KEY = re.compile(r"^init_gradients/(?P<norm>[^/]+)/depth(?P<depth>\d+)$")


def figures(sweep: Sweep) -> list[Plot]:
    """Every diagnostics figure that applies to this sweep."""
    diag = [r for t in sweep.trials for r in t.diag_records]
    if not diag:
        return []
    plots = []
    for name in sorted({k.split("/", 1)[0] for r in diag for k in r if "/" in k}):
        keys = sorted({k for r in diag for k, v in r.items() if k.startswith(f"{name}/") and
                       isinstance(v, int | float)})  # fmt: skip
        if name == "init_gradients":
            plots += _plot(init_gradients(sweep), "diag_init_gradients", INIT_GRADIENTS)
            continue
        for part in range(math.ceil(len(keys) / MAX_PANELS)):
            chunk = keys[part * MAX_PANELS : (part + 1) * MAX_PANELS]
            suffix = f"_{part + 1}" if len(keys) > MAX_PANELS else ""
            plots += _plot(
                diagnostic_curves(sweep, chunk, f"{name}{suffix}"),
                f"diag_{name}{suffix}",
                (
                    f"Diagnostic `{name}` over training{suffix.replace('_', ', part ')}",
                    f"Each panel one value that `{name}` logs, vs training step: mean over the "
                    "seeds with a result (band: +- one std), a line per setting.",
                ),
            )
        if name == "hessian":
            plots += _plot(hessian_density(sweep), "diag_hessian_density", HESSIAN_DENSITY)
    return plots


def _plot(figure: Figure | None, name: str, text: tuple[str, str]) -> list[Plot]:
    return [] if figure is None else [Plot(name, text[0], text[1], figure)]


def diagnostic_curves(sweep: Sweep, keys: list[str], title: str) -> Figure | None:
    """A panel per key: its value vs step, a line per setting."""
    if not keys:
        return None
    fig, axes = _figure(len(keys), f"Diagnostic {title}")
    for ax, key in zip(axes, keys, strict=True):
        for group in sweep.groups:
            steps, mean, std = _curve(group.with_result(), key, "diag")
            if len(steps):
                (line,) = ax.plot(steps, mean, marker=".", label=group.name)
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set(title=key, xlabel="training step")
        if _spans_decades(ax):
            ax.set_yscale("log")
    _legend(axes[0])
    return fig


def _spans_decades(ax) -> bool:
    values = np.concatenate([line.get_ydata() for line in ax.get_lines()] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    return bool(len(values) and values.min() > 0 and values.max() / values.min() > 100)


HESSIAN_DENSITY = (
    "Hessian spectral density",
    "Stochastic Lanczos quadrature estimate of the training loss's Hessian eigenvalue density "
    "(Gaussian-smoothed, averaged over probes and seeds) at the first, a middle and the last "
    "measurement; outliers far from the bulk are Ghorbani et al.'s large eigenvalues.",
)


def hessian_density(sweep: Sweep) -> Figure | None:
    """A panel per setting: the smoothed spectral density at three measurements."""
    groups = [g for g in sweep.groups if any("hessian/density_nodes" in r for t in
              g.with_result() for r in t.diag_records)]  # fmt: skip
    if not groups:
        return None
    fig, axes = _figure(len(groups), "Hessian spectral density (SLQ)")
    for ax, group in zip(axes, groups, strict=True):
        steps = sorted({r["step"] for t in group.with_result() for r in t.diag_records
                        if "hessian/density_nodes" in r})  # fmt: skip
        for step in dict.fromkeys([steps[0], steps[len(steps) // 2], steps[-1]]):
            grid, density = _density(group, step)
            ax.plot(grid, density, label=f"step {step}")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1e-5)
        ax.set(title=group.name, xlabel="eigenvalue", ylabel="density")
        _legend(ax)
    return fig


def _density(group: Group, step: int) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian-smoothed SLQ density at `step`, averaged over seeds and probes; the width
    is 1% of the spectrum's span (Ghorbani et al. smooth the same way)."""
    nodes, weights = [], []
    for trial in group.with_result():
        for r in trial.diag_records:
            if r["step"] == step and "hessian/density_nodes" in r:
                nodes.append(np.asarray(r["hessian/density_nodes"], float).ravel())
                weights.append(np.asarray(r["hessian/density_weights"], float).ravel())
    nodes_all, weights_all = np.concatenate(nodes), np.concatenate(weights) / len(nodes)
    weights_all = weights_all / weights_all.sum()
    low, high = nodes_all.min(), nodes_all.max()
    span = max(high - low, 1e-12)
    grid = np.linspace(low - 0.05 * span, high + 0.05 * span, 400)
    sigma = 0.01 * span
    gauss = np.exp(-0.5 * ((grid[:, None] - nodes_all[None, :]) / sigma) ** 2)
    return grid, gauss @ weights_all / (sigma * math.sqrt(2 * math.pi))


INIT_GRADIENTS = (
    "Gradients at initialization vs depth",
    "Norm of the first weight layer's loss gradient at initialization vs the number of weight "
    "layers, mean +- std over seeds, a line per normalization (log scale); Yang et al. (2019) "
    "predict exponential growth with BN.",
)


def init_gradients(sweep: Sweep) -> Figure | None:
    """A panel per setting: ||dL/dW_1|| vs depth, a line per normalization."""
    groups = [g for g in sweep.groups if first_layer_norms(g)]
    if not groups:
        return None
    fig, axes = _figure(len(groups), "Gradient norm of the first layer at initialization")
    for ax, group in zip(axes, groups, strict=True):
        for norm, (depths, rows) in first_layer_norms(group).items():
            mean, std = _mean_std(rows)
            (line,) = ax.plot(depths, mean, marker=".", label=norm)
            ax.fill_between(depths, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set(title=group.name, xlabel="weight layers", ylabel="||dL/dW_1||")
        _legend(ax)
    return fig


def first_layer_norms(group: Group) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{norm: (depths, f64[seeds, depths])}`: the first layer's gradient norm at init."""
    values: dict[str, dict[int, list[float]]] = {}
    for trial in _ok_trials([group]):
        # At initialization: the trial's first record that has them (they are logged at step 0).
        record = next((r for r in trial.diag_records if any(map(DEPTH_KEY.match, r))), {})
        for key, value in record.items():
            match = DEPTH_KEY.match(key)
            if match and value:
                depth = int(match["depth"])
                values.setdefault(match["norm"], {}).setdefault(depth, []).append(value[0])
    out = {}
    for norm, by_depth in values.items():
        depths = np.array(sorted(by_depth))
        seeds = max(len(v) for v in by_depth.values())
        rows = np.full((seeds, len(depths)), np.nan)
        for j, depth in enumerate(depths):
            rows[: len(by_depth[depth]), j] = by_depth[depth]
        out[norm] = (depths, rows)
    return out
