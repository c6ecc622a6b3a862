"""The figures of a sweep report, as matplotlib Figures (shown inline in a notebook).

Each figure function returns None when the sweep does not vary what it compares. Figures are
built without pyplot, so making many leaves no global state behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnlab.studies import diag_plots
from bnlab.studies.figure_kit import (  # noqa: F401 - _mean_std: the helpers, here too
    Plot,
    _curve,
    _figure,
    _legend,
    _mean_std,
    _ok_trials,
)
from bnlab.studies.results import (
    RESULTS,
    UNSET,
    Group,
    Sweep,
    format_value,
    short_names,
)

NORM_KEY = "model.norm"
PERCENTILES = ("act_p15", "act_p50", "act_p85")
DIVERGED_COLOR = "tab:red"


def _panels(sweep: Sweep, used: tuple[str, ...]) -> list[tuple[str, list[Group]]]:
    """The groups split into panels, one per setting of the varying keys not in `used`."""
    others = [k for k in sweep.varying if k not in used]
    names = short_names(sweep.varying)
    panels: dict[str, list[Group]] = {}
    for group in sweep.groups:
        title = ", ".join(f"{names[k]}={format_value(group.setting[k])}" for k in others)
        panels.setdefault(title, []).append(group)
    return list(panels.items())


def _series(sweep: Sweep, groups: list[Group]) -> list[tuple[str, list[Group]]]:
    """Groups split by normalization (one series per `model.norm` value) when it varies."""
    if NORM_KEY not in sweep.varying:
        return [("", groups)]
    return [
        (f"norm={format_value(norm)}", [g for g in groups if g.setting[NORM_KEY] == norm])
        for norm in sweep.values(NORM_KEY)
    ]


def accuracy_curves(sweep: Sweep, split: str = "test") -> Figure | None:
    """(1) Test (or validation) accuracy vs steps, mean +- std over the seeds with a result, a
    line per normalization; a panel per setting."""
    if NORM_KEY not in sweep.varying or not any(t.records(split) for t in sweep.trials):
        return None
    panels = _panels(sweep, (NORM_KEY,))
    fig, axes = _figure(len(panels), f"{split.capitalize()} accuracy during training")
    for ax, (title, groups) in zip(axes, panels, strict=True):
        for label, members in _series(sweep, groups):
            steps, mean, std = _curve(_ok_trials(members), "accuracy", split)
            if len(steps):
                (line,) = ax.plot(steps, mean, marker=".", label=label)
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set(title=title, xlabel="training step", ylabel=f"{split} accuracy")
        _legend(ax)
    return fig


def validation_curves(sweep: Sweep) -> Figure | None:
    """(1b) Validation accuracy vs steps, when the runs hold a validation split out."""
    return accuracy_curves(sweep, "validation")


def accuracy_vs_lr(sweep: Sweep) -> Figure | None:
    """(2) Final test accuracy vs learning rate (log axis), a line per norm, divergences marked."""
    return _accuracy_vs(sweep, "opt.lr", "learning rate")


def accuracy_vs_batch(sweep: Sweep) -> Figure | None:
    """(2b) Final test accuracy vs the per-step batch size (log axis), a line per norm."""
    return _accuracy_vs(sweep, "train.batch_size", "batch size")


def _norm_only_keys(sweep: Sweep) -> tuple[str, ...]:
    """Varying keys that only the trials of one normalization set (ghost BN's
    `norm.virtual_batch_size`): its own series in a figure, not panels of their own."""
    if NORM_KEY not in sweep.varying:
        return ()
    keys = []
    for key in (k for k in sweep.varying if k != NORM_KEY):
        norms = {g.setting[NORM_KEY] for g in sweep.groups if g.setting[key] != UNSET}
        if len(norms) == 1:
            keys.append(key)
    return tuple(keys)


def _norm_series(sweep: Sweep, groups: list[Group], own: tuple[str, ...]):
    """`_series`, with a normalization's own keys (`_norm_only_keys`) in its series labels."""
    names = short_names(sweep.varying)
    out: dict[str, list[Group]] = {}
    for series, members in _series(sweep, groups):
        for g in members:
            own_set = [f"{names[k]}={format_value(g.setting[k])}" for k in own
                       if g.setting[k] != UNSET]  # fmt: skip
            label = ", ".join([series, *own_set])
            out.setdefault(label, []).append(g)
    return list(out.items())


