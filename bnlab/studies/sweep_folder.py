"""A sweep folder's guards: its index (sweep.json), the trial folders a shard holds while it
runs them, and the refusals that keep one folder to one sweep with unchanged trials.

The folder locks come from `bnlab.training.workdir`, imported when a sweep runs: validating a
sweep loads no JAX.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from bnlab import config as config_lib
from bnlab.training.run_files import FAILURE_FILE, LOCK_FILE
from bnlab.training.writers import write_json

SWEEP_FILE = "sweep.json"  # the index of a sweep folder's trials
SELECTION_FILES = ("selection", "selection.json")  # a selection phase's (studies.selection)


def claim(
    workdir: Path, trial_ids: list[str], claims: contextlib.ExitStack
) -> dict[str, contextlib.ExitStack]:
    """Holds the folders of the trials `trial_ids` (`claims` releases them) while the shard
    decides about them and runs them: another shard or command on one stops this one (exit 2,
    naming it). A trial without a folder yet is held by its runner."""
    from bnlab.training.workdir import hold

    claimed = {}
    for tid in trial_ids:
        run_dir = workdir / "runs" / tid
        claimed[tid] = claim = claims.enter_context(contextlib.ExitStack())
        if run_dir.is_dir():
            claim.enter_context(hold(run_dir))
    return claimed


def index(workdir: Path, spec: dict[str, Any]) -> None:
    """Writes sweep.json (and runs/) after checking that `workdir` may hold this sweep; the
    shards sharing the folder do this one at a time."""
    from bnlab.training.workdir import hold

    check_folder(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with hold(workdir, wait=True):
        _refuse_other_sweep(workdir, spec)
        (workdir / "runs").mkdir(exist_ok=True)
        write_json(workdir / SWEEP_FILE, spec)


def check_folder(workdir: Path) -> None:
    """A sweep folder is new, empty, or a sweep's (sweep.json, or only what a sweep writes
    before it: runs/, and a selection phase's selection/ and selection.json)."""
    if workdir.exists() and not workdir.is_dir():
        raise config_lib.ConfigError(f"{workdir} is a file; pass a folder path to --workdir.")
    if not workdir.is_dir() or (workdir / SWEEP_FILE).exists():
        return
    foreign = sorted(
        p.name
        for p in workdir.iterdir()
        if p.name not in ("runs", LOCK_FILE, *SELECTION_FILES) and not p.name.endswith(".tmp")
    )
    if foreign:
        raise config_lib.ConfigError(
            f"{workdir} holds files that are not a bnlab sweep's ({', '.join(foreign[:5])}); a "
            "sweep folder is new, empty, or one sweep's. Choose another --workdir; nothing was "
            "written."
        )


def empty_trial(run_dir: Path) -> None:
    """Removes an interrupted trial's files, keeping the folder and the lock this shard holds."""
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _refuse_other_sweep(workdir: Path, spec: dict[str, Any]) -> None:
    """A folder holds one variant of one sweep: trial ids cover only the grid point, and
    sweep.json (the index that reports read) lists one sweep's trials. Its own experiment file
    may change its grid, and a copy elsewhere (a shard's machine) may add trials; another file
    that would drop trials from the index is refused."""
    try:
        old = json.loads((workdir / SWEEP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return
    was = f"the sweep {old.get('experiment')} run with smoke={old.get('smoke')} and overrides "
    was += f"{old.get('overrides')}"
    if old.get("smoke") != spec["smoke"] or old.get("overrides") != spec["overrides"]:
        raise config_lib.ConfigError(
            f"{workdir} holds {was}; this run has smoke={spec['smoke']} and overrides "
            f"{spec['overrides']}. Use another --workdir for a different variant."
        )
    old_path = old.get("experiment_path") or os.path.abspath(old.get("experiment", ""))
    old_ids = {t["trial_id"] for t in old.get("trials", [])}
    dropped = old_ids - {t["trial_id"] for t in spec["trials"]}
    if old_path != spec["experiment_path"] and dropped:
        raise config_lib.ConfigError(
            f"{workdir} holds {was}; {spec['experiment']} is another experiment, without "
            f"{len(dropped)} of that sweep's {len(old_ids)} trials: running it here would drop "
            "them from sweep.json and the report. Use another --workdir for it, or move that "
            "folder away first."
        )


def refuse_changed_trial(run_dir: Path, cfg: config_lib.Config) -> None:
    """A finished trial is skipped only if it ran the config that the sweep gives it now (an
    edited experiment, or another one with the same grid, must not mix with its results)."""
    try:
        old = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    try:
        differences = config_lib.resume_differences(config_lib.from_dict(old), cfg)
    except config_lib.ConfigError as err:  # a config.json of an older bnlab
        differences = [f"its config.json no longer validates: {err}"]
    if differences:
        raise config_lib.ConfigError(
            f"{run_dir} finished with another config than this sweep gives that trial now ("
            + "; ".join(differences)
            + "). Use another --workdir for the changed experiment, or move the folder away."
        )


def set_failure_aside(run_dir: Path) -> None:
    """A failed attempt's summary.json becomes failure.json: the retry may resume the trial's
    checkpoints (a workdir with a summary is a finished run to the trainer)."""
    summary = run_dir / "summary.json"
    if summary.exists():
        os.replace(summary, run_dir / FAILURE_FILE)


def has_checkpoints(run_dir: Path) -> bool:
    from bnlab.training.checkpoint import CHECKPOINT_DIR

    return any((run_dir / CHECKPOINT_DIR).glob("*"))
