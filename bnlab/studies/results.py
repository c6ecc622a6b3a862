"""A sweep's results read back: trials and their status, groups over seeds, statistics.

A group is one setting of the sweep: its trials share every override but `train.seed`. The
statistics over a group's seeds are the mean, the sample standard deviation and the Student-t
confidence interval of the mean.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import scipy.stats

from bnlab.config import ConfigError, parse_value
from bnlab.studies import study_data
from bnlab.studies.significance import (  # noqa: F401 - part of this API
    ALPHA,
    Comparison,
    holm,
    verdict,
    welch,
)
from bnlab.training.writers import read_jsonl

SEED_KEY = "train.seed"
STATUSES = ("ok", "early_stopped", "diverged", "failed", "missing")
# Trials with a result: their final metrics enter the statistics (an early-stopped trial's
# are those of the epoch where it stopped; summary.json also holds its best epoch's).
RESULTS = ("ok", "early_stopped")
# The records a report reads (train windows are not; train_eval: `data.train_eval_size`).
SPLITS = ("test", "validation", "diag", "train_eval")
UNSET = "(default)"  # a key some trials of a heterogeneous grid do not override


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t distribution with `df` degrees of freedom
    (`scipy.stats.t.ppf`); `ValueError` outside `0 < p < 1` or for a `df` that is not an
    integer >= 1 (the seeds of a setting minus one)."""
    if not 0 < p < 1 or df < 1 or int(df) != df:
        raise ValueError(f"t_quantile needs 0 < p < 1 and an integer df >= 1, got {p}, {df}")
    return float(scipy.stats.t.ppf(p, df))


class Stats(NamedTuple):
    n: int  # number of values (seeds)
    mean: float  # NaN when n == 0
    std: float  # sample standard deviation (n - 1 in the denominator); NaN when n < 2
    low: float  # confidence interval of the mean: mean -+ t_{(1+level)/2}(n-1) std / sqrt(n)
    high: float  # (NaN when n < 2)


