"""Sweeps: an experiment's grid expanded into trials with stable ids; only missing ones run.

An experiment file defines `get_config()` and, for a sweep, `sweep()` yielding dicts of dotted
overrides (`{"model.norm": "none", "opt.lr": 0.1}`). It may define `SMOKE`, overrides that
shrink every trial for a quick check (`--smoke`), and `sweep(smoke)` may yield a smaller grid.

Trials that differ only in seed and numeric optimizer hyperparameters train together in one
vmapped program (`bnlab.training.batched`). Each trial runs into `DIR/runs/<trial_id>/`. A trial is
finished once its `summary.json` exists (written atomically, last) with any status but
failed (ok, diverged, early_stopped); a sweep run again skips finished trials and retries failed
ones. An interrupted trial resumes from its latest checkpoint through the single-run trainer
(`run.run` resumes a workdir; vmapped trials save checkpoints in its format); one interrupted
before any checkpoint is redone from scratch. Either way nothing is lost or duplicated.

`DIR` holds one variant of one sweep (`DIR/sweep.json` indexes its trials for reports): another
experiment that lacks some of its trials, other `--smoke`/`--config` overrides, or a finished
trial whose config has changed since is refused with a `ConfigError`. Shards share `DIR` and
run different trials at once: a shard holds each unfinished trial's folder (its lock, as a run
holds its workdir) from deciding about it to the shard's end, and `DIR` itself only while it
writes sweep.json; a second command on a held trial stops with exit status 2, naming its holder.
"""

from __future__ import annotations

import contextlib
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
from bnlab.data import DataError
from bnlab.studies import selection
from bnlab.studies import sweep_folder as folder
from bnlab.studies.sweep_folder import SWEEP_FILE  # noqa: F401 - part of this API
from bnlab.training.run_files import FAILURE_FILE  # noqa: F401 - part of this API
from bnlab.training.writers import write_json

ENGINES = ("vmap", "sequential")


def _user_errors() -> tuple[type[Exception], ...]:
    """Bad input stops the sweep with its message (a missing dataset, a resume refused for a
    changed config): every trial would fail alike, and recording them as failed would hide the
    fix. (Read once trials run: validating a sweep loads no JAX or orbax.)"""
    from bnlab.training.checkpoint import CheckpointError

    return config_lib.ConfigError, DataError, CheckpointError


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


def _takes_smoke(module: ModuleType) -> bool:
    return "smoke" in inspect.signature(module.sweep).parameters


def smoke_notes(module: ModuleType, path: str | os.PathLike) -> list[str]:
    """What `--smoke` falls back to for an experiment that does not say: the default `SMOKE`
    overrides, and the whole grid of a `sweep()` without a `smoke` argument."""
    notes = [config_lib.smoke_note(module, path)]
    if not _takes_smoke(module):
        notes.append(
            f"{path}'s sweep() takes no smoke argument: --smoke runs its whole grid ("
            f"{len(expand(module))} trials), each shrunk (give it `def sweep(smoke=False)` to "
            "yield a smaller grid)"
        )
    return [n for n in notes if n]


def expand(
    module: ModuleType, *, smoke: bool = False, chosen: dict[str, dict] | None = None
) -> list[Trial]:
    """The trials of an experiment, in its order; duplicate grid points are an error. For a
    study with a selection phase, the confirmation trials for `chosen` (each arm's choice;
    default: its first candidate, to validate them before the selection has run)."""
    kwargs: dict[str, Any] = {"smoke": smoke} if _takes_smoke(module) else {}
    if selection.declares(module):
        if "chosen" not in inspect.signature(module.sweep).parameters:
            raise config_lib.ConfigError(
                "an experiment with candidates() (a selection phase) defines sweep(chosen, "
                "smoke=False): the confirmation trials for each arm's chosen overrides."
            )
        plan = selection.plan(module, smoke=smoke, path=_name(module))
        kwargs["chosen"] = chosen or selection.placeholder(plan)
    return _trials(module.sweep(**kwargs))


def _trials(grid: Iterable) -> list[Trial]:
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


def trial_configs(
    module: ModuleType,
    *,
    smoke: bool = False,
    overrides: dict[str, str] | None = None,
    chosen: dict[str, dict] | None = None,
) -> tuple[list[Trial], dict[str, config_lib.Config]]:
    """Every trial of the experiment and its validated config (`ConfigError` on the first
    trial that cannot run); `overrides` apply to all of them. For a study with a selection
    phase, the confirmation trials for `chosen`; the selection trials are checked too."""
    extra = dict(overrides or {})
    trials = expand(module, smoke=smoke, chosen=chosen)
    configs = {t.trial_id: trial_config(module, t, smoke=smoke, extra=extra) for t in trials}
    if selection.declares(module):
        plan, _, _ = selection_trials(module, smoke=smoke, overrides=extra)
        selection.check_fresh_seeds(configs, plan, _name(module))
    return trials, configs


