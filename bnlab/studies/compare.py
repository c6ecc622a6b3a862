"""Each setting of a sweep against its baseline: Welch's t test on the final values over seeds,
Holm-adjusted over the table.

An experiment file names its baseline arm with a module-level literal, e.g.
`BASELINE = {"model.norm": "none"}`: a setting is compared with the setting that has the same
values of the other varying keys and the baseline's values of these (at each learning rate, BN
against no BN at that learning rate).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from bnlab.studies.results import Group, Sweep, baseline_of  # noqa: F401 - part of this API
from bnlab.studies.significance import Comparison, holm, welch


class VsBaseline(NamedTuple):
    baseline: str  # the baseline group's name
    comparison: Comparison | None  # None with fewer than 2 results in either arm
    p_holm: float | None  # adjusted over every comparison of the table


def _finals(group: Group, metric: str) -> list[float]:
    values = [t.final(metric) for t in group.with_result()]
    return [v for v in values if v is not None]


def against_baseline(
    sweep: Sweep, baseline: dict[str, Any], metric: str = "accuracy"
) -> dict[str, VsBaseline]:
    """`group name -> VsBaseline` for every group that is not a baseline and has one."""
    unknown = sorted(set(baseline) - set(sweep.varying))
    if unknown:
        raise ValueError(f"BASELINE names {unknown}, which the sweep does not vary")
    by_setting = {tuple(sorted(map(repr, g.setting.items()))): g for g in sweep.groups}
    pairs = []
    for group in sweep.groups:
        if all(group.setting[k] == v for k, v in baseline.items()):
            continue
        key = tuple(sorted(map(repr, {**group.setting, **baseline}.items())))
        if key in by_setting:
            pairs.append((group, by_setting[key]))
    comparisons = {}
    for group, base in pairs:
        a, b = _finals(group, metric), _finals(base, metric)
        comparisons[group.name] = (base.name, welch(a, b) if min(len(a), len(b)) >= 2 else None)
    tested = [name for name, (_, c) in comparisons.items() if c is not None]
    adjusted = dict(zip(tested, holm([comparisons[n][1].p for n in tested]), strict=True))
    return {
        name: VsBaseline(base, c, adjusted.get(name)) for name, (base, c) in comparisons.items()
    }