def summarize(values: Iterable[float], level: float = 0.95) -> Stats:
    """Mean, sample standard deviation and Student-t confidence interval of `values`."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Stats(0, math.nan, math.nan, math.nan, math.nan)
    mean = math.fsum(xs) / n
    if n == 1:
        return Stats(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Stats(n, mean, std, mean - half, mean + half)


@dataclasses.dataclass(frozen=True)
class TrialResult:
    trial_id: str
    overrides: dict[str, Any]  # dotted key -> parsed value
    status: str  # STATUSES; missing: no summary.json (not run, or interrupted)
    summary: dict[str, Any]  # summary.json; {} when missing
    config: dict[str, Any]  # config.json (nested); {} when absent
    test_records: list[dict[str, Any]]  # the "test" records of metrics.jsonl; null -> None
    validation_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    diag_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_eval_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    override_text: dict[str, str] = dataclasses.field(default_factory=dict)  # as in sweep.json
    evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)  # evaluate.json

    def records(self, split: str) -> list[dict[str, Any]]:
        """The records of `split` (one of SPLITS)."""
        if split not in SPLITS:
            raise ValueError(f"no records of split {split!r}; one of {SPLITS}")
        return getattr(self, f"{split}_records")

    def value(self, key: str) -> Any:
        """The trial's value of a dotted key: its override, else its resolved config."""
        if key in self.overrides:
            return self.overrides[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def final(self, metric: str, split: str = "test") -> float | None:
        """`summary.json`'s `<split>_<metric>` when it is a finite number; for a run that
        reports its best validation epoch (`"reported": "best"`: early-stopped, or with
        `checkpoint.best_metric`), that epoch's `best_<split>_<metric>`. `split="recalibrated"`:
        the test metric with recalibrated statistics, from evaluate.json."""
        if split == "recalibrated":  # `bnlab evaluate --recalibrate N` (evaluate.json)
            value = self.evaluation.get("recalibrated", {}).get(metric)
            return float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        best = self.summary.get("reported") == "best"
        value = self.summary.get(f"best_{split}_{metric}" if best else f"{split}_{metric}")
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


@dataclasses.dataclass(frozen=True)
class Group:
    name: str  # e.g. "norm=none, lr=0.1": the sweep's varying keys
    setting: dict[str, Any]  # varying key -> value (UNSET where the trials do not override it)
    trials: list[TrialResult]  # the seeds

    def with_status(self, status: str) -> list[TrialResult]:
        return [t for t in self.trials if t.status == status]

    def with_result(self) -> list[TrialResult]:
        """The seeds that finished with a result (ok or early-stopped)."""
        return [t for t in self.trials if t.status in RESULTS]

    def stats(self, metric: str, level: float = 0.95, split: str = "test") -> Stats:
        """Statistics of the final `metric` ("accuracy" or "loss") of `split` ("test" or
        "validation") over the seeds with a result."""
        values = [t.final(metric, split) for t in self.with_result()]
        return summarize([v for v in values if v is not None], level)


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: Path
    experiment: str  # the experiment file, as given to `bnlab sweep`
    smoke: bool
    overrides: dict[str, str]  # applied to every trial (`--config.x=v`)
    trials: list[TrialResult]  # in the sweep's order
    varying: list[str]  # override keys with more than one value, `train.seed` excluded
    groups: list[Group]  # in order of first appearance
    # Varying keys that an earlier varying key determines -> that key (not a setting of their
    # own: e.g. the learning rate each `model.name` trains with).
    follows: dict[str, str] = dataclasses.field(default_factory=dict)
    keys: list[str] = dataclasses.field(default_factory=list)  # override keys, sweep() order
    doc: str | None = None  # the experiment file's docstring
    baseline: dict[str, Any] | None = None  # its BASELINE (studies.compare)
    selection: dict[str, Any] | None = None  # selection.json of a selection phase
    diag_table: list[str] | None = None  # its DIAG_TABLE: diagnostics' keys to tabulate
    diag_match: str | None = None  # its DIAG_MATCH: the diagnostic key to match them at

    def counts(self) -> dict[str, int]:
        """Trials per status, every status of STATUSES included."""
        counts = dict.fromkeys(STATUSES, 0)
        for trial in self.trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        return counts

    def values(self, key: str) -> list[Any]:
        """The distinct values of a varying key, in order of first appearance."""
        seen: dict[str, Any] = {}
        for group in self.groups:
            seen.setdefault(repr(group.setting[key]), group.setting[key])
        return list(seen.values())


def load_sweep(directory: str | os.PathLike) -> Sweep:
    """Reads a sweep folder (`DIR/sweep.json` and every trial's files; unfinished trials are
    "missing") or a study folder (`DIR/study.json`, its compact data: `study_data`)."""
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(
            f"{path} is not a folder; pass the --workdir of a `bnlab sweep` run to `bnlab report`."
        )
    if (path / "sweep.json").is_file():
        spec = json.loads((path / "sweep.json").read_text())
        trials = [
            _load_trial(path / "runs" / t["trial_id"], t["trial_id"], t["overrides"])
            for t in spec["trials"]
        ]
        spec["doc"] = _docstring(spec.get("experiment", ""))
        spec["baseline"] = baseline_of(spec.get("experiment", ""))
        spec["diag_table"] = literal_of(spec.get("experiment", ""), "DIAG_TABLE")
        spec["diag_match"] = literal_of(spec.get("experiment", ""), "DIAG_MATCH")
        spec["selection"] = _read_json(path / "selection.json")
    elif (path / study_data.STUDY_FILE).is_file():
        spec = study_data.read(path)
        trials = [_stored_trial(t) for t in spec["trials"]]
    else:
        raise ConfigError(
            f"{path} has no sweep.json; pass the --workdir of a `bnlab sweep` run "
            "(run `bnlab sweep EXPERIMENT --workdir DIR` first), or a study folder with "
            f"{study_data.STUDY_FILE}."
        )
    keys = spec.get("keys") or []
    varying, follows = _split_dependent(trials, _varying_keys(trials, keys))
    return Sweep(
        path=path,
        experiment=spec.get("experiment", ""),
        smoke=bool(spec.get("smoke", False)),
        overrides=dict(spec.get("overrides", {})),
        trials=trials,
        varying=varying,
        groups=_group(trials, varying),
        follows=follows,
        keys=list(keys),
        doc=spec.get("doc"),
        baseline=spec.get("baseline"),
        selection=spec.get("selection"),
        diag_table=spec.get("diag_table"),
        diag_match=spec.get("diag_match"),
    )


def _docstring(experiment: str) -> str | None:
    try:
        return ast.get_docstring(ast.parse(Path(experiment).read_text()))
    except (OSError, SyntaxError, ValueError):
        return None


def literal_of(experiment: str | Path, name: str) -> Any:
    """The value of the experiment file's module-level literal `name` (None when it declares
    none), read without running the file."""
    try:
        tree = ast.parse(Path(experiment).read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    return None


def baseline_of(experiment: str | Path) -> dict[str, Any] | None:
    """The experiment file's `BASELINE` literal (None when it declares none)."""
    value = literal_of(experiment, "BASELINE")
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{experiment}: BASELINE must be a dict of dotted keys")
    return value


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _load_trial(run_dir: Path, tid: str, overrides: dict[str, str]) -> TrialResult:
    parsed = {k: parse_value(v) for k, v in overrides.items()}
    config = _read_json(run_dir / "config.json") or {}
    summary = _read_json(run_dir / "summary.json")
    if summary is None:  # not run yet, or interrupted before its summary (written last)
        return TrialResult(tid, parsed, "missing", {}, config, [], override_text=overrides)
    metrics = run_dir / "metrics.jsonl"
    records = read_jsonl(metrics) if metrics.is_file() else []
    by_split = {split: [r for r in records if r.get("split") == split] for split in SPLITS}
    return TrialResult(
        tid,
        parsed,
        str(summary.get("status", "failed")),
        summary,
        config,
        by_split["test"],
        by_split["validation"],
        by_split["diag"],
        by_split["train_eval"],
        override_text=overrides,
        evaluation=_read_json(run_dir / "evaluate.json") or {},
    )


def _stored_trial(t: dict[str, Any]) -> TrialResult:
    """A trial of a study folder's compact data."""
    records = t.get("records", {})
    return TrialResult(
        t["trial_id"],
        {k: parse_value(v) for k, v in t["overrides"].items()},
        t["status"],
        t["summary"],
        t["config"],
        *(records.get(split, []) for split in ("test", "validation", "diag", "train_eval")),
        override_text=t["overrides"],
        evaluation=t.get("evaluation", {}),
    )


def _varying_keys(trials: list[TrialResult], order: list[str] | None = None) -> list[str]:
    """Override keys with more than one value, in the order the sweep yields them (`order`,
    from sweep.json; else names before numbers, then alphabetical)."""
    keys = list(dict.fromkeys(k for t in trials for k in t.overrides if k != SEED_KEY))
    if order:
        keys.sort(key=lambda k: order.index(k) if k in order else len(order))
    else:
        keys.sort(key=lambda k: not all(isinstance(t.overrides.get(k, ""), str) for t in trials))
    return [k for k in keys if len({repr(t.overrides.get(k, UNSET)) for t in trials}) > 1]


def _split_dependent(
    trials: list[TrialResult], keys: list[str]
) -> tuple[list[str], dict[str, str]]:
    """`keys` without those that another, earlier key determines (a model's own learning rate
    beside `model.name`), and `{dependent key: the key it follows}`: they add no setting, only
    columns, so a report names them once instead."""

    def value(trial, key):
        return repr(trial.overrides.get(key, UNSET))

    kept, follows = [], {}
    for key in keys:
        leader = next(
            (
                k
                for k in kept
                if all(
                    len({value(t, key) for t in trials if value(t, k) == v}) == 1
                    for v in {value(t, k) for t in trials}
                )
            ),
            None,
        )
        if leader is None:
            kept.append(key)
        else:
            follows[key] = leader
    return kept, follows


def short_names(keys: list[str]) -> dict[str, str]:
    """`opt.lr` -> `lr`, unless two keys end alike (`opt.decay`, `norm.decay`): then in full."""
    ends = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: e if ends.count(e) == 1 else k for k, e in zip(keys, ends, strict=True)}


def format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _group(trials: list[TrialResult], varying: list[str]) -> list[Group]:
    names = short_names(varying)
    members: dict[tuple, list[TrialResult]] = {}
    for trial in trials:
        members.setdefault(_setting_key(trial, varying), []).append(trial)
    groups = []
    for members_of in members.values():
        setting = {k: members_of[0].overrides.get(k, UNSET) for k in varying}
        name = ", ".join(f"{names[k]}={format_value(v)}" for k, v in setting.items())
        groups.append(Group(name or "all trials", setting, members_of))
    return groups


def _setting_key(trial: TrialResult, varying: list[str]) -> tuple:
    return tuple(repr(trial.overrides.get(k, UNSET)) for k in varying)
