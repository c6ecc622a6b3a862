"""`DIR/report.md` for a sweep folder: what ran, statistics over seeds per setting, figures.

In a notebook, the same pieces inline:

    from bnlab.studies import report
    sweep = report.load_sweep("runs/lr_sensitivity")
    report.table(sweep)  # one row per setting: counts and Stats of final accuracy and loss
    for plot in report.all_figures(sweep):
        display(plot.figure)
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from bnlab.studies import diag_table, study_data
from bnlab.studies.compare import against_baseline, is_baseline, versus_text
from bnlab.studies.plots import FIGURES, Plot, all_figures
from bnlab.studies.results import (
    RESULTS,
    SEED_KEY,
    STATUSES,
    UNSET,
    Stats,
    Sweep,
    format_value,
    load_sweep,
    short_names,
    verdict,
)
from bnlab.studies.significance import holm, paired

__all__ = ["all_figures", "load_sweep", "render", "table", "table_markdown", "write_report"]

CONFIDENCE = 0.95
FIGURE_DIR = "figures"


def table(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per setting: its varying keys, counts by status, Stats of final test accuracy
    and loss, and of validation accuracy (`validation_accuracy`) when the runs hold one out."""
    rows = []
    for group in sweep.groups:
        row = {
            **group.setting,
            "seeds": len(group.trials),
            **{status: len(group.with_status(status)) for status in STATUSES},
            "accuracy": group.stats("accuracy", CONFIDENCE),
            "loss": group.stats("loss", CONFIDENCE),
        }
        if _has_validation(sweep):
            row["validation_accuracy"] = group.stats("accuracy", CONFIDENCE, split="validation")
        if _has_recalibrated(sweep):
            row["recalibrated_accuracy"] = group.stats("accuracy", CONFIDENCE, "recalibrated")
        rows.append(row)
    return rows


def recalibration_gains(sweep: Sweep) -> dict[str, tuple[Any, float]]:
    """`group name -> (paired comparison, Holm p)`: per setting, test accuracy with recalibrated
    statistics against the running statistics of the same trials (the same weights), a paired
    t test over the seeds with both, Holm-adjusted over the settings."""
    tests = {}
    for group in sweep.groups:
        pairs = [(t.final("accuracy", "recalibrated"), t.final("accuracy")) for t in group.trials]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if len(pairs) >= 2:
            tests[group.name] = paired([a for a, _ in pairs], [b for _, b in pairs])
    adjusted = holm([c.p for c in tests.values()])
    return {name: (c, p) for (name, c), p in zip(tests.items(), adjusted, strict=True)}


def _has_recalibrated(sweep: Sweep) -> bool:
    return any(t.final("accuracy", "recalibrated") is not None for t in sweep.trials)


def _has_validation(sweep: Sweep) -> bool:
    return any(t.final("accuracy", "validation") is not None for t in sweep.trials)


def _statuses(sweep: Sweep) -> list[str]:
    """The status columns: early_stopped only where a sweep uses early stopping."""
    counts = sweep.counts()
    return [s for s in STATUSES if s != "early_stopped" or counts[s]]


def _number(x: float) -> str:
    return f"{x:.4f}" if abs(x) < 1e3 else f"{x:.4g}"


def _mean_std(s: Stats) -> str:
    if s.n == 0:
        return "no ok seed"
    return _number(s.mean) if s.n == 1 else f"{_number(s.mean)} ± {_number(s.std)}"


def _interval(s: Stats) -> str:
    return f"[{_number(s.low)}, {_number(s.high)}]" if s.n >= 2 else "n/a (< 2 ok seeds)"


