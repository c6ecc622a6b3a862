"""The time a user waits: whole commands, each implementation in its own process, alternating.

Jobs (settings of bnlab's experiment files, benchmarks/user_jobs.py), on real MNIST:
  cnn  the main job: experiments/mnist_cnn.py, 2 epochs (936 steps of 128)
  mlp  the Ioffe & Szegedy Fig. 1 MLP: experiments/bn_paper_mlp.py, 1 epoch (1,000 steps of 60)
Implementations, each started as a fresh Python process, as a user starts it:
  bnlab-cold  `python -m bnlab.cli train ...` with an empty compilation cache (a first run)
  bnlab-warm  the same command again, its programs in the cache (every later run)
  flax        benchmarks/flax_style.py: the flax examples/mnist loop (jitted step, numpy batches)
  torch       benchmarks/torch_style.py: PyTorch eager, torch.set_num_threads(2)
The flax and PyTorch scripts read the IDX files themselves (unchecked, as a short script
does); bnlab reads its array copy of the prepared dataset (prepared before the first round).
Every job evaluates on the test split after each epoch; bnlab also writes its run files and
checkpoints. Each round runs every implementation once (bnlab-warm right after bnlab-cold; the
others in an order that rotates from round to round); the results are the medians over rounds.

Per run: the whole command's wall time (process start to exit) and CPU time, examples/s over
its last min(500, steps per epoch) steps (bnlab's timed chunk: its first chunk compiles), and
for bnlab the programs it compiled or read from the cache and its time outside the training
loop: wall time - the loop's time (`wall_time_s` of summary.json: the chunks, with the
compilation they wait for, and the evaluations). That is the fixed cost (imports, data,
set-up, checkpoints and files, exit) plus the initialization's compilation, so an upper bound
of "everything but compiling and training". Each round also runs a 2048x2048 float32 matmul
in its own process; examples/s x FLOP per example is reported as a share of it (the FLOP of a
step counted as 3x the forward's). The last line says how much CPU other processes took.

Command: python benchmarks/wall_time.py [--rounds 3] [--models cnn,mlp]
         [--impls bnlab-cold,bnlab-warm,flax,torch] [--mnist-dir DIR] [--wait-load 0.5]
Runtime: about 5 minutes per round with both models on an idle 2-core CPU (mlp alone: 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import env_info
import user_jobs

ROOT = env_info.ROOT
BENCH = Path(__file__).resolve().parent
IMPLS = ("bnlab-cold", "bnlab-warm", "flax", "torch")
CHUNK = 500  # bnlab's checkpoint.every_steps: its chunk length, at most an epoch
STEPS_PER_EPOCH = {"cnn": 60000 // 128, "mlp": 60000 // 60}
GEMM_N = 2048
COUNTS = re.compile(r"bnlab: (\d+) programs: (\d+) compiled, (\d+) read .* in ([\d.]+) s")
# (model, what, numerator, denominator, bound, "max": ratio <= bound | "min": ratio >= bound)
TARGETS = (
    ("cnn", "whole command", "bnlab-cold", "torch", 0.8, "max"),
    ("mlp", "whole command", "bnlab-cold", "torch", 1.0, "max"),
    ("mlp", "whole command", "bnlab-warm", "torch", 0.7, "max"),
    ("cnn", "examples/s", "bnlab", "torch", 1.0, "min"),
    ("cnn", "examples/s", "bnlab", "flax", 1.5, "min"),
    ("mlp", "examples/s", "bnlab", "flax", 1.5, "min"),
)
FIXED_COST_TARGET = 2.0  # seconds besides compiling and training, the 1-epoch MLP command


class Run(NamedTuple):
    wall_s: float
    examples_per_s: float
    test_accuracy: float
    other_cores: float  # other processes' CPU during the run, in cores
    cpu_s: float  # the command's own CPU time (user + system, all its threads)
    compile_s: float | None = None  # bnlab: tracing, lowering and compiling (or reading)
    compiled: int | None = None  # bnlab: programs compiled (not read from the cache)
    programs: int | None = None
    outside_s: float | None = None  # bnlab: wall time outside its training loop


class Process(NamedTuple):
    done: subprocess.CompletedProcess
    wall_s: float
    other_cores: float
    cpu_s: float


def run_process(cmd: list[str], env: dict[str, str]) -> Process:
    """Runs `cmd` to completion: its wall time, its CPU time, and the CPU that other
    processes took meanwhile (in cores)."""
    before = env_info.cpu_snapshot()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    tick = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    return Process(proc, wall, env_info.other_cores(before), cpu)


def _env(mnist_dir: str, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: no JAX/bnlab settings of ours, and Python caching
    compiled modules as it does by default (this machine's shells set
    PYTHONDONTWRITEBYTECODE, which would recompile bnlab's sources in every run)."""
    drop = ("JAX_", "BNLAB_", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update({"PYTHONPATH": str(ROOT), "BNLAB_MNIST_DIR": mnist_dir, **extra})
    return env


def run_bnlab(model: str, cache: Path, workdir: Path, mnist_dir: str) -> Run:
    job = user_jobs.JOBS[model]
    cmd = [
        sys.executable, "-m", "bnlab.cli", "train",
        "--config", f"experiments/{job.experiment}",
        "--workdir", str(workdir),
        f"--config.train.epochs={job.epochs}",
        "--no-progress",
    ]  # fmt: skip
    env = _env(mnist_dir, BNLAB_COMPILATION_CACHE=str(cache), BNLAB_COUNT_COMPILES="1")
    p = run_process(cmd, env)
    summary = json.loads((workdir / "summary.json").read_text())
    programs, compiled, _, seconds = COUNTS.search(p.done.stderr).groups()
    return Run(
        p.wall_s,
        summary["train_examples_per_s"],
        summary["test_accuracy"],
        p.other_cores,
        p.cpu_s,
        float(seconds),
        int(compiled),
        int(programs),
        p.wall_s - summary["wall_time_s"],
    )


def run_script(impl: str, model: str, mnist_dir: str) -> Run:
    script = BENCH / {"flax": "flax_style.py", "torch": "torch_style.py"}[impl]
    timed = min(CHUNK, STEPS_PER_EPOCH[model])
    cmd = [sys.executable, str(script), "--model", model, "--mnist-dir", mnist_dir,
           "--timed-steps", str(timed)]  # fmt: skip
    p = run_process(cmd, _env(mnist_dir))
    result = json.loads(p.done.stdout.split("RESULT ", 1)[1])
    return Run(p.wall_s, result["examples_per_s"], result["test_accuracy"], p.other_cores, p.cpu_s)


def run_gemm() -> float:
    """GFLOP/s of a float32 2048x2048 matmul, the best of numpy (BLAS) and XLA, in its own
    process."""
    p = run_process([sys.executable, str(Path(__file__)), "--gemm"], _env(""))
    return float(p.done.stdout.split("GFLOPS ", 1)[1])


def gemm_worker() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    a = np.random.default_rng(0).standard_normal((GEMM_N, GEMM_N), np.float32)
    flop = 2 * GEMM_N**3
    matmul = jax.jit(jnp.matmul)
    a_dev = jnp.asarray(a)
    best = 0.0
    for fn in (lambda: a @ a, lambda: matmul(a_dev, a_dev).block_until_ready()):
        fn()  # warm-up (compiles the XLA one)
        times = []
        for _ in range(10):
            tick = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tick)
        best = max(best, flop / statistics.median(times) / 1e9)
    print(f"GFLOPS {best:.1f}")