def _accuracy_vs(sweep: Sweep, key: str, label: str) -> Figure | None:
    if key not in sweep.varying:
        return None
    own = _norm_only_keys(sweep)
    panels = [
        (title, _norm_series(sweep, groups, own))
        for title, groups in _panels(sweep, (NORM_KEY, key, *own))
    ]
    # Many series: the legend goes beside each panel, which is wider for it.
    many = max(len(series) for _, series in panels) > 4
    size = (7.6, 3.6) if many else (4.6, 3.4)
    fig, axes = _figure(len(panels), f"Final test accuracy vs {label}", size)
    for ax, (title, all_series) in zip(axes, panels, strict=True):
        diverged = False
        for i, (series, members) in enumerate(all_series):
            members = sorted(
                (g for g in members if isinstance(g.setting[key], int | float)),
                key=lambda g: g.setting[key],
            )  # a trial that does not override the key has no point on this axis
            xs = [float(g.setting[key]) for g in members]
            stats = [g.stats("accuracy") for g in members]
            std = [0.0 if math.isnan(s.std) else s.std for s in stats]
            line = ax.errorbar(xs, [s.mean for s in stats], yerr=std, marker="o", label=series)
            bad = [x for x, g in zip(xs, members, strict=True) if g.with_status("diverged")]
            if bad:
                diverged = True
                color = line.lines[0].get_color()
                ax.scatter(bad, [-0.03 * i] * len(bad), marker="x", s=60, color=color,
                           label=f"{series or 'all'}: a seed diverged")  # fmt: skip
        ax.set_xscale("log")
        if diverged:  # room for the markers at 0; else the axis fits the accuracies
            ax.set_ylim(-0.1, 1.02)
        ax.set(title=title, xlabel=f"{label} (log scale)", ylabel="final test accuracy")
        _legend(ax, **({"loc": "center left", "bbox_to_anchor": (1.02, 0.5)} if many else {}))
    return fig


def _bars(sweep: Sweep, keys: tuple[str, ...], title: str) -> Figure | None:
    """Final test accuracy per setting of `keys`, a bar per norm, divergences written on top."""
    keys = tuple(k for k in keys if k in sweep.varying)
    if not keys:
        return None
    panels = _panels(sweep, (*keys, NORM_KEY))
    names = short_names(sweep.varying)
    fig, axes = _figure(len(panels), title, size=(5.5, 3.6))
    for ax, (panel_title, groups) in zip(axes, panels, strict=True):
        labels = list(dict.fromkeys(_label(g, keys, names) for g in groups))
        series = _series(sweep, groups)
        width = 0.8 / len(series)
        for i, (label, members) in enumerate(series):
            for g in members:
                x = labels.index(_label(g, keys, names)) + (i - (len(series) - 1) / 2) * width
                s = g.stats("accuracy")
                height = 0.0 if math.isnan(s.mean) else s.mean
                yerr = None if math.isnan(s.std) else s.std
                ax.bar(x, height, width, yerr=yerr, color=f"C{i}", label=label or None)
                if g.with_status("diverged"):
                    n = len(g.with_status("diverged"))
                    ax.text(x, height + 0.02, f"{n} div.", ha="center", color=DIVERGED_COLOR)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
        ax.set_ylim(0, 1.1)
        ax.set(title=panel_title, ylabel="final test accuracy (mean +- std)")
        _legend(ax, loc="lower right")
    return fig


def _label(group: Group, keys: tuple[str, ...], names: dict[str, str]) -> str:
    return "\n".join(f"{names[k]}={format_value(group.setting[k])}" for k in keys)


def schedule_clip_comparison(sweep: Sweep) -> Figure | None:
    """(3) Final accuracy per learning-rate schedule x gradient clipping, BN vs none."""
    return _bars(sweep, ("opt.schedule", "opt.clip"), "Learning-rate schedule x clipping")


def optimizer_comparison(sweep: Sweep) -> Figure | None:
    """(4) Final accuracy per optimizer, BN vs none."""
    return _bars(sweep, ("opt.name",), "Optimizers")


