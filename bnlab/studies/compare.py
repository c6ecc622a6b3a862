"""Each setting of a sweep against its baseline: Welch's t test on the final values over seeds,
Holm-adjusted over the table.

An experiment file names its baseline arm with a module-level literal, e.g.
`BASELINE = {"model.norm": "none"}`: a setting is compared with the setting that has the same
values of the other varying keys and the baseline's values of these (at each learning rate, BN
against no BN at that learning rate). In a study with a selection phase, the keys it chose
per arm (each arm's own learning rate) are not matched: each arm at its choice against the
baseline arm at its own. A setting that runs another value of a chosen key (every arm at one
shared learning rate, beside each at its own) is matched with the baseline arm at that value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from bnlab.studies.results import UNSET, Group, Sweep, baseline_of  # noqa: F401 - part of this API
from bnlab.studies.significance import Comparison, holm, verdict, welch


class VsBaseline(NamedTuple):
    baseline: str  # the baseline group's name
    comparison: Comparison | None  # None with fewer than 2 results in either arm
    p_holm: float | None  # adjusted over every comparison of the table


def tuned_keys(selection: dict[str, Any] | None) -> set[str]:
    """The keys a selection phase chose per arm (those its candidates vary): each arm runs its
    own value, so a setting is compared with its baseline whatever their values."""
    keys: set[str] = set()
    for entry in (selection or {}).get("arms", {}).values():
        rows = [row["overrides"] for row in entry["candidates"]]
        keys |= {k for k in rows[0] if len({repr(r.get(k)) for r in rows}) > 1}
    return keys


def chosen_settings(selection: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The overrides each arm's selection chose."""
    return [entry["chosen"] for entry in (selection or {}).get("arms", {}).values()]


def _at_a_choice(group: Group, chosen: list[dict[str, Any]]) -> bool:
    """Whether `group` runs some arm's chosen setting (every chosen override, same value)."""
    first = group.trials[0].overrides
    return any(all(k in first and first[k] == v for k, v in c.items()) for c in chosen)


def is_baseline(group: Group, sweep: Sweep, baseline: dict[str, Any]) -> bool:
    """Whether `group` is a baseline setting (it has every value `baseline` names)."""
    setting = _setting(group, sweep)
    first = group.trials[0].overrides
    return all(setting.get(k, first.get(k, UNSET)) == v for k, v in baseline.items())


def _setting(group: Group, sweep: Sweep) -> dict[str, Any]:
    """A group's varying keys and the keys that follow them (a chosen clipping that follows
    the chosen learning rate, say)."""
    first = group.trials[0].overrides
    return {**group.setting, **{k: first.get(k, UNSET) for k in sweep.follows}}


def _finals(group: Group, value: Callable[[Any], float | None]) -> list[float]:
    values = [value(t) for t in group.with_result()]
    return [v for v in values if v is not None]


def against_baseline(
    sweep: Sweep,
    baseline: dict[str, Any],
    metric: str = "accuracy",
    value: Callable[[Any], float | None] | None = None,
) -> dict[str, VsBaseline]:
    """`group name -> VsBaseline` for every group that is not a baseline and has one: the
    final test `metric` of each trial, or `value(trial)`."""
    value = value or (lambda t: t.final(metric))
    unknown = sorted(set(baseline) - set(sweep.varying) - set(sweep.follows))
    # A key every trial holds at the baseline's value (a grid cut to fewer arms) says nothing.
    same = {
        k for k in unknown if all(t.overrides.get(k, UNSET) == baseline[k] for t in sweep.trials)
    }
    if set(unknown) - same:
        raise ValueError(
            f"BASELINE names {sorted(set(unknown) - same)}, which the sweep does not vary"
        )
    baseline = {k: v for k, v in baseline.items() if k not in same}
    tuned = tuned_keys(sweep.selection)
    # Not matched: the keys chosen per arm, and those that follow a key the baseline sets or
    # a chosen one (a clipping threshold that comes with the clipping the baseline replaces).
    ignored = tuned | {k for k, leader in sweep.follows.items() if leader in {*baseline, *tuned}}
    settings = {g.name: _setting(g, sweep) for g in sweep.groups}
    chosen = chosen_settings(sweep.selection)
    # A setting away from its arm's choice (the same learning rate for every arm, say) is
    # matched at its own values of the chosen keys.
    at_choice = {g.name: bool(tuned) and _at_a_choice(g, chosen) for g in sweep.groups}

    def key(setting: dict[str, Any], choice: bool) -> tuple:
        skip = ignored if choice else ignored - tuned
        return choice, tuple(sorted(repr(kv) for kv in setting.items() if kv[0] not in skip))

    bases = [g for g in sweep.groups if is_baseline(g, sweep, baseline)]
    by_setting = {key(settings[g.name], at_choice[g.name]): g for g in bases}
    for g in bases:  # a baseline at its choice is also the baseline at that value
        by_setting.setdefault(key(settings[g.name], False), g)
    pairs = []
    for group in sweep.groups:
        wanted = key({**settings[group.name], **baseline}, at_choice[group.name])
        base = by_setting.get(wanted)
        if base is not None and base is not group:
            pairs.append((group, base))
    comparisons = {}
    for group, base in pairs:
        a, b = _finals(group, value), _finals(base, value)
        comparisons[group.name] = (base.name, welch(a, b) if min(len(a), len(b)) >= 2 else None)
    tested = [name for name, (_, c) in comparisons.items() if c is not None]
    adjusted = dict(zip(tested, holm([comparisons[n][1].p for n in tested]), strict=True))
    return {
        name: VsBaseline(base, c, adjusted.get(name)) for name, (base, c) in comparisons.items()
    }


def versus_text(v: VsBaseline | None, base: bool) -> str:
    """A report cell for one setting against its baseline: its verdict, or why there is none."""
    if v is None:
        return "baseline" if base else "no baseline setting to compare with"
    if v.comparison is None:
        return f"n/a (< 2 results in this arm or {v.baseline})"
    return verdict(v.comparison, v.p_holm)
