"""The `bnlab train` command: a real run on MNIST, its files, and early, clear errors."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from bnlab import cli


def _bnlab(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bnlab.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_train_cnn_on_mnist_writes_its_files(tmp_path, tfds_dir):
    workdir = tmp_path / "run"
    result = _bnlab(
        "train",
        "--config", "experiments/mnist_cnn.py",
        "--workdir", str(workdir),
        "--config.data.train_size=3840",
        "--config.train.epochs", "1",
        "--config.train.seed=3",
        f"--config.data.tfds_dir={tfds_dir}",
        "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 30
    assert summary["test_accuracy"] > 0.8  # 30 steps of the BN CNN; measured 0.93
    assert f"test_accuracy={summary['test_accuracy']:.4f}" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["seed"] == 3 and config["data"]["train_size"] == 3840
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [30]
    (test,) = [r for r in records if r["split"] == "test"]
    assert test["accuracy"] == pytest.approx(summary["test_accuracy"])
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.opt.lr=-1", "opt.lr=-1.0 must be finite and > 0"),
        ("--config.model.norm=layer", "model.norm='layer' is not one of"),
        ("--config.opt.lrr=0.1", "no field 'lrr'"),
        ("--config.train.epochs=two", "expected a value of type int"),
    ],
)
def test_bad_config_fails_before_anything_runs(tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--config",
            str(ROOT / "experiments/mnist_cnn.py"),
            "--workdir",
            str(workdir),
            override,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not workdir.exists()


def test_batch_larger_than_split_is_refused(tmp_path, capsys, tfds_dir):
    code = cli.main(
        [
            "train", "--config", str(ROOT / "experiments/mnist_cnn.py"),
            "--workdir", str(tmp_path / "run"),
            "--config.data.task=binary01", "--config.train.batch_size=20000",
            f"--config.data.tfds_dir={tfds_dir}",
        ]
    )  # fmt: skip
    assert code == 2
    assert "exceeds the 12665 training examples" in capsys.readouterr().err


def test_workdir_problems(tmp_path, capsys):
    config = str(ROOT / "experiments/mnist_cnn.py")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["train", "--config", config, "--workdir", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text("{}")
    assert cli.main(["train", "--config", config, "--workdir", str(used)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (used / "summary.json").read_text() == "{}"
    assert cli.main(["train", "--config", str(tmp_path / "missing.py"), "--workdir", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    under_a_file = a_file / "run"  # cannot be created, whoever runs the test
    assert cli.main(["train", "--config", config, "--workdir", str(under_a_file)]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_help_lists_the_commands_and_exit_codes():
    result = _bnlab("--help")
    assert result.returncode == 0
    for word in ("train", "evaluate", "export", "4 stopped by SIGTERM/SIGINT"):
        assert word in " ".join(result.stdout.split()), word


def test_evaluate_and_export_refuse_a_workdir_without_a_run(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--format", "npz", "--config.opt.lr=1"]) == 2
    assert "apply to train and sweep only" in capsys.readouterr().err


def test_diverged_run_exits_with_status_3(tmp_path, capsys, tfds_dir):
    code = cli.main(
        [
            "train", "--config", str(ROOT / "experiments/bn_paper_mlp.py"),
            "--workdir", str(tmp_path / "run"), "--no-progress",
            "--config.model.norm=none", "--config.model.activation=relu",
            "--config.opt.lr=1e4", "--config.data.train_size=600", "--config.train.epochs=2",
            f"--config.data.tfds_dir={tfds_dir}",
        ]
    )  # fmt: skip
    assert code == 3
    assert "status=diverged" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["test_loss"] is None


def test_warmup_longer_than_the_run_is_refused(tmp_path, capsys, tfds_dir):
    code = cli.main(
        [
            "train", "--config", str(ROOT / "experiments/mnist_cnn.py"),
            "--workdir", str(tmp_path / "run"),
            "--config.opt.schedule=warmup_cosine", "--config.opt.warmup_steps=1000",
            "--config.data.train_size=1280", "--config.train.epochs=1",
            f"--config.data.tfds_dir={tfds_dir}",
        ]
    )  # fmt: skip
    assert code == 2
    assert (
        "opt.warmup_steps=1000 must be shorter than the run's 10 steps" in capsys.readouterr().err
    )


def test_smoke_applies_the_experiment_smoke_overrides(tmp_path, capsys, tfds_dir):
    code = cli.main(
        [
            "train", "--config", str(ROOT / "experiments/mnist_cnn.py"), "--smoke",
            "--workdir", str(tmp_path / "run"), "--no-progress",
            f"--config.data.tfds_dir={tfds_dir}",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 1280 // 128 and summary["epochs"] == 1
