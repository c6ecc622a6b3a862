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
        "step 100/100  loss 0.2500  acc 0.9000  3,000 ex/s  eta 0m01s",
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