def table_markdown(sweep: Sweep, baseline: dict[str, Any] | None = None) -> str:
    """The table as Markdown; with `baseline` (the experiment's `BASELINE`), a column of each
    setting's test accuracy minus its baseline's, with the interval and Holm-adjusted p."""
    level = f"{CONFIDENCE:.0%}"
    statuses, validation = _statuses(sweep), _has_validation(sweep)
    versus = against_baseline(sweep, baseline) if baseline else None
    header = [f"`{k}`" for k in sweep.varying] + ["seeds", *statuses]
    header += ["validation accuracy, mean ± std"] if validation else []
    header += ["test accuracy, mean ± std", f"accuracy {level} CI"]
    header += ["test loss, mean ± std", f"loss {level} CI"]
    recalibrated = _has_recalibrated(sweep)
    header += ["test accuracy, recalibrated statistics"] if recalibrated else []
    header += ["recalibrated - running [95% CI], paired, Holm p"] if recalibrated else []
    gains = recalibration_gains(sweep) if recalibrated else {}
    header += [f"test accuracy - baseline [{level} CI], Holm p"] if versus is not None else []
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for group, row in zip(sweep.groups, table(sweep), strict=True):
        cells = [format_value(row[k]) for k in sweep.varying]
        cells += [str(row["seeds"]), *(str(row[status]) for status in statuses)]
        cells += [_mean_std(row["validation_accuracy"])] if validation else []
        for metric in ("accuracy", "loss"):
            cells += [_mean_std(row[metric]), _interval(row[metric])]
        cells += [_mean_std(row["recalibrated_accuracy"])] if recalibrated else []
        if recalibrated:
            gain = gains.get(group.name)
            cells.append("n/a (< 2 recalibrated seeds)" if gain is None else verdict(*gain))
        if versus is not None:
            cells.append(versus_text(versus.get(group.name), is_baseline(group, sweep, baseline)))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _overview(sweep: Sweep) -> list[str]:
    counts = sweep.counts()
    seeds = sorted({repr(t.overrides[SEED_KEY]) for t in sweep.trials if SEED_KEY in t.overrides})
    extra = " ".join(f"`--config.{k}={v}`" for k, v in sweep.overrides.items()) or "none"
    lines = [
        f"**What ran.** `bnlab sweep {sweep.experiment}`"
        f"{' --smoke (the small variant)' if sweep.smoke else ''}: {len(sweep.trials)} trials "
        f"in {len(sweep.groups)} settings; a setting's trials differ only in `{SEED_KEY}` "
        f"({', '.join(seeds) or 'not varied'}). "
        f"Overrides applied to every trial: {extra}.",
        "",
        "**Status.** " + ", ".join(f"{counts[s]} {s}" for s in _statuses(sweep)) + ". A trial "
        "is *ok* when "
        "it finished with finite losses, *diverged* when a training metric became non-finite "
        "(NaN or infinite) or a loss exceeded `train.divergence_loss` (it stopped at the end of "
        "that epoch), *early_stopped* when its validation metric stopped improving "
        "(`train.early_stopping_patience`), *failed* when it raised an error, *missing* when it "
        "has no results yet (not run, or interrupted).",
    ]
    steps = sorted({t.summary.get("steps") for t in sweep.trials if t.status in RESULTS})
    if steps:
        lines += [
            "",
            f"**Training length** of the trials with a result: {', '.join(map(str, steps))} steps.",
        ]
    if sweep.varying:
        lines += ["", "**Varied** (besides the seed):"]
        lines += [
            f"- `{k}`: {', '.join(format_value(v) for v in sweep.values(k))}" for k in sweep.varying
        ]
    for key, leader in sweep.follows.items():
        pairs = {
            format_value(t.overrides.get(leader, UNSET)): format_value(t.overrides.get(key, UNSET))
            for t in sweep.trials
        }
        shown = ", ".join(f"{a} -> {b}" for a, b in pairs.items())
        lines += [f"- `{key}` follows `{leader}`: {shown}"]
    return lines


def _not_ok(sweep: Sweep) -> list[str]:
    lines = []
    for group in sweep.groups:
        for t in group.trials:
            seed = f", seed={t.overrides[SEED_KEY]}" if SEED_KEY in t.overrides else ""
            where = f"`{t.trial_id}` ({group.name}{seed})"
            if t.status == "diverged":
                step = t.summary.get("steps")
                lines.append(f"- {where}: diverged, stopped at step {step}.")
            elif t.status == "failed":
                lines.append(f"- {where}: failed: {t.summary.get('error', 'no error recorded')}")
            elif t.status == "missing":
                lines.append(
                    f"- {where}: missing (no summary.json); run the same `bnlab sweep` command "
                    "again to finish it."
                )
            elif t.status == "early_stopped":
                lines.append(
                    f"- {where}: stopped early after epoch {t.summary.get('epochs')} "
                    f"(best validation at epoch {t.summary.get('best_epoch', 0) + 1})."
                )
            elif t.status != "ok":
                lines.append(f"- {where}: status {t.status!r}.")
    return lines or ["Every trial finished ok."]


def _baseline_note(baseline: dict[str, Any] | None) -> list[str]:
    if not baseline:
        return []
    named = ", ".join(f"`{k}={format_value(v)}`" for k, v in baseline.items())
    return [
        f"Each setting is compared with its baseline ({named}, the other keys alike): the "
        "difference of the mean final test accuracies, its 95% interval and the p value of "
        "Welch's t test over the seeds, Holm-adjusted over the table; *indistinguishable* "
        "where that p >= 0.05.",
        "",
    ]


