"""Each diagnostic's cost as a share of training time, at the every_steps its study uses.

One process per configuration, alternating, several rounds, after one warm-up round that fills
the compilation cache (so every timed process reads its programs instead of compiling them):
`bnlab train` of the Fig. 1 MLP (experiments/bn_paper_mlp.py: BN, sigmoid, batch 60) for
`--epochs` epochs of MNIST (1,000 steps each), with diagnostics off (twice per round: the
spread between the two "off" processes is the noise floor) and with each diagnostic alone at
its study's settings:

  ics, landscape      every 250 steps, batch 128 (experiments/santurkar_ics.py, the MLP)
  hessian             every 500 steps, batch 512 (experiments/hessian_spectrum.py)
  activations         every 100 steps (the probe of bn_paper_fig1's percentiles)
  init_gradients      step 0 only (experiments/depth_gradients.py)

The time compared is the training loop's (`wall_time_s` of summary.json: the chunks, the
evaluations and the measurements between them), so start-up does not dilute the share.
Share = median(loop time with the diagnostic) / median(loop time off) - 1. Off, diagnostics add
nothing to the training program: tests/test_diagnostics_runs.py checks that its HLO is the
same with and without them and that the records are bit-identical.

Command: python benchmarks/diagnostic_cost.py [--rounds 3] [--epochs 2] [--mnist-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import env_info
from wall_time import ROOT, _env, run_process

CONFIGS = {
    "off": {},
    "off (again)": {},
    "ics": {"names": "ics", "every_steps": 250, "batch_size": 128},
    "landscape": {"names": "landscape", "every_steps": 250, "batch_size": 128},
    "hessian": {"names": "hessian", "every_steps": 500, "batch_size": 512},
    "activations": {"names": "activations", "every_steps": 100},
    "init_gradients": {"names": "init_gradients", "every_steps": 1_000_000},
}


def run_one(name: str, epochs: int, cache: Path, workdir: Path, mnist_dir: str) -> float:
    cmd = [
        sys.executable, "-m", "bnlab.cli", "train",
        "--config", "experiments/bn_paper_mlp.py", "--workdir", str(workdir),
        f"--config.train.epochs={epochs}",
        "--config.checkpoint.every_steps=0", "--no-progress",
    ]  # fmt: skip
    cmd += [f"--config.diagnostics.{k}={v}" for k, v in CONFIGS[name].items()]
    run_process(cmd, _env(mnist_dir, BNLAB_COMPILATION_CACHE=str(cache)))
    return json.loads((workdir / "summary.json").read_text())["wall_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--mnist-dir", default=os.environ.get("BNLAB_MNIST_DIR"))
    args = parser.parse_args()
    if not args.mnist_dir:
        parser.error("pass --mnist-dir DIR (the four MNIST IDX files) or set BNLAB_MNIST_DIR")
    mnist_dir = str(Path(args.mnist_dir).resolve())
    print(env_info.header())
    load = env_info.OtherLoad()
    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds + 1):  # round 0 warms the compilation cache
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                workdir = tmp / f"r{r}-{name.replace(' ', '_')}"
                seconds = run_one(name, args.epochs, tmp / "cache", workdir, mnist_dir)
                if r:
                    times[name].append(seconds)
    off = statistics.median(times["off"])
    steps = args.epochs * 1000
    print(f"\nFig. 1 MLP, {steps} steps at batch 60; the training loop's seconds, medians "
          f"over {args.rounds} rounds [min-max]")  # fmt: skip
    print(f"{'diagnostic':<16}{'every':>8}{'loop s':>9}{'[spread]':>16}{'share':>9}")
    for name in names:
        values = times[name]
        every = CONFIGS[name].get("every_steps", "-")
        every = "step 0" if every == 1_000_000 else every
        share = statistics.median(values) / off - 1
        print(f"{name:<16}{every!s:>8}{statistics.median(values):>9.2f}"
              f"{f'[{min(values):.2f}-{max(values):.2f}]':>16}{share:>+9.1%}")  # fmt: skip
    print(load.report())


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
