"""What a person sees while a run trains: a line per log window off a terminal, a bar with
loss, accuracy, examples/s and ETA on one; throughput measured even in a run's first chunk."""

import io

import pytest

from bnlab import cli
from bnlab.training.progress import Progress


def test_off_a_terminal_each_log_window_and_evaluation_is_a_line():
    out = io.StringIO()
    shown = Progress(100, 0, 60, stream=out, terminal=False)
    shown.on_record(50, "train", {"loss": 0.5, "accuracy": 0.8, "window": 50})
    shown.on_chunk(50, 1.0, 50)  # 3,000 examples/s
    shown.on_record(100, "train", {"loss": 0.25, "accuracy": 0.9, "window": 50})
    shown.on_record(100, "test", {"loss": 0.3, "accuracy": 0.91})
    shown.on_record(100, "diag", {"ics/dense1/l2": 1.0})
    lines = out.getvalue().splitlines()
    assert lines == [
        "step 50/100  loss 0.5000  acc 0.8000",
        "step 100/100  loss 0.2500  acc 0.9000  3,000 ex/s  eta 0m00s",
        "step 100/100  test: loss 0.3000  acc 0.9100",
    ]


def test_on_a_terminal_a_bar_of_steps_with_the_latest_metrics():
    out = io.StringIO()
    shown = Progress(100, 40, 60, stream=out, terminal=True)
    shown.on_record(50, "train", {"loss": 0.5, "accuracy": 0.8, "window": 10})
    shown.on_record(50, "test", {"loss": 0.3, "accuracy": 0.91})
    shown.on_chunk(50, 2.0, 100)
    shown.close()
    text = out.getvalue()
    assert "50/100" in text and "loss 0.5000 acc 0.800" in text
    assert "test acc 0.9100" in text and "3,000 ex/s" in text


@pytest.mark.slow
def test_smoke_and_resumed_runs_measure_throughput_and_say_they_resume(tmp_path, tfds_dir, capsys):
    import json
    import shutil

    args = ["train", "--config", "experiments/bn_paper_mlp.py", "--smoke"]
    args += ["--workdir", str(tmp_path / "run"), f"--config.data.tfds_dir={tfds_dir}"]
    args += ["--config.checkpoint.every_steps=10"]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_examples_per_s"] > 0  # one chunk, compiled on the spot
    # The same run, as if stopped after its checkpoint at step 10: resumed, it says so.
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    (tmp_path / "resumed" / "summary.json").unlink()
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "20")
    capsys.readouterr()
    args[args.index(str(tmp_path / "run"))] = str(tmp_path / "resumed")
    assert cli.main(args) == 0
    assert f"resuming {tmp_path / 'resumed'} from step 10" in capsys.readouterr().err
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert resumed["train_examples_per_s"] > 0


def _record(batch_size=10):
    import dataclasses

    from bnlab import config
    from bnlab.training.records import Record

    cfg = config.validate(config.default_config())
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size))
    return Record(cfg, "unused", steps_per_epoch=100, writes=False)


def test_throughput_counts_only_the_chunks_during_which_nothing_compiled():
    record = _record(batch_size=10)
    assert record.examples_per_s() is None
    record.add_throughput(5.0, 8, compiled=True)  # the first chunk: compiled on the spot
    assert record.examples_per_s() == pytest.approx(8 * 10 / 5.0)  # all there is: a lower bound
    assert record.pace is None
    record.add_throughput(0.5, 50)
    record.add_throughput(0.25, 50)
    assert record.examples_per_s() == pytest.approx(100 * 10 / 0.75)
    assert record.pace == pytest.approx(50 * 10 / 0.25)  # the latest chunk, for the display
    record.add_throughput(1e-12, 1, compiled=True)  # a compiled chunk cannot inflate it
    assert record.examples_per_s() == pytest.approx(100 * 10 / 0.75)


def test_chunks_last_about_the_target_time_from_the_measured_pace():
    from bnlab.training.loop import FIRST_CHUNK, next_steps

    assert next_steps(500, None, 3.0) == FIRST_CHUNK  # nothing timed yet
    assert next_steps(500, 0.05, 3.0) == 60
    assert next_steps(500, 1e-5, 3.0) == 500  # never past the block
    assert next_steps(500, 10.0, 3.0) == 1  # always progress
    assert next_steps(500, 0.05, 0.0) == 500  # off: whole blocks, as before


@pytest.mark.slow
def test_a_run_prints_each_log_window_with_the_current_speed(tmp_path, tfds_dir, capsys):
    import json

    # 100 steps in one epoch, logged every 10; chunks of ~0.05 s: many per epoch.
    args = ["train", "--config", "experiments/bn_paper_mlp.py", "--workdir", str(tmp_path)]
    args += [f"--config.data.tfds_dir={tfds_dir}", "--config.data.train_size=6000"]
    args += ["--config.train.epochs=2", "--config.train.batch_size=60"]
    args += ["--config.train.log_every_steps=10", "--config.train.progress_seconds=0.05"]
    assert cli.main(args) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if " loss " in x and "test" not in x]
    assert [int(x.split()[1].split("/")[0]) for x in lines] == list(range(10, 201, 10))
    speeds = [x.split()[6] for x in lines if "ex/s" in x]
    assert len(speeds) >= len(lines) - 2 and len(set(speeds)) > 1, lines
    etas = [x.split("eta ")[1] for x in lines if "eta" in x]
    assert etas[-1] == "0m00s"
    # Throughput against an independent bound from the same run: at least the examples over
    # the whole training time, and not absurdly above it (the compiler's time is excluded).
    summary = json.loads((tmp_path / "summary.json").read_text())
    bound = summary["steps"] * 60 / summary["wall_time_s"]
    assert bound <= summary["train_examples_per_s"] <= 20 * bound, summary


@pytest.mark.slow
def test_a_run_whose_only_chunk_compiles_reports_a_throughput_within_its_wall_time(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    # One chunk, compiled from nothing (a fresh compilation cache): the compiler's time, summed
    # over its background threads, exceeds the chunk's wall time (this printed 1.2e12 ex/s).
    cmd = [sys.executable, "-m", "bnlab.cli", "train", "--config", "experiments/bn_paper_mlp.py"]
    cmd += ["--smoke", "--workdir", str(tmp_path / "run"), "--config.train.progress_seconds=0"]
    env = {**os.environ, "BNLAB_COMPILATION_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    batch = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["batch_size"]
    bound = summary["steps"] * batch / summary["wall_time_s"]
    assert bound <= summary["train_examples_per_s"] <= 3 * bound, summary