def _selection(sweep: Sweep) -> list[str]:
    """The selection phase (selection.json): every arm's candidates on its split, the choice."""
    chosen = sweep.selection
    if not chosen:
        return []
    seeds = ", ".join(map(str, chosen["seeds"]))
    used = sorted({t.overrides.get(SEED_KEY) for t in sweep.trials} - {None}, key=str)
    lines = [
        "## Selection: chosen on the " + chosen["split"] + " split",
        "",
        f"Each arm's setting was chosen before any test metric was read: {chosen['rule']} "
        f"(seeds {seeds}). The trials of the table above ran the chosen settings with seeds "
        f"{', '.join(map(str, used))}, which selection did not use; their test metrics are "
        f"the study's result. Every candidate ({chosen['split']} {chosen['metric']}, mean ± "
        f"std and {chosen['confidence']:.0%} interval over the selection seeds):",
        "",
        f"| arm | candidate | {chosen['split']} {chosen['metric']}, mean ± std | "
        f"{chosen['confidence']:.0%} CI | chosen |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm, entry in chosen["arms"].items():
        rows = entry["candidates"]
        keys = [k for k in rows[0]["overrides"] if len({repr(r["overrides"][k]) for r in rows}) > 1]
        names = short_names(keys)
        for i, row in enumerate(rows):
            shown = ", ".join(f"{names[k]}={format_value(row['overrides'][k])}" for k in keys)
            stats = Stats(row["n"], *(_nan(row[k]) for k in ("mean", "std", "low", "high")))
            note = "**chosen**" if i == entry["chosen_index"] else ""
            if not row["eligible"]:
                note = "not eligible: " + ", ".join(row["statuses"])
            cells = [arm, shown or "(the only one)", _mean_std(stats), _interval(stats), note]
            lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def render(sweep: Sweep, plots: list[Plot]) -> str:
    """report.md's text; figures are linked as `figures/<name>.png`."""
    title = Path(sweep.experiment).stem or sweep.path.name
    lines = [f"# Sweep report: {title}", ""]
    doc = sweep.doc
    if doc:
        lines += [*(f"> {line}".rstrip() for line in doc.splitlines()), ""]
    lines += [*_overview(sweep), "", "## Final test metrics per setting", ""]
    baseline = sweep.baseline
    level = f"{CONFIDENCE:.0%}"
    lines += [
        "Each row is one setting; its trials differ only in the seed. Final test accuracy and "
        "loss (and validation accuracy, where the runs hold a validation split out) are over "
        "the seeds that finished *ok* or *early_stopped* (their last epoch's; for a run that "
        "reports its best validation epoch, early-stopped or with `checkpoint.best_metric`, "
        "that epoch's): mean ± sample "
        f"standard deviation, and the {level} confidence interval of the mean (Student t, "
        "seeds - 1 degrees of freedom). Diverged, failed and missing trials are left out of "
        "these statistics and counted in their own columns.",
        "",
        *_baseline_note(baseline),
        table_markdown(sweep, baseline),
        "",
        *_selection(sweep),
        *diag_table.section(sweep),
        "## Trials that did not finish ok",
        "",
        *_not_ok(sweep),
        "",
    ]
    if plots:
        lines += ["## Figures", ""]
    for number, plot in enumerate(plots, 1):
        lines += [f"### {plot.title}", "", f"![{plot.title}]({FIGURE_DIR}/{plot.name}.png)", ""]
        lines += [f"*Figure {number}. {plot.caption}*", ""]
    return "\n".join(lines)


def write_report(directory: str | os.PathLike, data: str | os.PathLike | None = None) -> Path:
    """Writes `DIR/report.md` and its PNG figures under `DIR/figures/`; returns report.md's path.

    `DIR` is a sweep folder or a study folder (`study.json`). With `data`, the sweep's compact
    data goes to `data/study.json` (`study_data`) and the report is built there, from it alone.
    """
    sweep = load_sweep(directory)
    if data is not None:
        study_data.write(sweep, data)
        sweep = load_sweep(data)
    figure_dir = sweep.path / FIGURE_DIR
    figure_dir.mkdir(exist_ok=True)
    for name, *_ in FIGURES:  # a figure that no longer applies must not linger
        (figure_dir / f"{name}.png").unlink(missing_ok=True)
    for path in figure_dir.glob("diag_*.png"):  # nor one of a diagnostic
        path.unlink()
    plots = all_figures(sweep)
    for plot in plots:
        plot.figure.savefig(figure_dir / f"{plot.name}.png", dpi=100)
    path = sweep.path / "report.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(sweep, plots))
    os.replace(tmp, path)
    return path
