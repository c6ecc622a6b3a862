"""One run per workdir: a run holds its folder for its whole life, another command on it exits 2
naming the holder and writes nothing; a killed run's lock never blocks its resume; sweep shards
hold the trials they run."""

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
from conftest import ROOT

from bnlab import cli
from bnlab.studies import sweep
from bnlab.training import workdir
from bnlab.training.writers import read_jsonl

MLP = "experiments/bn_paper_mlp.py"


@contextmanager
def held_elsewhere(folder, host="otherhost", pid=4242):
    """`folder` held as another process holds it: its own open file, locked, naming itself."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / workdir.LOCK_FILE, "w") as f:
        f.write(f"{host} {pid}\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_held_workdir_refuses_a_second_train_naming_its_holder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    empty = tmp_path / "no-mnist"  # data would fail later: the lock must refuse first
    empty.mkdir()
    args = ["train", "--config", str(ROOT / MLP), "--workdir", str(run_dir), "--no-progress"]
    args += [f"--config.data.mnist_dir={empty}"]
    with held_elsewhere(run_dir):
        before = _contents(run_dir)
        assert cli.main(args) == cli.EXIT_BAD_INPUT
        assert _contents(run_dir) == before  # nothing written, the holder's file untouched
    err = capsys.readouterr().err
    assert "in use by process 4242 on host otherhost" in err and "nothing was written" in err
    assert len(err.strip().splitlines()) == 1


def test_a_stale_lock_of_a_killed_run_does_not_block_and_is_removed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / workdir.LOCK_FILE).write_text("deadhost 1\n")  # left by a SIGKILLed run
    with workdir.hold_workdir(run_dir) as path:
        assert (path / workdir.LOCK_FILE).read_text() == f"{socket.gethostname()} {os.getpid()}\n"
        with workdir.hold_workdir(run_dir):  # re-entrant: a sweep's trial, then its runner
            pass
        with open(path / workdir.LOCK_FILE) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # really held: another holder fails
    assert sorted(os.listdir(run_dir)) == []  # released: the lock file goes with it


def test_a_run_that_cannot_start_leaves_no_folder_and_no_lock(tmp_path):
    new = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError, match="data error"), workdir.hold_workdir(new):
        assert (new / workdir.LOCK_FILE).exists()
        raise RuntimeError("data error")
    assert list(tmp_path.iterdir()) == []


EXPERIMENT = """
from bnlab.config import default_config

get_config = default_config


def sweep():
    for seed in range(3):
        yield {"train.seed": seed}
"""


def test_a_trial_held_by_another_shard_stops_the_sweep_with_nothing_changed(tmp_path, capsys):
    experiment = tmp_path / "exp.py"
    experiment.write_text(EXPERIMENT)
    out = tmp_path / "out"

    def failing(cfg, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
        raise RuntimeError("interrupted before its first checkpoint")

    kwargs = {"engine": "sequential", "log": print}
    assert sweep.run_sweep(experiment, out, runner=failing, **kwargs) == {"failed": 3}
    before = _contents(out / "runs")
    held = sorted((out / "runs").iterdir())[1]
    ran = []

    def runner(cfg, run_dir):
        ran.append(run_dir)
        return {"status": "ok"}

    with held_elsewhere(held, host="hostB", pid=99):
        with pytest.raises(workdir.WorkdirBusy, match="in use by process 99 on host hostB"):
            sweep.run_sweep(experiment, out, runner=runner, **kwargs)
        args = ["sweep", str(experiment), "--workdir", str(out), "--engine", "sequential"]
        assert cli.main(args) == cli.EXIT_BAD_INPUT
    assert "in use by process 99 on host hostB" in capsys.readouterr().err
    assert ran == []
    after = _contents(out / "runs")
    assert (held / workdir.LOCK_FILE).read_text() == "hostB 99\n"  # the holder's, untouched
    assert {k: v for k, v in after.items() if k.name != workdir.LOCK_FILE} == before
    assert list((out / "runs").glob(f"*/{workdir.LOCK_FILE}")) == [held / workdir.LOCK_FILE]


@pytest.mark.slow  # two `bnlab train` processes on one workdir
def test_a_second_train_on_a_running_workdir_exits_2_and_the_first_finishes_whole(
    tmp_path, tfds_dir
):
    """The reported case: a second command started while the first trains. The first is
    paused mid-run (SIGSTOP) so the second surely meets it running."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bnlab.cli", "train", "--config", MLP, "--workdir", str(run_dir)]
    cmd += ["--no-progress", f"--config.data.tfds_dir={tfds_dir}", "--config.data.train_size=600"]
    cmd += ["--config.train.epochs=6", "--config.checkpoint.every_steps=5"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").exists() or not read_jsonl(run_dir / "metrics.jsonl"):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)
        before = _contents(run_dir)
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert _contents(run_dir) == before  # nothing truncated, restarted or saved
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == cli.EXIT_BAD_INPUT, second.stderr[-2000:]
    assert second.stderr.strip().splitlines() == [
        f"bnlab: error: {run_dir} is in use by process {first.pid} on host "
        f"{socket.gethostname()} (a run or sweep holds it until it ends). Wait for it to finish, "
        "or stop it first (a stopped run resumes with the same command); nothing was written."
    ]
    assert first.returncode == 0, err.decode()[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "ok"
    tests = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "test"]
    assert [r["epoch"] for r in tests] == list(range(6))  # every record of the first run
    assert not (run_dir / workdir.LOCK_FILE).exists()
