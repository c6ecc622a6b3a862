"""How fast the command answers: `--help`, and a bad override refused, each in a fresh process.

Cases, each `bnlab ...` started as a user starts it (the venv's `bnlab` script), from the
repository root, with the environment of a user's shell (no JAX/bnlab settings of ours, Python
caching compiled modules):
  python        `python -c pass`: the interpreter's own start, the floor of every case
  help          `bnlab --help`
  train-help    `bnlab train --help`
  bad-lr        `bnlab train --config experiments/mnist_cnn.py --workdir W --config.opt.lr=nan`
  unknown-key   the same with `--config.opt.lrr=0.1` (exit status 2 for both)
and the import of `bnlab.cli` alone, from `python -X importtime` (its cumulative time, and
whether JAX and Flax were imported). Each round runs every case once, in order; the results
are medians over rounds [min-max]. `--baseline DIR` runs the same cases with another checkout
of bnlab first on PYTHONPATH (e.g. `git archive e5d0679 | tar -x -C DIR`), alternating with
this one, so the two are compared under the same load. The last line says how much CPU other
processes took meanwhile.

Command: python benchmarks/cli_latency.py [--rounds 7] [--baseline DIR]
Runtime: about 10 s per round (20 s with --baseline) on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import env_info

ROOT = env_info.ROOT
BNLAB = Path(sys.executable).parent / "bnlab"  # the venv's console script
CNN = ["--config", "experiments/mnist_cnn.py"]


def cases(workdir: str) -> dict[str, list[str]]:
    """Case -> its command line (the `bnlab` script run by this Python)."""
    bnlab = [sys.executable, str(BNLAB)]
    return {
        "python": [sys.executable, "-P", "-c", "pass"],
        "help": [*bnlab, "--help"],
        "train-help": [*bnlab, "train", "--help"],
        "bad-lr": [*bnlab, "train", *CNN, "--workdir", workdir, "--config.opt.lr=nan"],
        "unknown-key": [*bnlab, "train", *CNN, "--workdir", workdir, "--config.opt.lrr=0.1"],
    }


def environment(tree: Path) -> dict[str, str]:
    drop = ("JAX_", "BNLAB_", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "PYTHONPATH": str(tree)}


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """`(wall seconds, exit status)` of one command, from process start to exit."""
    tick = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - tick, proc.returncode


def import_time(env: dict[str, str]) -> tuple[float, str]:
    """`(seconds, heavy modules loaded)` of `import bnlab.cli`, from `-X importtime`."""
    code = "import sys, bnlab.cli; print([m for m in ('jax', 'flax') if m in sys.modules])"
    proc = subprocess.run(
        [sys.executable, "-P", "-X", "importtime", "-c", code],  # -P: PYTHONPATH's bnlab
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.rstrip().endswith("| bnlab.cli")]
    cumulative_us = int(line.split("|")[1])
    return cumulative_us / 1e6, proc.stdout.strip()


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline", type=Path, help="another checkout of bnlab to compare")
    args = parser.parse_args()
    trees = {"this": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    print(env_info.header())
    print(f"python {sys.version.split()[0]}; each case a fresh process; {args.rounds} rounds")
    for name, tree in trees.items():
        print(f"  {name}: {tree}")
    other_load = env_info.OtherLoad()
    walls: dict[tuple[str, str], list[float]] = {}
    statuses: dict[tuple[str, str], set[int]] = {}
    imports: dict[str, list[float]] = {name: [] for name in trees}
    heavy: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="bnlab-cli-") as tmp:
        for r in range(args.rounds):
            for name, tree in trees.items():
                env = environment(tree)
                for case, cmd in cases(str(Path(tmp) / "run")).items():
                    wall, status = timed(cmd, env)
                    walls.setdefault((name, case), []).append(wall)
                    statuses.setdefault((name, case), set()).add(status)
                seconds, heavy[name] = import_time(env)
                imports[name].append(seconds)
            print(f"  round {r + 1} done, load average {env_info.load_average()}", flush=True)
    print(f"\nwhole command, seconds: median [min-max] over {args.rounds} rounds")
    print(f"{'case':12s} " + "  ".join(f"{name:>24s}" for name in trees) + "  exit")
    for case in cases(""):
        cells = "  ".join(f"{_summary(walls[(name, case)]):>24s}" for name in trees)
        print(f"{case:12s} {cells}  {sorted(statuses[('this', case)])}")
    cells = "  ".join(f"{_summary(imports[name]):>24s}" for name in trees)
    print(f"{'import cli':12s} {cells}  (-X importtime, cumulative)")
    for name in trees:
        print(f"  {name}: JAX/Flax loaded by `import bnlab.cli`: {heavy[name]}")
    print(other_load.report())


if __name__ == "__main__":
    if not BNLAB.exists():
        sys.exit(f"no bnlab script beside {sys.executable}: run this with the project's venv")
    main()
