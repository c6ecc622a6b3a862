"""The cost of chunks short enough for the progress display to move (`train.progress_seconds`).

The same `bnlab train` command runs with `train.progress_seconds=5` (the default: a chunk of
about 5 s, so the bar and the log lines move every few seconds) and `=0` (whole blocks of
`checkpoint.every_steps` or an epoch, as before), each in its own fresh process, alternating
(the order flips every round), several rounds. One unmeasured run first fills the compilation
cache, so every measured run reads its programs from it, as a user's second run does. Reported:
the whole command's wall time per setting (median, min-max over rounds), its train lines (one
per log window), and the ratio of the medians: the cost of the shorter chunks.

Command: python benchmarks/progress_chunks.py [--rounds 3] [--job cnn|mlp] [--mnist-dir DIR]
Runtime: per round, two main jobs (cnn, about 2 x 50 s on an idle 2-core CPU) or two 1-epoch
MLP runs (mlp, about 2 x 12 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import env_info

ROOT = env_info.ROOT
JOBS = {
    "cnn": ["--config", "experiments/mnist_cnn.py"],  # the main job: 2 epochs, 936 steps
    "mlp": ["--config", "experiments/bn_paper_mlp.py", "--config.train.epochs=1"],
}
SETTINGS = ("5", "0")  # train.progress_seconds


def run_once(job: str, seconds: str, workdir: Path, env: dict) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "bnlab.cli", "train", *JOBS[job], "--workdir", str(workdir)]
    cmd += [f"--config.train.progress_seconds={seconds}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    lines = sum(1 for x in done.stderr.splitlines() if x.startswith("step ") and " loss " in x)
    json.loads((workdir / "summary.json").read_text())  # finished
    return wall, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--job", choices=sorted(JOBS), default="cnn")
    parser.add_argument(
        "--mnist-dir", default=os.environ.get("BNLAB_MNIST_DIR", "../shared/data/mnist")
    )
    args = parser.parse_args()
    print(env_info.header())
    since = env_info.cpu_snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BNLAB_MNIST_DIR": args.mnist_dir}
        env["BNLAB_COMPILATION_CACHE"] = str(Path(tmp) / "cache")
        run_once(args.job, "5", Path(tmp) / "warm-up", env)  # fills the compilation cache
        walls: dict[str, list[float]] = {s: [] for s in SETTINGS}
        lines: dict[str, int] = {}
        for r in range(args.rounds):
            for s in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                wall, lines[s] = run_once(args.job, s, Path(tmp) / f"r{r}-{s}", env)
                walls[s].append(wall)
                print(f"round {r}: progress_seconds={s}: {wall:.2f} s", flush=True)
    print(f"\njob {args.job} ({' '.join(JOBS[args.job])}), {args.rounds} rounds, warm cache")
    for s in SETTINGS:
        w = walls[s]
        print(
            f"  progress_seconds={s}: median {statistics.median(w):.2f} s "
            f"(min {min(w):.2f}, max {max(w):.2f}), {lines[s]} train lines"
        )
    ratio = statistics.median(walls["5"]) / statistics.median(walls["0"])
    print(
        f"  cost of the shorter chunks: {100 * (ratio - 1):+.1f}% of the whole command "
        "(target: < 3%)"
    )
    print(f"other processes used {env_info.other_cores(since):.2f} cores on average meanwhile")


if __name__ == "__main__":
    main()
