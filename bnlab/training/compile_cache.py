"""Compilation paid once: JAX's persistent compilation cache in a user-level folder, and a
count of the programs a command compiles.

`bnlab` commands call `enable()` before anything compiles; a notebook calls it once at the
top. A second run of the same config then loads every program from the cache instead of
compiling it, and the trials of a sweep share their identical programs. The folder is
`$BNLAB_COMPILATION_CACHE` if set (`off` disables the cache), else JAX's own setting
(`$JAX_COMPILATION_CACHE_DIR`), else `$XDG_CACHE_HOME/bnlab/jax` (`~/.cache/bnlab/jax`). It
is safe to delete at any time: a missing entry is compiled again. JAX keys every entry on
the program, the jax/jaxlib versions, the backend and the compile options, and XLA:CPU
refuses an entry compiled for another CPU's features, so one folder can serve several
environments.
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import jax
from jax.experimental.compilation_cache import compilation_cache

CACHE_ENV = "BNLAB_COMPILATION_CACHE"
OFF = ("off", "0", "none", "false")
# jax.monitoring events: every executable a program needed (compiled or read from the cache),
# with the cache on the ones read from it, and the tracing and lowering before each.
_EXECUTABLE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_STAGE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                 "/jax/core/compile/jaxpr_to_mlir_module_duration")  # fmt: skip


def default_dir() -> Path:
    """`$XDG_CACHE_HOME/bnlab/jax`, or `~/.cache/bnlab/jax` (the XDG default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path("~") / ".cache"
    return Path(base).expanduser() / "bnlab" / "jax"


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turns on JAX's persistent compilation cache for this process, for every program
    however fast it compiles; returns its folder (None: disabled by `$BNLAB_COMPILATION_CACHE`,
    or a folder that cannot be written, which one line on stderr names).

    Call it before the first compile (the `bnlab` command does): a later call that changes
    the folder resets JAX's cache state so that the next compile uses the new folder.

    Args:
      path: the cache folder; default: `$BNLAB_COMPILATION_CACHE`, else a folder JAX was
        already given (`$JAX_COMPILATION_CACHE_DIR`), else `default_dir()`.

    Returns:
      The folder, or None when the environment turns the cache off or it cannot be written.
    """
    if path is None:
        setting = os.environ.get(CACHE_ENV, "").strip()
        if setting.lower() in OFF:
            return None
        path = setting or jax.config.jax_compilation_cache_dir or default_dir()
    folder = Path(path).expanduser()
    problem = _unwritable(folder)
    if problem:  # else JAX warns once per program it cannot store, and goes on without it
        print(
            f"bnlab: the compilation cache {folder} cannot be written ({problem}); programs are "
            f"compiled without it. Set ${CACHE_ENV} to a writable folder, or to off.",
            file=sys.stderr,
            flush=True,
        )
        if jax.config.jax_compilation_cache_dir is not None:
            compilation_cache.set_cache_dir(None)
            compilation_cache.reset_cache()
        return None
    if jax.config.jax_compilation_cache_dir != str(folder):
        compilation_cache.set_cache_dir(str(folder))
        compilation_cache.reset_cache()  # JAX decides once per process whether to use it
    # JAX's default caches only programs that took over a second to compile; bnlab's small
    # programs (init, evaluation, the key derivations) add up to seconds too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


def _unwritable(folder: Path) -> str | None:
    """Why no file can be written in `folder` (created if missing), or None."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as err:
        return err.strerror or str(err)


class Counts(NamedTuple):
    """Executables a process has needed so far (a difference of two is a command's)."""

    programs: int  # compiled or read from the persistent cache
    cached: int  # of those, read from the cache
    seconds: float  # spent tracing, lowering and compiling (or reading) them
    names: tuple[str, ...] = ()  # of the programs, in order (e.g. "jit(train_epoch)")

    @property
    def compiled(self) -> int:
        return self.programs - self.cached

    def __sub__(self, earlier: Counts) -> Counts:  # type: ignore[override]
        return Counts(
            self.programs - earlier.programs,
            self.cached - earlier.cached,
            self.seconds - earlier.seconds,
            self.names[len(earlier.names) :],
        )

    def describe(self) -> str:
        """One line: how many programs, compiled or read, in what time, and their names."""
        seen = collections.Counter(self.names)
        names = ", ".join(f"{n} x{k}" if k > 1 else n for n, k in seen.items())
        return (
            f"{self.programs} programs: {self.compiled} compiled, {self.cached} read from the "
            f"compilation cache, in {self.seconds:.2f} s with tracing and lowering ({names})"
        )


_lock = threading.Lock()
_totals = Counts(0, 0, 0.0)
_listening = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    global _totals
    if event == _EXECUTABLE_EVENT:
        with _lock:
            p, c, s, names = _totals
            _totals = Counts(p + 1, c, s + duration, (*names, str(kwargs.get("fun_name", "?"))))
    elif event in _STAGE_EVENTS:
        with _lock:
            _totals = _totals._replace(seconds=_totals.seconds + duration)


def _on_event(event: str, **kwargs) -> None:
    global _totals
    del kwargs  # nothing else needed for a count
    if event == _HIT_EVENT:
        with _lock:
            _totals = _totals._replace(cached=_totals.cached + 1)


def counts() -> Counts:
    """What this process has compiled since `counts()` was first called (it starts listening
    to `jax.monitoring`); the difference of two calls is what ran in between.

    Returns:
      `Counts(programs, cached, seconds, names)`.
    """
    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _listening = True
        return _totals
