"""Runs that outgrow one machine: `bnlab train` as two processes (gloo) sharing one workdir, and
sweep shards started together on one folder."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT

from bnlab import cli, config
from bnlab.training import parallel, run
from bnlab.training.writers import read_jsonl

pytestmark = pytest.mark.slow

MLP = "experiments/bn_paper_mlp.py"
# 2 processes x 2 devices, batch 48 split over the 4 devices; 20 steps per epoch, 4 epochs.
SMALL = {
    "data.train_size": "960",
    "train.batch_size": "48",
    "train.epochs": "4",
    "train.log_every_steps": "5",
    "checkpoint.every_steps": "10",
    "parallel.mode": "sharded",
}
TIMING = ("wall_time_s", "train_examples_per_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, tfds_dir, *, port, extra=(), experiment=MLP, env_extra=None):
    """Both processes of one run, each with 2 fake CPU devices, sharing `workdir`."""
    cmd = [sys.executable, "-m", "bnlab.cli", "train", "--config", str(experiment)]
    cmd += ["--workdir", str(workdir)]
    cmd += ["--no-progress", f"--config.data.tfds_dir={tfds_dir}"]
    given = {e.partition("=")[0] for e in extra}  # the same override twice is refused
    cmd += [f"--config.{k}={v}" for k, v in SMALL.items() if f"--config.{k}" not in given]
    cmd += list(extra)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(ROOT),
        config.COORDINATOR_ENV: f"127.0.0.1:{port}",
        config.NUM_PROCESSES_ENV: "2",
        **(env_extra or {}),
    }
    return [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, config.PROCESS_ID_ENV: str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


def _finish(procs, timeout=300):
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return outputs


def _steps(workdir):
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _final(workdir):
    return run.load_checkpoint(workdir)[1]


def _summary(workdir):
    summary = json.loads((workdir / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in TIMING}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tfds_dir):
    workdir = tmp_path_factory.mktemp("multihost") / "run"
    procs = _start(workdir, tfds_dir, port=_free_port())
    outputs = _finish(procs)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return workdir, outputs


def test_two_processes_write_one_set_of_files_equal_to_one_process(uninterrupted, make_config):
    workdir, outputs = uninterrupted
    assert all("status=ok" in out for out in outputs)
    records = read_jsonl(workdir / "metrics.jsonl")
    keys = [(r["step"], r["split"]) for r in records]
    assert len(keys) == len(set(keys)) == 4 * 4 + 4  # each window and test record once
    assert len(list((workdir / "tensorboard").iterdir())) == 1  # one event file
    assert _steps(workdir) == [60, 70, 80]  # keep=3 of a checkpoint every 10 steps
    # One process with the same 4 devices gives the same numbers (to float32 round-off).
    cfg = make_config(MLP, **{**SMALL, "parallel.num_devices": 4})
    alone = run.run(cfg, workdir.parent / "one_process")
    got, want = _final(workdir).state, _final(workdir.parent / "one_process").state
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
    np.testing.assert_allclose(_summary(workdir)["test_loss"], alone["test_loss"], rtol=1e-5)


def test_both_processes_killed_mid_run_resume_to_the_same_files(uninterrupted, tmp_path, tfds_dir):
    reference, _ = uninterrupted
    workdir = tmp_path / "run"
    procs = _start(workdir, tfds_dir, port=_free_port())
    deadline = time.time() + 240
    while max(_steps(workdir), default=0) < 30:  # past a few checkpoints, mid-run
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _finish(procs)
    assert not (workdir / "summary.json").exists()
    procs = _start(workdir, tfds_dir, port=_free_port())  # a restarted job may get a new port
    outputs = _finish(procs)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    got, want = _final(workdir), _final(reference)
    assert got.step == want.step == 80
    jax.tree.map(np.testing.assert_array_equal, got.state, want.state)
    assert (workdir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    assert _summary(workdir) == _summary(reference)


def test_a_process_killed_alone_stops_the_other_with_a_message(tmp_path, tfds_dir):
    workdir = tmp_path / "run"
    extra = ["--config.train.epochs=50", "--config.parallel.timeout_s=10"]
    procs = _start(workdir, tfds_dir, port=_free_port(), extra=extra)
    deadline = time.time() + 240
    while max(_steps(workdir), default=0) < 20:
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    started = time.time()
    out = procs[0].communicate(timeout=120)[0]
    _finish(procs)
    assert procs[0].returncode == parallel.EXIT_LOST_PROCESS, out[-6000:]
    # Gloo sees the closed connection at once; a peer that hangs instead trips the watchdog
    # ("made no progress for ..."). Either way one clear line, then exit status 5.
    assert "lost contact with another process" in out or "made no progress for" in out
    assert time.time() - started < 60
    assert "Traceback" not in out and "Check failure" not in out
    assert cli.EXIT_LOST_PROCESS == parallel.EXIT_LOST_PROCESS


def test_sweep_shards_started_together_run_every_trial_once(tmp_path, tfds_dir):
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        "from bnlab.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.model.name = 'mlp'\n"
        "    c.train.batch_size = 60\n"
        "    return c\n\n"
        "def sweep():\n"
        "    for norm in ('batchnorm', 'none'):\n"
        "        for lr in (0.05, 0.1, 0.2):\n"
        "            yield {'model.norm': norm, 'opt.lr': lr}\n"
    )
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "bnlab.cli", "sweep", str(experiment), "--workdir", str(out)]
    cmd += [f"--config.data.tfds_dir={tfds_dir}", "--config.data.train_size=300"]
    cmd += ["--config.train.epochs=1"]
    procs = [
        subprocess.Popen(
            [*cmd, "--shard", f"{i}/3"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    outputs = _finish(procs, timeout=600)
    for p, text in zip(procs, outputs, strict=True):
        assert p.returncode == 0, text[-3000:]
    spec = json.loads((out / "sweep.json").read_text())
    ids = [t["trial_id"] for t in spec["trials"]]
    assert len(ids) == 6
    done = [line.split(":")[0] for text in outputs for line in text.splitlines() if ": ok" in line]
    assert sorted(done) == sorted(ids)  # every trial ran, in exactly one shard
    for tid in ids:
        records = read_jsonl(out / "runs" / tid / "metrics.jsonl")
        keys = [(r["step"], r["split"]) for r in records]
        assert len(keys) == len(set(keys))  # one attempt's records
    assert cli.main(["report", str(out)]) == 0
    from bnlab.results import load_sweep

    assert load_sweep(out).counts()["ok"] == 6


HOOKED = """
import os

