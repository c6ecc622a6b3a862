"""A run's bookkeeping (`bnlab.training.records.Record`) and the guards around it: early stopping
and its resume, the resume rules of length-dependent schedules, disjoint splits, and
reduce-on-plateau reading the validation split."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import ROOT

from bnlab import config, optim
from bnlab.training import run
from bnlab.training.records import Record
from bnlab.training.step import TrainState

VAL = {"data.validation_size": "1000"}


def _cfg(**overrides):
    return config.validate(config.apply_overrides(config.default_config(), overrides))


def _evals(validation_loss, test_loss=1.0):
    return {
        "validation": {"loss": validation_loss, "accuracy": 0.5},
        "test": {"loss": test_loss, "accuracy": 0.5},
    }


def _record(cfg, meta=None):
    return Record(cfg, "unused", steps_per_epoch=10, meta=meta, writes=False)


def test_a_run_that_trains_all_its_epochs_is_not_early_stopped():
    cfg = _cfg(**{"train.epochs": "2", "train.early_stopping_patience": "1", **VAL})
    record = _record(cfg)
    record.end_epoch(0, _evals(1.0))
    record.end_epoch(1, _evals(2.0))  # no improvement, but on its last epoch
    assert record.status == "ok"
    early = _record(_cfg(**{"train.epochs": "3", "train.early_stopping_patience": "1", **VAL}))
    early.end_epoch(0, _evals(1.0))
    early.end_epoch(1, _evals(2.0))  # stops before its last epoch
    assert early.status == "early_stopped"


def test_stale_epochs_survive_a_resume():
    cfg = _cfg(**{"train.epochs": "5", "train.early_stopping_patience": "2", **VAL})
    record = _record(cfg)
    record.end_epoch(0, _evals(1.0))
    record.end_epoch(1, _evals(2.0))
    assert record.stale_epochs == 1 and record.status == "ok"
    resumed = _record(cfg, meta=record.meta())  # as a checkpoint at this epoch holds it
    resumed.end_epoch(2, _evals(3.0))
    assert resumed.status == "early_stopped"
    assert resumed.best["epoch"] == 0


@pytest.mark.parametrize("schedule", ["cosine", "step", "exponential", "warmup_cosine"])
def test_resume_refuses_a_new_length_where_the_schedule_is_built_from_it(schedule):
    old = _cfg(**{"opt.schedule": schedule, "train.epochs": "4", "opt.warmup_steps": "10"})
    new = dataclasses.replace(old, train=dataclasses.replace(old.train, epochs=8))
    differences = config.resume_differences(old, new)
    assert len(differences) == 1, differences
    assert (
        "train.epochs: 4 -> 8" in differences[0] and f"opt.schedule={schedule!r}" in differences[0]
    )
    # Refused because the learning rate really changes mid-run: the 4-epoch curve and the
    # 8-epoch one differ at a step both runs take.
    short, long = optim.make_schedule(old.opt, 40), optim.make_schedule(new.opt, 80)
    assert any(float(short(t)) != float(long(t)) for t in range(40))


@pytest.mark.parametrize("schedule", ["constant", "plateau"])
def test_resume_allows_a_new_length_where_the_schedule_does_not_depend_on_it(schedule):
    old = _cfg(**{"opt.schedule": schedule, "train.epochs": "4", "data.validation_size": "1000"})
    new = dataclasses.replace(old, train=dataclasses.replace(old.train, epochs=8))
    assert config.resume_differences(old, new) == []


def test_training_and_validation_examples_never_overlap(make_config):
    with pytest.raises(config.ConfigError, match="data.train_size=55000 exceeds the 50000"):
        run.load_splits(make_config(**{"data.validation_size": 10000, "data.train_size": 55000}))
    splits = run.load_splits(
        make_config(**{"data.validation_size": 10000, "data.train_size": 50000})
    )
    full = run.load_splits(make_config()).train
    np.testing.assert_array_equal(splits.train.labels, full.labels[:50000])
    np.testing.assert_array_equal(splits.validation.labels, full.labels[50000:])


def test_reduce_on_plateau_reads_the_validation_loss_not_the_test_loss():
    cfg = _cfg(
        **{
            "opt.schedule": "plateau",
            "opt.plateau_patience": "1",
            "opt.decay_rate": "0.5",
            "data.validation_size": "1000",
        }
    )
    tx, _ = optim.make_optimizer(cfg.opt, total_steps=100)
    params = {"w": jax.numpy.ones(3)}
    state = TrainState(jax.numpy.zeros((), "int32"), params, {}, tx.init(params))
    end_epoch = run.plateau_program(cfg)
    # Validation stalls while test improves: only a rule that reads validation drops the lr.
    for validation, test in [(1.0, 1.0), (1.0, 0.5), (1.0, 0.25)]:
        state = end_epoch(state, _evals(validation, test))
    expected = tx.init(params)
    for value in (1.0, 1.0, 1.0):
        expected = optim.plateau_step(expected, value, cfg.opt)
    assert float(optim.lr_scale(state.opt_state)) == float(optim.lr_scale(expected)) < 1.0


@pytest.mark.slow
def test_a_signal_during_the_last_chunk_lets_the_run_finish_and_exit_0(
    tmp_path, tfds_dir, monkeypatch, capsys
):
    import json
    import os
    import signal

    from bnlab import cli

    end_epoch = Record.end_epoch

    def signal_in_the_last_epoch(record, epoch, evals):
        if epoch == record.cfg.train.epochs - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as the last chunk's evaluation runs
        end_epoch(record, epoch, evals)

    monkeypatch.setattr(Record, "end_epoch", signal_in_the_last_epoch)
    args = ["train", "--config", "experiments/bn_paper_mlp.py", "--workdir", str(tmp_path)]
    args += ["--smoke", f"--config.data.tfds_dir={tfds_dir}", "--no-progress"]
    assert cli.main(args) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert "the run finished" in err and "resume" not in err.replace("nothing to resume", "")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "ok"
    monkeypatch.setattr(Record, "end_epoch", end_epoch)
    with pytest.raises(config.ConfigError, match="already holds a finished run"):
        run.run(config.validate(config.load_config(ROOT / "experiments/bn_paper_mlp.py")), tmp_path)
    assert cli.main(args) == cli.EXIT_BAD_INPUT


@pytest.mark.slow
def test_early_stopping_is_a_normal_end_exit_0(tmp_path, tfds_dir, capsys):
    import json

    from bnlab import cli

    # The validation loss cannot improve at lr 0: stale from epoch 1 on, stopped at epoch 2.
    args = ["train", "--config", "experiments/bn_paper_mlp.py", "--workdir", str(tmp_path)]
    args += [f"--config.data.tfds_dir={tfds_dir}", "--no-progress", "--config.opt.lr=1e-30"]
    args += ["--config.model.norm=none"]  # no running statistics to move the loss either
    args += ["--config.data.train_size=600", "--config.data.validation_size=600"]
    args += ["--config.train.epochs=4", "--config.train.early_stopping_patience=1"]
    assert cli.main(args) == cli.EXIT_OK
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "early_stopped" and summary["epochs"] < 4
