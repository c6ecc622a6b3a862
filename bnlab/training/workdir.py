"""A run's folder: what may be one (new, empty, or a bnlab run's), and the lock that gives it to
one run at a time.

A run holds `WORKDIR/.lock` with `flock(LOCK_EX | LOCK_NB)` for its whole life; the file names
the host and process inside, for the message another command gets. The OS drops the lock when
the process ends, however it ends, so a killed run never blocks its resume (its stale file is
simply locked again). In a multi-process run process 0 alone takes it, and every process agrees
on the outcome (`parallel.agree`): the run's other processes write none of its files, and shared
locks taken by all of them would not exclude a second run's shared locks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from bnlab import config as config_lib
from bnlab.config import ConfigError
from bnlab.training import parallel
from bnlab.training.checkpoint import CHECKPOINT_DIR, CORRUPT_DIR
from bnlab.training.run_files import (
    CONFIG_FILE,
    EVALUATE_FILE,
    EXPERIMENT_FILE,
    FAILURE_FILE,
    LOCK_FILE,
    SUMMARY_FILE,
)

RUN_FILES = frozenset(
    {CONFIG_FILE, SUMMARY_FILE, EXPERIMENT_FILE, FAILURE_FILE, LOCK_FILE, EVALUATE_FILE}
    | {"metrics.jsonl"}
)
RUN_FOLDERS = frozenset({CHECKPOINT_DIR, CORRUPT_DIR, "tensorboard"})
EXPORT_SUFFIXES = (".npz", ".pt")  # `bnlab export` may write a run's weights beside its files
PROBE_PREFIX = ".write_test."

_held: dict[str, int] = {}  # lock files this process holds -> how many holds (re-entrant)


class WorkdirBusy(ConfigError):
    """Another process holds the folder; the message names it."""


def folder_path(workdir: str | os.PathLike) -> Path:
    """`workdir` as a path; refuses an empty one (it would be the current folder)."""
    if not os.fspath(workdir).strip():
        raise ConfigError(
            "--workdir is empty; pass a folder path (a new folder, or a run's folder to resume)."
        )
    return Path(workdir)


def is_run_entry(path: Path) -> bool:
    """What a run's folder may hold: its files and folders, exports, temporary files of its
    writers (`.<name>.<...>.tmp`) and writability probes."""
    name = path.name
    if path.is_dir():
        return name in RUN_FOLDERS
    return (
        name in RUN_FILES
        or name.endswith(EXPORT_SUFFIXES)
        or name.startswith(PROBE_PREFIX)
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def read_run_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """The raw `config.json` of a run's folder; a damaged one, or one that is not a bnlab
    config, raises `ConfigError` saying what to do."""
    path = Path(workdir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(
            f"{path} is damaged ({err}): it is not the complete JSON a run writes. Restore it "
            "from a backup, or move it away: each checkpoint holds the run's config too, and "
            "the same `bnlab train` command then resumes the run and writes it again."
        ) from err
    groups = set(config_lib.groups())
    unknown = sorted(set(raw) - groups) if isinstance(raw, dict) else []
    if not isinstance(raw, dict) or unknown:
        what = f"unknown groups {', '.join(map(repr, unknown))}" if unknown else "not an object"
        raise ConfigError(
            f"{path} is not a bnlab run's config ({what}), so {Path(workdir)} is not a run's "
            "folder; a workdir is new, empty, or a bnlab run's. Choose another --workdir."
        )
    return raw


def check_workdir(path: Path) -> None:
    """Refuses a file, a folder of other files than a run's, and a finished run (an unfinished
    one is resumed). Reads only."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"workdir {path} is a file; pass a folder path to --workdir.")
    if not path.is_dir():
        return
    foreign = sorted(p.name for p in path.iterdir() if not is_run_entry(p))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if foreign[5:] else "")
        raise ConfigError(
            f"workdir {path} holds files that are not a bnlab run's ({listed}); a workdir is new, "
            "empty, or a bnlab run's folder. Choose another --workdir (a new or empty folder); "
            "nothing was written."
        )
    if (path / CONFIG_FILE).exists():
        read_run_config(path)
    if (path / SUMMARY_FILE).exists():
        raise ConfigError(
            f"workdir {path} already holds a finished run ({SUMMARY_FILE}); results are "
            "never overwritten. Choose a new --workdir or move the old one away."
        )


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Checks `workdir` (`check_workdir`), creates it and probes that it is writable."""
    path = folder_path(workdir)
    check_workdir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Named by host, process and chance: processes of several hosts may share the folder.
        probe = path / f"{PROBE_PREFIX}{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"workdir {path} is not writable ({err.strerror}); choose another --workdir."
        ) from err
    return path


@contextlib.contextmanager
def hold_workdir(workdir: str | os.PathLike) -> Iterator[Path]:
    """Prepares `workdir` and holds it for the block (`hold`); yields its path. Folders it
    created are removed on the way out if they are still empty (a run that could not start)."""
    path = folder_path(workdir)
    created = missing_folders(path)
    try:
        parallel.agree(lambda: prepare_workdir(path), (ConfigError,))
        with hold(path):
            # Again under the lock: a run that just finished or started in it is seen.
            parallel.agree(lambda: check_workdir(path), (ConfigError,))
            yield path
    finally:
        remove_empty(created)


@contextlib.contextmanager
def hold(folder: Path, *, wait: bool = False) -> Iterator[None]:
    """`folder/.lock` held by this run (its process 0) for the block; re-entrant in a process.
    Another holder raises `WorkdirBusy` naming it, in every process (or, with `wait`, is waited
    for: a brief section that shards of a sweep take in turn)."""
    with contextlib.ExitStack() as stack:

        def take() -> None:
            if parallel.is_primary():
                stack.enter_context(_lock(folder / LOCK_FILE, wait=wait))

        if jax.distributed.is_initialized():
            parallel.agree(take, (ConfigError,))
        else:  # alone; JAX's runtime untouched (a sweep locks before a trial may join others)
            stack.enter_context(_lock(folder / LOCK_FILE, wait=wait))
        yield


@contextlib.contextmanager
def _lock(path: Path, *, wait: bool) -> Iterator[None]:
    key = os.path.realpath(path)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _acquire(path, wait=wait)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while held: whoever locks it next makes a new one
            os.close(fd)


def _acquire(path: Path, *, wait: bool) -> int | None:
    """An open descriptor of `path` holding its lock (None where the filesystem has no locks)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            raise WorkdirBusy(_busy_message(path.parent, holder)) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(
                f"{path.parent} cannot be locked here ({err.strerror}); the run goes on without "
                "its lock: start no other command on this folder until it ends.",
                stacklevel=4,
            )
            return None
        if _same_file(fd, path):  # else its holder removed it as we opened it: take the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _busy_message(folder: Path, holder: list[str]) -> str:
    who = "another process"
    if len(holder) == 2:
        who = f"process {holder[1]} on host {holder[0]}"
    return (
        f"{folder} is in use by {who} (a run or sweep holds it until it ends). Wait for it to "
        "finish, or stop it first (a stopped run resumes with the same command); nothing was "
        "written."
    )


def missing_folders(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Removes `folders` (deepest first) while they are empty: nothing that holds a file, or
    existed before, is touched."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
