"""A report's tables of diagnostics: the values a study's verdict reads off its `diag` records.

An experiment file names them with a module-level literal, e.g.
`DIAG_TABLE = ["rank/block*", "weight_norms/dense0/effective_lr"]` (shell-style patterns over
the scalar keys of its diagnostics). For each matching key the report gets a table: per setting,
mean ± std over the seeds at the first and at the last measurement, and with a `BASELINE` the
last value's difference to the baseline setting's (Welch, 95% interval, Holm-adjusted over the
table), as the final metrics have. With `DIAG_MATCH = "hessian_data/loss"` (a diagnostic key), each
table also gives the value at matched loss: every trial at its first measurement where that
key has fallen to a level every trial reaches, with the difference to the baseline there too.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from bnlab.studies.compare import against_baseline, is_baseline, versus_text
from bnlab.studies.results import Stats, Sweep, format_value, summarize


def keys(sweep: Sweep) -> list[str]:
    """The scalar diagnostic keys that `sweep.diag_table` names, in its order, then sorted."""
    found = {
        k
        for t in sweep.trials
        for r in t.diag_records
        for k, v in r.items()
        if "/" in k and isinstance(v, int | float) and not isinstance(v, bool)
    }
    out: list[str] = []
    for pattern in sweep.diag_table or ():
        out += [k for k in sorted(found) if fnmatch.fnmatchcase(k, pattern) and k not in out]
    return out


def value_at(trial: Any, key: str, which: str) -> float | None:
    """The trial's `key` at its `"first"` or `"last"` measurement holding it (None: none)."""
    values = [(r["step"], r[key]) for r in trial.diag_records if key in r]
    if not values:
        return None
    return float(values[0 if which == "first" else -1][1])


def matched_step(trial: Any, match: str, target: float) -> int | None:
    """The trial's first measurement step at which `match` is at most `target`."""
    for r in trial.diag_records:
        if match in r and r[match] <= target:
            return r["step"]
    return None


def match_target(sweep: Sweep, match: str) -> float | None:
    """The level of `match` that every trial with a result reaches: the largest of their
    last values (each trial reaches its own last value, so every one reaches this)."""
    lasts = [value_at(t, match, "last") for g in sweep.groups for t in g.with_result()]
    lasts = [v for v in lasts if v is not None]
    return max(lasts) if lasts else None


def value_matched(trial: Any, key: str, match: str, target: float) -> float | None:
    """The trial's `key` at its first measurement where `match` <= `target`."""
    step = matched_step(trial, match, target)
    values = [r[key] for r in trial.diag_records if r["step"] == step and key in r]
    return float(values[0]) if values else None


def steps(sweep: Sweep, key: str) -> tuple[int, int]:
    """The first and last step at which any trial measured `key`."""
    found = [r["step"] for t in sweep.trials for r in t.diag_records if key in r]
    return min(found), max(found)


def _stats(group, value) -> Stats:
    values = [value(t) for t in group.with_result()]
    return summarize([v for v in values if v is not None])


def _cell(s: Stats) -> str:
    if s.n == 0:
        return "n/a"
    number = f"{s.mean:.4g}"
    return number if s.n == 1 else f"{number} ± {s.std:.4g}"


def section(sweep: Sweep) -> list[str]:
    """The report's lines: a heading, then a table per key (nothing without DIAG_TABLE)."""
    names = keys(sweep)
    if not names:
        return []
    lines = [
        "## Diagnostics",
        "",
        "Per setting, each diagnostic at the first and the last step it was measured: mean ± "
        "sample standard deviation over the seeds that finished with a result"
        + (
            "; the difference of each later column to the baseline setting's, with its 95% "
            "interval (Welch) and the Holm-adjusted p over that column."
            if sweep.baseline
            else "."
        ),
        "",
    ]
    match = sweep.diag_match
    target = match_target(sweep, match) if match else None
    if target is not None:
        lines += [
            f"At matched `{match}`: each trial at its first measurement where `{match}` <= "
            f"{target:.4g}, the level every trial reaches (the largest of their last values); "
            "the steps those are at, per setting, in the last table.",
            "",
        ]
    for key in names:
        lines += _key_table(sweep, key, match, target)
    if target is not None:
        lines += [f"### Steps at matched `{match}`", "", "| "]
        lines[-1] += " | ".join([*(f"`{k}`" for k in sweep.varying), "steps"]) + " |"
        lines.append("|" + " --- |" * (len(sweep.varying) + 1))
        for group in sweep.groups:
            found = [matched_step(t, match, target) for t in group.with_result()]
            cells = [format_value(group.setting[k]) for k in sweep.varying]
            cells.append(", ".join(str(s) for s in found if s is not None) or "n/a")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _key_table(sweep: Sweep, key: str, match: str | None, target: float | None) -> list[str]:
    first, last = steps(sweep, key)
    columns = {
        f"step {first}": lambda t: value_at(t, key, "first"),
        f"step {last}": lambda t: value_at(t, key, "last"),
    }
    if target is not None:
        columns[f"at matched `{match}`"] = lambda t: value_matched(t, key, match, target)
    versus = {}
    if sweep.baseline:
        for name in list(columns)[1:]:
            versus[name] = against_baseline(sweep, sweep.baseline, value=columns[name])
    header = [f"`{k}`" for k in sweep.varying] + list(columns)
    header += [f"{name} - baseline [95% CI], Holm p" for name in versus]
    lines = [f"### `{key}`", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + " --- |" * len(header))
    for group in sweep.groups:
        cells = [format_value(group.setting[k]) for k in sweep.varying]
        cells += [_cell(_stats(group, value)) for value in columns.values()]
        base = sweep.baseline and is_baseline(group, sweep, sweep.baseline)
        cells += [versus_text(v.get(group.name), base) for v in versus.values()]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    return lines
