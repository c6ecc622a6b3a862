"""A report's tables of diagnostics: the values a study's verdict reads off its `diag` records.

An experiment file names them with a module-level literal, e.g.
`DIAG_TABLE = ["rank/block*", "weight_norms/dense0/effective_lr"]` (shell-style patterns over
the scalar keys of its diagnostics). For each matching key the report gets a table: per setting,
mean ± std over the seeds at the first and at the last measurement, and with a `BASELINE` the
last value's difference to the baseline setting's (Welch, 95% interval, Holm-adjusted over the
table), as the final metrics have.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from bnlab.studies.compare import against_baseline, is_baseline
from bnlab.studies.results import Stats, Sweep, format_value, summarize
from bnlab.studies.significance import ALPHA, p_text


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


def steps(sweep: Sweep, key: str) -> tuple[int, int]:
    """The first and last step at which any trial measured `key`."""
    found = [r["step"] for t in sweep.trials for r in t.diag_records if key in r]
    return min(found), max(found)


def _stats(group, key: str, which: str) -> Stats:
    values = [value_at(t, key, which) for t in group.with_result()]
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
            "; the last value's difference to the baseline setting's, with its 95% interval "
            "(Welch) and the Holm-adjusted p over the table."
            if sweep.baseline
            else "."
        ),
        "",
    ]
    for key in names:
        first, last = steps(sweep, key)
        versus = None
        if sweep.baseline:
            versus = against_baseline(
                sweep, sweep.baseline, value=lambda t, key=key: value_at(t, key, "last")
            )
        header = [f"`{k}`" for k in sweep.varying]
        header += [f"step {first}", f"step {last}"]
        header += [f"step {last} - baseline [95% CI], Holm p"] if versus is not None else []
        lines += [f"### `{key}`", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + " --- |" * len(header))
        for group in sweep.groups:
            cells = [format_value(group.setting[k]) for k in sweep.varying]
            cells += [_cell(_stats(group, key, "first")), _cell(_stats(group, key, "last"))]
            if versus is not None:
                base = is_baseline(group, sweep, sweep.baseline)
                cells.append(_versus(versus.get(group.name), base))
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return lines


def _versus(v, base: bool) -> str:
    if v is None:
        return "baseline" if base else "no baseline setting"
    if v.comparison is None:
        return "n/a (< 2 results)"
    c = v.comparison
    verdict = "indistinguishable" if v.p_holm >= ALPHA else "differs"
    return f"{c.difference:+.4g} [{c.low:+.4g}, {c.high:+.4g}], p={p_text(v.p_holm)} ({verdict})"
