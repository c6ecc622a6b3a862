"""Sweeps: an experiment's grid expanded into trials with stable ids; only missing ones run.

An experiment file defines `get_config()` and, for a sweep, `sweep()` yielding dicts of dotted
overrides (`{"model.norm": "none", "opt.lr": 0.1}`). It may define `SMOKE`, overrides that
shrink every trial for a quick check (`--smoke`), and `sweep(smoke)` may yield a smaller grid.

Each trial runs into `DIR/runs/<trial_id>/`. A trial is finished once its `summary.json` exists
(written atomically, last); a sweep run again skips finished trials and resumes the others from
their latest checkpoints (`run.run` resumes a workdir), so an interrupted sweep loses at most
the steps since a trial's last checkpoint and duplicates no results.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

from bnlab import config as config_lib
from bnlab.writers import write_json


class Trial(NamedTuple):
    trial_id: str
    overrides: dict[str, str]  # dotted key -> value text, as on the command line


def trial_id(overrides: dict[str, Any]) -> str:
    """A readable, stable id: `lr-0.1_norm-none-3f2a9c1d` (the hash covers the full keys)."""
    canonical = json.dumps({k: str(v) for k, v in sorted(overrides.items())}, sort_keys=True)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    readable = "_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in sorted(overrides.items()))
    readable = "".join(c if c.isalnum() or c in "-_." else "-" for c in readable)[:80]
    return f"{readable}-{digest}" if readable else digest


def load_experiment(path: str | os.PathLike) -> ModuleType:
    """Imports an experiment file that defines `get_config()` and `sweep()`."""
    module = config_lib.load_module(path)
    if not hasattr(module, "sweep"):
        raise config_lib.ConfigError(
            f"{path} defines no sweep(); a sweep experiment yields dicts of overrides from it."
        )
    return module


def expand(module: ModuleType, *, smoke: bool = False) -> list[Trial]:
    """The trials of an experiment, in its order; duplicate grid points are an error."""
    takes_smoke = "smoke" in inspect.signature(module.sweep).parameters
    grid = module.sweep(smoke=smoke) if takes_smoke else module.sweep()
    trials, seen = [], {}
    for point in _as_dicts(grid):
        overrides = {k: _text(v) for k, v in point.items()}
        tid = trial_id(overrides)
        if tid in seen:
            raise config_lib.ConfigError(f"sweep() yields the same trial twice: {overrides}")
        seen[tid] = True
        trials.append(Trial(tid, overrides))
    if not trials:
        raise config_lib.ConfigError("sweep() yielded no trials.")
    return trials


def _as_dicts(grid: Iterable) -> Iterable[dict[str, Any]]:
    for point in grid:
        if not isinstance(point, dict):
            raise config_lib.ConfigError(f"sweep() must yield dicts of overrides, got {point!r}")
        yield point


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/N"` -> `(i, N)` with 0 <= i < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise config_lib.ConfigError(f"--shard {text!r}: expected i/N with 0 <= i < N, e.g. 0/4.")
    return index, count


def shard(trials: list[Trial], index: int, count: int) -> list[Trial]:
    """This shard's trials: by a hash of the id, so adding trials never moves the others."""
    return [t for t in trials if int(t.trial_id.rsplit("-", 1)[-1], 16) % count == index]


def trial_config(
    module: ModuleType, trial: Trial, *, smoke: bool, extra: dict[str, str]
) -> config_lib.Config:
    smoke_overrides = config_lib.smoke_overrides(module) if smoke else {}
    overrides = {**smoke_overrides, **trial.overrides, **extra}
    return config_lib.validate(config_lib.apply_overrides(config_lib.config_of(module), overrides))


def is_finished(run_dir: Path) -> bool:
    try:
        json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True


def run_sweep(
    path: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    smoke: bool = False,
    shard_spec: tuple[int, int] = (0, 1),
    overrides: dict[str, str] | None = None,
    runner: Callable[..., dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Runs this shard's unfinished trials; returns counts by status (`skipped` = finished)."""
    if runner is None:
        from bnlab.run import run as runner
    module = load_experiment(path)
    trials = expand(module, smoke=smoke)
    extra = dict(overrides or {})
    configs = {t.trial_id: trial_config(module, t, smoke=smoke, extra=extra) for t in trials}
    workdir = Path(workdir)
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    write_json(
        workdir / "sweep.json",
        {
            "experiment": str(path),
            "smoke": smoke,
            "overrides": extra,
            "trials": [{"trial_id": t.trial_id, "overrides": t.overrides} for t in trials],
        },
    )
    counts: dict[str, int] = {}
    mine = shard(trials, *shard_spec)
    for n, trial in enumerate(mine, 1):
        run_dir = workdir / "runs" / trial.trial_id
        if is_finished(run_dir):
            status = "skipped"
        else:  # new, or interrupted: the runner resumes it from its checkpoints
            status = _run_trial(runner, configs[trial.trial_id], run_dir)
        counts[status] = counts.get(status, 0) + 1
        log(f"[{n}/{len(mine)}] {trial.trial_id}: {status}")
    return counts


def _run_trial(runner, cfg: config_lib.Config, run_dir: Path) -> str:
    try:
        return runner(cfg, run_dir)["status"]
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - one failed trial must not stop its siblings
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            run_dir / "summary.json",
            {"status": "failed", "error": f"{type(err).__name__}: {err}",
             "traceback": traceback.format_exc()},
        )  # fmt: skip
        return "failed"
