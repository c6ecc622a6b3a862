"""The helper scripts that docs/results.md quotes (docs/studies/*.py) on sweep folders written
by hand: their tables against the numbers computed here."""

import runpy
import sys

import pytest
from conftest import ROOT
from test_report import _written_sweep

STUDIES = ROOT / "docs" / "studies"


def _run(script, *args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(STUDIES / script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    return lines[0].split(" | "), [line.split(" | ") for line in lines[1:]]


def _train_record(step, accuracy):
    return {"step": step, "split": "train", "accuracy": accuracy, "loss": 1.0}


@pytest.mark.parametrize("windows", [False, True])
def test_gap_is_train_minus_test_over_ok_and_early_stopped_trials(
    tmp_path, monkeypatch, capsys, windows
):
    trials = []
    for lr, (train0, train1), (test0, test1) in (
        (0.1, (0.90, 0.94), (0.88, 0.90)),
        (0.2, (0.99, 0.97), (0.95, 0.96)),
    ):
        seeds = ((0, "ok", train0, test0), (1, "early_stopped", train1, test1))
        for seed, status, train, test in seeds:
            # The training windows (training mode) and train_eval (evaluation mode) differ.
            records = [_train_record(5, 0.5), _train_record(10, train if windows else 0.1)]
            summary = {"status": status, "test_accuracy": test}
            summary["train_eval_accuracy"] = 0.2 if windows else train
            trials.append(({"opt.lr": lr, "train.seed": seed}, summary, records))
    # A diverged trial does not count.
    trials.append(
        ({"opt.lr": 0.1, "train.seed": 2}, {"status": "diverged"}, [_train_record(1, 0.1)])
    )
    _written_sweep(tmp_path, trials)
    flags = ["--windows"] if windows else []
    header, rows = _run(
        "gap.py", tmp_path, "--keys", "opt.lr", *flags, monkeypatch=monkeypatch, capsys=capsys
    )
    source = "last window" if windows else "evaluation mode"
    assert header == ["opt.lr", "seeds", f"train acc ({source})", "test acc", "gap"]
    assert rows == [
        ["0.1", "2", "0.9200", "0.8900", "+0.0300"],
        ["0.2", "2", "0.9800", "0.9550", "+0.0250"],
    ]


def test_time_to_target_counts_the_seeds_that_reached_it_and_when(tmp_path, monkeypatch, capsys):
    def evals(accuracies):  # one validation record per epoch, 100 steps each
        return [
            {"step": 100 * (e + 1), "epoch": e, "split": "validation", "accuracy": a, "loss": 0.1}
            for e, a in enumerate(accuracies)
        ]

    def trial(norm, seed, accuracies):
        epochs = len(accuracies)
        summary = {"epochs": epochs, "steps": 100 * epochs} if accuracies else {}
        return {"model.norm": norm, "train.seed": seed}, summary, evals(accuracies)

    trials = [
        trial("batchnorm", 0, [0.97, 0.985, 0.99]),
        trial("batchnorm", 1, [0.981, 0.99]),
        trial("none", 0, [0.9, 0.95, 0.97]),
        trial("none", 1, [0.99]),
        trial("none", 2, []),  # not run: left out
    ]
    _written_sweep(tmp_path, trials)
    header, rows = _run(
        "time_to_target.py", tmp_path, "--target", "0.98", "--keys", "model.norm",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert header[:3] == ["model.norm", "seeds", "reached 0.98"]
    assert rows == [
        ["batchnorm", "2", "2/2", "1.5", "150", "2.5"],  # epochs 2 and 1 (1-based), steps 200, 100
        ["none", "2", "1/2", "1.0", "100", "2.0"],
    ]


@pytest.mark.parametrize("script", sorted(p.name for p in STUDIES.glob("*.py")))
def test_every_study_script_is_tested_here(script):
    assert script in {"gap.py", "time_to_target.py"}, f"add a test of docs/studies/{script}"
