"""What a benchmark ran on: versions, CPU, bnlab's git revision and the machine's load."""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import subprocess
import time
from pathlib import Path

import flax
import jax
import optax

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout


def bnlab_revision() -> str:
    """The `HEAD` commit; `+dirty.<hash of the diff>` when bnlab/ has uncommitted changes."""
    try:
        head = _git("rev-parse", "--short", "HEAD").strip()
        diff = _git("diff", "HEAD", "--", "bnlab")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not diff:
        return head
    return f"{head}+dirty.{hashlib.sha256(diff.encode()).hexdigest()[:8]}"


def load_average() -> str:
    """1, 5 and 15 minute load averages: near 0 on an idle machine, more with other work."""
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def header(torch_version: str | None = None) -> str:
    versions = f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}"
    if torch_version is not None:
        versions += f", torch {torch_version}"
    return (
        f"{versions}\nbackend {jax.default_backend()}, {os.cpu_count()} CPUs ({cpu_model()}); "
        f"bnlab {bnlab_revision()}; load average {load_average()}"
    )


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have run since boot (user, nice, system, irq, softirq)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(f) for f in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """This process's CPU time and that of the child processes it waited for (a benchmark
    that runs each implementation in its own process counts those as its own)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def cpu_snapshot() -> tuple[float, float | None, float]:
    """`(wall clock, CPU seconds of all processes, this process's and its children's)`."""
    return time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()


def other_cores(since: tuple[float, float | None, float]) -> float:
    """Cores that other processes used on average since `cpu_snapshot()` (NaN without
    /proc/stat)."""
    wall0, busy0, own0 = since
    busy1 = _busy_cpu_seconds()
    if busy0 is None or busy1 is None:
        return float("nan")
    other = max((busy1 - busy0) - (_own_cpu_seconds() - own0), 0.0)
    return other / max(time.perf_counter() - wall0, 1e-9)


class OtherLoad:
    """Measures how much CPU other processes took while a benchmark ran (Linux only).

    Any such load slows the measured code down, PyTorch's OpenMP threads most of all, so the
    report says how much there was: near 0 cores means the numbers are clean.
    """

    def __init__(self):
        self._start = cpu_snapshot()

    def report(self) -> str:
        cores = other_cores(self._start)
        if cores != cores:  # NaN
            return "other processes' CPU use: unknown (no /proc/stat)"
        wall = time.perf_counter() - self._start[0]
        verdict = "clean" if cores < 0.1 else "DISTURBED: rerun on an idle machine"
        return (
            f"other processes used {cores * wall:.1f} CPU-s in {wall:.0f} s "
            f"({cores:.2f} of {os.cpu_count()} cores on average): {verdict}"
        )
