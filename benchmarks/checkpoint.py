"""Checkpoint cost for the reference CNN: save/restore time, size on disk, training overhead.

The state is the reference CNN's (`experiments/mnist_cnn.py`: params, batch_stats, SGD momentum
state) saved through `bnlab.training.checkpoint.Checkpointer`, as `bnlab train` saves it. The
overhead of `checkpoint.every_steps=500` is measured side by side: rounds of one 500-step chunk of
training on MNIST-shaped random data (`Programs.train_epoch(..., start, steps=500)`, as the run
loop calls it) followed by one save; overhead = median save / median chunk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import env_info
import jax
import numpy as np

from bnlab import config
from bnlab.training import train
from bnlab.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="steps per checkpoint interval")
    parser.add_argument("--rounds", type=int, default=3, help="timed train+save rounds")
    parser.add_argument("--saves", type=int, default=10, help="timed saves and restores")
    args = parser.parse_args()

    print(env_info.header())
    other_load = env_info.OtherLoad()
    cfg = config.validate(config.load_config(ROOT / "experiments/mnist_cnn.py"))
    n = args.steps * cfg.train.batch_size
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 10, (n,), dtype=np.int32))
    programs = train.make_programs(cfg, n)
    init_key, data_key = train.run_keys(0)
    state = programs.init(init_key, images[: cfg.train.batch_size].astype(np.float32) / 255)
    params = sum(x.size for x in jax.tree.leaves(state))
    print(f"reference CNN state: {params} numbers ({params * 4 / 2**20:.2f} MiB as float32)")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Checkpointer(Path(tmp) / "checkpoints", cfg.checkpoint)
        saves, restores = [], []
        for step in range(1, args.saves + 1):
            tick = time.perf_counter()
            ckpt.save(step, state, {"config": cfg.to_dict()})
            saves.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            jax.block_until_ready(ckpt.restore(state).state)
            restores.append(time.perf_counter() - tick)
        print(
            f"save    median {statistics.median(saves) * 1e3:7.1f} ms (of {args.saves}; min "
            f"{min(saves) * 1e3:.1f})\nrestore median {statistics.median(restores) * 1e3:7.1f} "
            f"ms (verified: digest and tree signature; min {min(restores) * 1e3:.1f})"
        )

        key = jax.random.fold_in(data_key, 0)
        state, _ = programs.train_epoch(state, images, labels, key, 0, steps=args.steps)  # compile
        chunks, round_saves = [], []
        for r in range(args.rounds):
            tick = time.perf_counter()
            state, metrics = programs.train_epoch(state, images, labels, key, 0, steps=args.steps)
            jax.device_get(metrics)
            chunks.append(time.perf_counter() - tick)
            tick = time.perf_counter()
            ckpt.save(100 + r, state, {"config": cfg.to_dict()})
            round_saves.append(time.perf_counter() - tick)
        ckpt.close()
        size = _dir_bytes(Path(tmp) / "checkpoints" / str(100 + args.rounds - 1))
    print(f"size on disk {size / 2**20:.2f} MiB per checkpoint (after training; keep=3 on disk)")
    chunk, save = statistics.median(chunks), statistics.median(round_saves)
    overhead = save / chunk
    print(
        f"training {args.steps} steps: median {chunk:.2f} s "
        f"({' '.join(f'{c:.2f}' for c in chunks)}); a save after it: median {save * 1e3:.1f} ms"
    )
    print(other_load.report())
    verdict = "MET" if overhead < 0.03 else "NOT MET"
    print(f"\ntarget overhead of every_steps={args.steps} < 3%: {overhead:.2%} -> {verdict}")


if __name__ == "__main__":
    main()
