"""What the report's figures share: the `Plot` they are returned as, a figure of panels, a
legend, and the mean +- std of a logged field over trials."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure

from bnlab.studies.results import Group, TrialResult


class Plot(NamedTuple):
    name: str  # file stem: figures/<name>.png
    title: str
    caption: str  # one line, for report.md
    figure: Figure


def _figure(n_panels: int, title: str, size=(4.6, 3.4), *, sharey=False):
    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:n_panels]


def _legend(ax, **kwargs) -> None:
    """A legend of the labelled artists, one entry per label; none when nothing is labelled."""
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize="small", **kwargs)


def _mean_std(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and sample std (ddof=1) ignoring NaN; std 0 for a single value, both NaN for
    none. numpy is called only on the columns that have enough values, so it never warns."""
    count = np.count_nonzero(~np.isnan(rows), axis=0)
    mean, std = np.full(count.shape, np.nan), np.full(count.shape, np.nan)
    mean[count > 0] = np.nanmean(rows[:, count > 0], axis=0)
    std[count == 1] = 0.0
    std[count > 1] = np.nanstd(rows[:, count > 1], axis=0, ddof=1)
    return mean, std


def _curve(trials: list[TrialResult], field: str, split: str = "test"):
    """Steps, mean and std over trials of a field of `split`'s records (missing or null, or not
    a number, -> ignored)."""
    number = lambda r: isinstance(r.get(field), int | float)  # noqa: E731
    steps = sorted({r["step"] for t in trials for r in t.records(split) if number(r)})
    column = {s: i for i, s in enumerate(steps)}
    rows = np.full((len(trials), len(steps)), np.nan)
    for i, trial in enumerate(trials):
        for r in trial.records(split):
            if number(r):
                rows[i, column[r["step"]]] = r[field]
    return (np.array(steps), *_mean_std(rows))


def _ok_trials(groups: list[Group]) -> list[TrialResult]:
    return [t for g in groups for t in g.with_result()]