from bnlab.config import load_config
from bnlab.training import checkpoint

if os.environ.get("BNLAB_PROCESS_ID") == "1" and os.environ.get("HOOK") == "fail":
    def steps(self):
        raise OSError("simulated: the checkpoint folder vanished")
    checkpoint.Checkpointer.steps = steps
if os.environ.get("BNLAB_PROCESS_ID") == "1" and os.environ.get("HOOK") == "stale":
    checkpoint.Checkpointer.steps = lambda self: []  # as if it saw none of the checkpoints


def get_config():
    return load_config({mlp!r})
"""


def _hooked(tmp_path):
    experiment = tmp_path / "hooked.py"
    experiment.write_text(HOOKED.format(mlp=str(ROOT / MLP)))
    return experiment


def test_an_error_in_one_process_while_all_agree_stops_every_process_at_once(tmp_path, tfds_dir):
    """Not a user error (an OS error during resume): the other process learns of it within
    seconds instead of waiting on a collective until JAX's heartbeat timeout (~660 s)."""
    start = time.monotonic()
    procs = _start(tmp_path / "run", tfds_dir, port=_free_port(), experiment=_hooked(tmp_path),
                   env_extra={"HOOK": "fail"})  # fmt: skip
    outputs = _finish(procs, timeout=240)
    assert time.monotonic() - start < 200, outputs
    assert [p.returncode for p in procs] == [cli.EXIT_LOST_PROCESS] * 2, outputs
    assert (
        "process 1 of 2 failed (OSError: simulated: the checkpoint folder vanished)" in outputs[0]
    )
    assert "OSError: simulated" in outputs[1]  # its own traceback says where


def test_processes_that_would_resume_from_different_steps_refuse_to(tmp_path, tfds_dir):
    workdir = tmp_path / "run"
    first = _start(workdir, tfds_dir, port=_free_port(), extra=["--config.train.epochs=1"])
    outputs = _finish(first)
    assert [p.returncode for p in first] == [0, 0], outputs
    (workdir / "summary.json").unlink()  # as if stopped after its last checkpoint (step 20)
    procs = _start(workdir, tfds_dir, port=_free_port(), experiment=_hooked(tmp_path),
                   extra=["--config.train.epochs=1"], env_extra={"HOOK": "stale"})  # fmt: skip
    outputs = _finish(procs)
    assert [p.returncode for p in procs] == [cli.EXIT_BAD_INPUT] * 2, outputs
    for out in outputs:
        assert "differ in the latest checkpoint they see (process 0: 20, process 1: 0)" in out
    assert _steps(workdir)[-1] == 20  # nothing was overwritten
