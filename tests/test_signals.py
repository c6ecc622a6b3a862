"""Ctrl-C and SIGTERM: acknowledged at once, a second one stops cleanly, no traceback."""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

from bnlab import cli

pytestmark = pytest.mark.slow

CNN = "experiments/mnist_cnn.py"
# One chunk of 30 CNN steps (several seconds on a CPU): a signal lands inside it.
LONG_CHUNK = ["--config.data.train_size=3840", "--config.train.epochs=2"]
LONG_CHUNK += ["--config.checkpoint.every_steps=0", "--no-progress"]


def _start(tmp_path, tfds_dir, name="run"):
    cmd = [sys.executable, "-m", "bnlab.cli", "train", "--config", CNN]
    cmd += ["--workdir", str(tmp_path / name), f"--config.data.tfds_dir={tfds_dir}", *LONG_CHUNK]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stderr:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return cmd, proc, lines, reader


def _wait_for_training(workdir, proc, timeout=240):
    """Until the first chunk is compiling or running: the TensorBoard folder is made just
    before the loop starts."""
    deadline = time.monotonic() + timeout
    while not (workdir / "tensorboard").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "training never started"
        time.sleep(0.05)
    time.sleep(1.0)


def test_first_sigint_is_acknowledged_at_once_then_saves_and_stops(tmp_path, tfds_dir):
    _, proc, lines, reader = _start(tmp_path, tfds_dir)
    _wait_for_training(tmp_path / "run", proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    text = "".join(line for _, line in lines)
    assert proc.returncode == cli.EXIT_INTERRUPTED, text
    ack = next(t for t, line in lines if "SIGINT received" in line)
    assert ack - sent < 2.0, f"acknowledged {ack - sent:.1f} s after the signal"
    assert "stopped by SIGINT" in text and "Traceback" not in text
    assert (tmp_path / "run" / "checkpoints").is_dir()


def test_a_second_sigint_stops_at_once_cleanly_and_the_run_resumes(tmp_path, tfds_dir):
    cmd, proc, lines, reader = _start(tmp_path, tfds_dir)
    _wait_for_training(tmp_path / "run", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    text = "".join(line for _, line in lines)
    assert proc.returncode == cli.EXIT_INTERRUPTED, text
    assert "stopped at once by a second SIGINT" in text, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    # Every file left behind parses; the same command then finishes the run.
    for path in (tmp_path / "run").glob("*.json"):
        json.loads(path.read_text())
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 60


def test_ctrl_c_while_a_sweep_compiles_its_next_group_exits_4_cleanly(tmp_path, tfds_dir):
    """Between two vmapped groups the next one compiles in a worker thread: Ctrl-C there must
    not take the interpreter down under XLA (a segmentation fault, exit 139)."""
    import os

    experiment = tmp_path / "exp.py"
    experiment.write_text(
        "from bnlab.config import default_config\n\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.model.name, c.train.batch_size = 'mlp', 60\n"
        f"    c.data.tfds_dir = {tfds_dir!r}\n"
        "    return c\n\n"
        "def sweep(smoke=False):\n"
        "    for norm in ('none', 'batchnorm', 'layernorm'):\n"
        "        yield {'model.norm': norm}\n"
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bnlab.cli", "sweep", str(experiment), "--workdir", str(out)]
    cmd += ["--config.data.train_size=600", "--config.train.epochs=1"]
    env = {**os.environ, "BNLAB_COMPILATION_CACHE": str(tmp_path / "cache")}  # compiles for real
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(out.glob("runs/*/summary.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "the first group never ended"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # the next group is being built and compiled now
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err.decode()[-2000:]
    assert b"Traceback" not in err
