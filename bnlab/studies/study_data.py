"""A study's compact data: everything its report is built from, small enough to commit.

`write(sweep, out)` writes `OUT/study.json` for a sweep read back (`results.load_sweep`): the
sweep's index (experiment, smoke, overrides, key order), the experiment's docstring and
`BASELINE`, the selection phase's choice (`selection.json`, also copied beside it), and per trial
its overrides, status, summary.json (without a failure's traceback), config.json, evaluate.json
(`bnlab evaluate --recalibrate`) where there is one, and the records a report reads (test,
validation, train_eval, diag; not the training windows). `results.load_sweep(OUT)` reads such a
folder into the same `Sweep` as the sweep folder it came from, so `bnlab report OUT` rebuilds
the committed report from the folder alone.

One trial per line, keys sorted, floats as Python writes them (they read back exactly): a
re-run shows in `git diff` as the trials whose numbers changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STUDY_FILE = "study.json"
FORMAT = 1
SPLITS = ("test", "validation", "train_eval", "diag")


def to_dict(sweep: Any) -> dict[str, Any]:
    """The compact data of a `results.Sweep`."""
    return {
        "format": FORMAT,
        "experiment": sweep.experiment,
        "smoke": sweep.smoke,
        "overrides": sweep.overrides,
        "keys": sweep.keys,
        "doc": sweep.doc,
        "baseline": sweep.baseline,
        "selection": sweep.selection,
        **({"diag_table": sweep.diag_table} if sweep.diag_table else {}),
        **({"diag_match": sweep.diag_match} if sweep.diag_match else {}),
        "trials": [
            {
                "trial_id": t.trial_id,
                "overrides": t.override_text,
                "status": t.status,
                "summary": {k: v for k, v in t.summary.items() if k != "traceback"},
                "config": t.config,
                "records": {split: t.records(split) for split in SPLITS if t.records(split)},
                **({"evaluation": t.evaluation} if t.evaluation else {}),
            }
            for t in sweep.trials
        ],
    }


def write(sweep: Any, out: str | os.PathLike) -> Path:
    """Writes OUT/study.json (and OUT/selection.json for a study with a selection phase)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = to_dict(sweep)
    trials = data.pop("trials")
    lines = [json.dumps(data, sort_keys=True)[:-1] + ', "trials": [']
    lines += [
        "  " + json.dumps(t, sort_keys=True) + ("," if i < len(trials) - 1 else "")
        for i, t in enumerate(trials)
    ]
    _replace(out / STUDY_FILE, "\n".join([*lines, "]}", ""]))
    if sweep.selection is not None:
        _replace(out / "selection.json", json.dumps(sweep.selection, indent=1, sort_keys=True))
    return out / STUDY_FILE


def read(directory: str | os.PathLike) -> dict[str, Any]:
    data = json.loads((Path(directory) / STUDY_FILE).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(
            f"{directory}/{STUDY_FILE} has format {data.get('format')!r}; this bnlab reads "
            f"format {FORMAT}. Rebuild it with `bnlab report SWEEP_DIR --data {directory}`."
        )
    return data


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