def selection_trials(
    module: ModuleType, *, smoke: bool = False, overrides: dict[str, str] | None = None
) -> tuple[selection.Plan, list[Trial], dict[str, config_lib.Config]]:
    """A selection study's plan and its selection trials with their validated configs."""
    plan = selection.plan(module, smoke=smoke, path=_name(module))
    trials = _trials(selection.trial_points(plan))
    extra = dict(overrides or {})
    configs = {t.trial_id: trial_config(module, t, smoke=smoke, extra=extra) for t in trials}
    selection.check_selection_configs(configs, _name(module))
    return plan, trials, configs


def _name(module: ModuleType) -> str:
    return getattr(module, "__file__", None) or module.__name__


def is_finished(run_dir: Path) -> bool:
    """A trial with a result (ok, diverged, early_stopped); a failed one is retried by the next
    run."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return summary.get("status") != "failed"


def run_sweep(
    path: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    smoke: bool = False,
    shard_spec: tuple[int, int] = (0, 1),
    overrides: dict[str, str] | None = None,
    runner: Callable[..., dict[str, Any]] | None = None,
    engine: str = "vmap",
    max_chunk: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, int]:
    """Runs this shard's unfinished trials; returns counts by status (`skipped` = finished).

    With `engine="vmap"`, trials that share a structure train together in one compiled
    program (`bnlab.training.batched`, at most `max_chunk` at a time); a lone trial, or every trial
    with `engine="sequential"`, runs through `runner` (default: the single-run trainer).
    A study with a selection phase (`bnlab.studies.selection`) runs its selection trials into
    `DIR/selection/` first, writes `DIR/selection.json`, then the confirmation trials into `DIR`.
    """
    if engine not in ENGINES:
        raise config_lib.ConfigError(f"engine {engine!r} is not one of {ENGINES}")
    extra = dict(overrides or {})
    module = load_experiment(path)
    trials, configs = trial_configs(module, smoke=smoke, overrides=extra)  # all checked first
    if runner is None:
        from bnlab.training.run import run as runner
    from bnlab.training.workdir import folder_path  # at run time: validating loads no JAX

    workdir = folder_path(workdir)
    spec = {"experiment": str(path), "experiment_path": os.path.abspath(path), "smoke": smoke}
    spec["overrides"] = extra
    phase = _Phase(spec, shard_spec, runner, engine, max_chunk, log)
    counts: dict[str, int] = {}
    if selection.declares(module):
        folder.check_folder(workdir)
        chosen_by = _select(module, workdir, phase, counts, extra, smoke)
        if chosen_by is None:
            return counts
        trials, configs = trial_configs(module, smoke=smoke, overrides=extra, chosen=chosen_by)
    phase.run(trials, configs, workdir, counts)
    return counts


def _select(module, workdir: Path, phase: _Phase, counts, extra, smoke):
    """The selection phase: its trials into DIR/selection, then the choice (None while another
    shard still runs some of them)."""
    from bnlab.studies.results import load_sweep

    plan, trials, configs = selection_trials(module, smoke=smoke, overrides=extra)
    phase.log(f"selection phase: {len(trials)} trials into {workdir / selection.SELECTION_DIR}")
    phase.run(trials, configs, workdir / selection.SELECTION_DIR, counts, kind="selection")
    result = selection.choose(plan, load_sweep(workdir / selection.SELECTION_DIR), trial_id)
    if result is None:
        phase.log(
            "selection phase unfinished: other shards still run some of its trials; run this "
            "command again once they finish, to choose and run the confirmation trials."
        )
        return None
    write_json(workdir / selection.SELECTION_FILE, result)
    for arm, entry in result["arms"].items():
        row = entry["candidates"][entry["chosen_index"]]
        phase.log(
            f"selection: arm {arm}: chose {entry['chosen']} (mean {plan.split} {plan.metric} "
            f"{row['mean']:.4f} over seeds {plan.seeds})"
        )
    return selection.chosen(result)


class _Phase(NamedTuple):
    spec: dict[str, Any]  # what every phase's sweep.json shares
    shard_spec: tuple[int, int]
    runner: Callable[..., dict[str, Any]]
    engine: str
    max_chunk: int | None
    log: Callable[[str], None]

    def run(self, trials, configs, workdir: Path, counts: dict[str, int], kind: str = "") -> None:
        """Indexes `workdir` for `trials` and runs this shard's unfinished ones."""
        spec = {
            **self.spec,
            **({"phase": kind} if kind else {}),
            "trials": [{"trial_id": t.trial_id, "overrides": t.overrides} for t in trials],
            # The override keys in the order sweep() yields them (JSON objects are sorted).
            "keys": list(dict.fromkeys(k for t in trials for k in t.overrides)),
        }
        folder.index(workdir, spec)
        _run_trials(trials, configs, workdir, counts, self)