def prepare_data(mnist_dir: str) -> None:
    """bnlab's array copy of MNIST, written before anything is timed (a first-ever run
    prepares it once; every run the benchmark times reads it)."""
    code = (
        "from bnlab import config, data\n"
        "cfg = config.validate(config.default_config())\n"
        "data.load(cfg.data, 'train'); data.load(cfg.data, 'test')\n"
    )
    run_process([sys.executable, "-c", code], _env(mnist_dir))


def wait_for_quiet(threshold: float, max_wait: float) -> None:
    start = time.monotonic()
    while os.getloadavg()[0] > threshold and time.monotonic() - start < max_wait:
        print(f"  load average {env_info.load_average()}: waiting for < {threshold}", flush=True)
        time.sleep(30)
    print(f"starting at load average {env_info.load_average()}", flush=True)


def one_round(r: int, models: list[str], impls: list[str], args, tmp: Path) -> dict:
    results: dict[tuple[str, str], Run] = {}
    for model in models:
        cache = tmp / f"cache-{model}-{r}"  # empty: a cold run, then warm for the next
        others = [i for i in impls if not i.startswith("bnlab")]
        others = others[r % len(others) :] + others[: r % len(others)] if others else []
        bnlab = [i for i in IMPLS[:2] if i in impls]
        order = others[:1] + bnlab + others[1:] if r % 2 else bnlab + others
        for impl in order:
            if impl.startswith("bnlab"):
                if impl == "bnlab-warm" and not cache.exists():
                    run_bnlab(model, cache, tmp / f"{model}-{r}-fill", args.mnist_dir)
                run = run_bnlab(model, cache, tmp / f"{model}-{r}-{impl}", args.mnist_dir)
            else:
                run = run_script(impl, model, args.mnist_dir)
            results[model, impl] = run
            extra = ""
            if run.compile_s is not None:
                extra = f", {run.compiled}/{run.programs} compiled, {run.compile_s:.2f} s compiling"
            print(
                f"  round {r + 1} {model} {impl:<10} {run.wall_s:6.2f} s ({run.cpu_s:.1f} CPU-s), "
                f"{run.examples_per_s:9.0f} ex/s, acc {run.test_accuracy:.4f}{extra}, "
                f"other load {run.other_cores:.2f} cores",
                flush=True,
            )
    return results


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "-"


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}" if values else ""


