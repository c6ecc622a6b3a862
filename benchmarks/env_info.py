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
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class OtherLoad:
    """Measures how much CPU other processes took while a benchmark ran (Linux only).

    Any such load slows the measured code down, PyTorch's OpenMP threads most of all, so the
    report says how much there was: near 0 cores means the numbers are clean.
    """

    def __init__(self):
        self._start = (time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds())

    def report(self) -> str:
        wall0, busy0, own0 = self._start
        busy1 = _busy_cpu_seconds()
        if busy0 is None or busy1 is None:
            return "other processes' CPU use: unknown (no /proc/stat)"
        wall = time.perf_counter() - wall0
        other = max((busy1 - busy0) - (_own_cpu_seconds() - own0), 0.0)
        verdict = "clean" if other / wall < 0.1 else "DISTURBED: rerun on an idle machine"
        return (
            f"other processes used {other:.1f} CPU-s in {wall:.0f} s "
            f"({other / wall:.2f} of {os.cpu_count()} cores on average): {verdict}"
        )