def _run_trials(trials, configs, workdir: Path, counts: dict[str, int], phase: _Phase) -> None:
    log = phase.log
    mine = shard(trials, *phase.shard_spec)
    if not mine:
        index, count = phase.shard_spec
        log(
            f"shard {index}/{count} holds none of the sweep's {len(trials)} trials (trials go to "
            "shards by a hash of their id); the other shards run them."
        )
    resume, todo = [], []
    with contextlib.ExitStack() as claims:  # the unfinished trials' folders, till the shard ends
        # All of them before anything is changed.
        claimed = folder.claim(workdir, [t.trial_id for t in mine], claims)
        for trial in mine:
            run_dir = workdir / "runs" / trial.trial_id
            if is_finished(run_dir):
                claimed[trial.trial_id].close()
                folder.refuse_changed_trial(run_dir, configs[trial.trial_id])
                counts["skipped"] = counts.get("skipped", 0) + 1
                log(f"{trial.trial_id}: finished before, skipped")
            elif folder.has_checkpoints(run_dir):  # the runner resumes it from its checkpoints
                folder.set_failure_aside(run_dir)
                resume.append(trial)
            else:  # new, or interrupted before any checkpoint: from scratch
                folder.empty_trial(run_dir)
                todo.append(trial)
        groups = _groups(todo, configs) if phase.engine == "vmap" else [[t] for t in todo]
        for group in [[t] for t in resume] + groups:
            dirs = [workdir / "runs" / t.trial_id for t in group]
            cfgs = [configs[t.trial_id] for t in group]
            if len(group) == 1:
                statuses = [_run_trial(phase.runner, cfgs[0], dirs[0])]
            else:
                statuses = _run_group(cfgs, dirs, phase.max_chunk, log)
            for trial, status in zip(group, statuses, strict=True):
                counts[status] = counts.get(status, 0) + 1
                log(f"{trial.trial_id}: {status}")


def _groups(trials: list[Trial], configs: dict[str, config_lib.Config]) -> list[list[Trial]]:
    from bnlab.training.batched import group_by_structure

    # Multi-device trials run alone, through the single-run trainer's device programs.
    alone = [[t] for t in trials if configs[t.trial_id].parallel.mode != "none"]
    trials = [t for t in trials if configs[t.trial_id].parallel.mode == "none"]
    indices = group_by_structure([configs[t.trial_id] for t in trials])
    return [[trials[i] for i in group] for group in indices] + alone


def _run_group(cfgs, dirs: list[Path], max_chunk: int | None, log) -> list[str]:
    """Trials of one structure in one vmapped program; if it fails, every one is failed."""
    from bnlab.training.batched import run_group

    try:
        return [s["status"] for s in run_group(cfgs, dirs, max_chunk=max_chunk, log=log)]
    except (KeyboardInterrupt, SystemExit, *_user_errors()):
        raise
    except Exception as err:  # noqa: BLE001 - one failed group must not stop the others
        for run_dir in dirs:  # earlier chunks of the group keep their results
            if not is_finished(run_dir):
                _write_failure(run_dir, err)
        return [_status(d) for d in dirs]


def _status(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["status"]


def _run_trial(runner, cfg: config_lib.Config, run_dir: Path) -> str:
    try:
        return runner(cfg, run_dir)["status"]
    except (KeyboardInterrupt, SystemExit, *_user_errors()):
        raise
    except Exception as err:  # noqa: BLE001 - one failed trial must not stop its siblings
        _write_failure(run_dir, err)
        return "failed"


def _write_failure(run_dir: Path, err: Exception) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / "summary.json",
        {"status": "failed", "error": f"{type(err).__name__}: {err}",
         "traceback": traceback.format_exc()},
    )  # fmt: skip