def report(rounds: list[dict], gemm: list[float], models: list[str], impls: list[str]) -> None:
    gflops = statistics.median(gemm)
    print(
        f"\nfloat32 {GEMM_N}x{GEMM_N} matmul: median {gflops:.1f} GFLOP/s "
        f"({_spread(gemm, '{:.1f}')} over rounds)"
    )
    walls, rates, outside = {}, {}, {}
    for model in models:
        job = user_jobs.JOBS[model]
        print(f"\n{model}: {job.experiment}, {job.epochs} epoch(s), batch {job.batch_size}, "
              f"{job.step_flop / 1e6:.2f} MFLOP per example per step; medians over "
              f"{len(rounds)} rounds [min-max]")  # fmt: skip
        print(f"{'impl':<11}{'whole s':>9}{'[spread]':>14}{'CPU-s':>8}{'ex/s':>10}"
              f"{'[spread]':>18}{'of GEMM':>9}{'test acc':>10}{'outside':>9}")  # fmt: skip
        for impl in impls:
            runs = [r[model, impl] for r in rounds if (model, impl) in r]
            if not runs:
                continue
            wall = [x.wall_s for x in runs]
            rate = [x.examples_per_s for x in runs]
            walls[model, impl], rates[model, impl] = wall, rate
            share = statistics.median(rate) * job.step_flop / (gflops * 1e9)
            fixed = ""
            if runs[0].outside_s is not None:
                outside[model, impl] = [x.outside_s for x in runs]
                fixed = _median(outside[model, impl])
            print(
                f"{impl:<11}{_median(wall):>9}{_spread(wall):>14}"
                f"{statistics.median(x.cpu_s for x in runs):>8.1f}"
                f"{statistics.median(rate):>10.0f}{_spread(rate, '{:.0f}'):>18}"
                f"{share:>8.1%}{statistics.median(x.test_accuracy for x in runs):>10.4f}"
                f"{fixed:>9}"
            )
    print("\ntargets (ratios of medians)")
    for model, what, num, den, bound, kind in TARGETS:
        table = walls if what == "whole command" else rates
        if num == "bnlab":  # the same training in the cold and the warm runs
            values = table.get((model, "bnlab-cold"), []) + table.get((model, "bnlab-warm"), [])
        else:
            values = table.get((model, num), [])
        other = table.get((model, den), [])
        if not values or not other:
            continue
        ratio = statistics.median(values) / statistics.median(other)
        met = ratio <= bound if kind == "max" else ratio >= bound
        sign = "<=" if kind == "max" else ">="
        print(f"  {model} {what} {num}/{den} {sign} {bound}x: {ratio:.2f}x -> "
              f"{'MET' if met else 'NOT MET'}")  # fmt: skip
    for (model, impl), values in outside.items():
        if model == "mlp":
            median = statistics.median(values)
            verdict = "MET" if median < FIXED_COST_TARGET else "NOT MET"
            print(f"  mlp {impl} time outside the training loop < {FIXED_COST_TARGET} s: "
                  f"{median:.2f} s -> {verdict}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="cnn,mlp", help="comma-separated subset")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset")
    parser.add_argument("--mnist-dir", default=os.environ.get("BNLAB_MNIST_DIR"))
    parser.add_argument("--wait-load", type=float, default=0.5, help="start below this load")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait at most")
    parser.add_argument("--gemm", action="store_true", help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.gemm:
        gemm_worker()
        return
    if not args.mnist_dir:
        parser.error("pass --mnist-dir or set BNLAB_MNIST_DIR (the four MNIST .gz files)")
    args.mnist_dir = str(Path(args.mnist_dir).resolve())
    models, impls = args.models.split(","), args.impls.split(",")
    print(env_info.header(_torch_version()))
    print(f"python {sys.version.split()[0]}; each run a fresh process; {args.rounds} rounds")
    prepare_data(args.mnist_dir)
    wait_for_quiet(args.wait_load, args.max_wait)
    other_load = env_info.OtherLoad()
    rounds, gemm = [], []
    with tempfile.TemporaryDirectory(prefix="bnlab-wall-") as tmp:
        for r in range(args.rounds):
            gemm.append(run_gemm())
            print(f"  round {r + 1} gemm {gemm[-1]:.1f} GFLOP/s", flush=True)
            rounds.append(one_round(r, models, impls, args, Path(tmp)))
    report(rounds, gemm, models, impls)
    print(other_load.report())


def _torch_version() -> str | None:
    proc = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() or None


if __name__ == "__main__":
    main()