def status_counts(sweep: Sweep) -> Figure | None:
    """(5) Trials per setting by status (diverged, failed, missing), when any is not ok."""
    if all(t.status in RESULTS for t in sweep.trials):
        return None
    fig = Figure(figsize=(7, 1.2 + 0.35 * len(sweep.groups)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(sweep.groups))
    left = np.zeros(len(sweep.groups))
    colors = {
        "ok": "tab:green",
        "early_stopped": "tab:olive",
        "diverged": DIVERGED_COLOR,
        "failed": "black",
        "missing": "0.7",
    }
    for status, color in colors.items():
        counts = np.array([len(g.with_status(status)) for g in sweep.groups])
        ax.barh(y, counts, left=left, color=color, label=status)
        left += counts
    ax.set_yticks(y, [g.name for g in sweep.groups], fontsize="small")
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trials (seeds)", title="Trials per setting by status")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def activation_percentiles(sweep: Sweep) -> Figure | None:
    """(6) 15th/50th/85th percentiles of one last-layer sigmoid input vs steps, per norm
    (Ioffe & Szegedy 2015, Fig. 1 b, c)."""
    if not any(PERCENTILES[1] in r for t in sweep.trials for r in t.test_records):
        return None
    panels = [
        (", ".join(p for p in (label, title) if p), members)
        for title, groups in _panels(sweep, (NORM_KEY,))
        for label, members in _series(sweep, groups)
    ]
    fig, axes = _figure(
        len(panels), "Input to a last-hidden-layer sigmoid: 15th, 50th, 85th percentiles",
        sharey=True,
    )  # fmt: skip
    for ax, (title, groups) in zip(axes, panels, strict=True):
        for field, color in zip(PERCENTILES, ("C0", "C3", "C2"), strict=True):
            steps, mean, std = _curve(_ok_trials(groups), field)
            if len(steps):
                ax.plot(steps, mean, color=color, label=f"{field[-2:]}th percentile")
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15)
        ax.set(title=title, xlabel="training step", ylabel="sigmoid input")
        _legend(ax)
    return fig


FIGURES: tuple[tuple[str, str, Callable[[Sweep], Figure | None], str], ...] = (
    ("accuracy_curves", "Test accuracy during training", accuracy_curves,
     "Test accuracy vs training step, mean over the seeds that finished ok (band: +- one std), "
     "with and without batch normalization."),
    ("validation_curves", "Validation accuracy during training", validation_curves,
     "Validation accuracy (the held-out end of the training split) vs training step, mean "
     "over the seeds with a result (band: +- one std), a line per normalization."),
    ("accuracy_vs_lr", "Final accuracy vs learning rate", accuracy_vs_lr,
     "Final test accuracy vs learning rate (log scale), mean +- std over ok seeds; an x at the "
     "bottom marks a learning rate where at least one seed diverged."),
    ("accuracy_vs_batch", "Final accuracy vs batch size", accuracy_vs_batch,
     "Final test accuracy vs the per-step batch size (log scale), mean +- std over the seeds "
     "with a result, a line per normalization."),
    ("schedule_clip", "Schedules and clipping", schedule_clip_comparison,
     "Final test accuracy per learning-rate schedule and gradient clipping, mean +- std over ok "
     "seeds; 'n div.' counts the seeds that diverged."),
    ("optimizers", "Optimizers", optimizer_comparison,
     "Final test accuracy per optimizer, mean +- std over ok seeds; 'n div.' counts the seeds "
     "that diverged."),
    ("status_counts", "Diverged, failed and missing trials", status_counts,
     "Trials per setting by status: ok, diverged (a non-finite metric or too large a loss), "
     "failed (an error), missing (not run or not finished)."),
    ("activation_percentiles", "Sigmoid input distribution (Ioffe & Szegedy Fig. 1 b, c)",
     activation_percentiles,
     "15th, 50th and 85th percentiles over the test set of the input to one sigmoid of the last "
     "hidden layer vs training step, mean over ok seeds; with BN they should stay stable."),
)  # fmt: skip


def all_figures(sweep: Sweep) -> list[Plot]:
    """Every figure that applies to this sweep, in report order: the table above, then those
    of the runs' diagnostics (`bnlab.studies.diag_plots`)."""
    plots = []
    for name, title, make, caption in FIGURES:
        figure = make(sweep)
        if figure is not None:
            plots.append(Plot(name, title, caption, figure))
    return plots + diag_plots.figures(sweep)
