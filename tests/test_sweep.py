"""Sweeps: stable trial ids, shards that partition, resume after a kill without loss."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from bnlab import cli, config
from bnlab.studies import sweep
from bnlab.training.writers import write_json

EXPERIMENT = """
from bnlab.config import default_config

SMOKE = {{"data.train_size": 600, "train.epochs": 1}}


def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.activation = "sigmoid"
    c.train.batch_size = 60
    c.data.tfds_dir = {tfds_dir!r}
    return c


def sweep(smoke=False):
    for norm in ("batchnorm", "none"):
        for seed in range(1 if smoke else {seeds}):
            yield {{"model.norm": norm, "train.seed": seed}}
"""


def _experiment(tmp_path, tfds_dir="", seeds=3) -> Path:
    path = tmp_path / "exp.py"
    path.write_text(EXPERIMENT.format(tfds_dir=tfds_dir, seeds=seeds))
    return path


def test_trial_ids_are_stable_unique_and_readable(tmp_path):
    trials = sweep.expand(sweep.load_experiment(_experiment(tmp_path)))
    assert len(trials) == 6 and len({t.trial_id for t in trials}) == 6
    again = sweep.expand(sweep.load_experiment(_experiment(tmp_path)))
    assert [t.trial_id for t in again] == [t.trial_id for t in trials]
    assert trials[0].trial_id.startswith("norm-batchnorm_seed-0-")
    assert sweep.trial_id({"a.x": 1, "b.y": "z"}) == sweep.trial_id({"b.y": "z", "a.x": 1})
    assert sweep.trial_id({"opt.lr": 0.1}) != sweep.trial_id({"model.lr": 0.1})
    assert len(sweep.expand(sweep.load_experiment(_experiment(tmp_path)), smoke=True)) == 2


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_shards_partition_the_trials(tmp_path, count):
    trials = sweep.expand(sweep.load_experiment(_experiment(tmp_path, seeds=20)))
    parts = [sweep.shard(trials, i, count) for i in range(count)]
    ids = [t.trial_id for part in parts for t in part]
    assert sorted(ids) == sorted(t.trial_id for t in trials)


def test_bad_shard_and_bad_sweeps(tmp_path):
    for text in ("2/2", "a/b", "1", "-1/3"):
        with pytest.raises(config.ConfigError, match="expected i/N"):
            sweep.parse_shard(text)
    dup = tmp_path / "dup.py"
    dup.write_text(
        "from bnlab.config import default_config\nget_config = default_config\n"
        "def sweep():\n    yield {'opt.lr': 0.1}\n    yield {'opt.lr': 0.1}\n"
    )
    with pytest.raises(config.ConfigError, match="same trial twice"):
        sweep.expand(sweep.load_experiment(dup))
    with pytest.raises(config.ConfigError, match="defines no sweep"):
        sweep.load_experiment(ROOT / "experiments/mnist_cnn.py")


def test_a_failing_trial_is_marked_and_its_siblings_run(tmp_path):
    def runner(cfg, run_dir):
        if cfg.model.norm == "none":
            raise RuntimeError("boom")
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text('{"status": "ok"}')
        return {"status": "ok"}

    counts = sweep.run_sweep(
        _experiment(tmp_path), tmp_path / "out", runner=runner, engine="sequential", log=print
    )
    assert counts == {"ok": 3, "failed": 3}
    failed = [
        json.loads(p.read_text())
        for p in (tmp_path / "out" / "runs").glob("*/summary.json")
        if "norm-none" in p.parent.name
    ]
    assert len(failed) == 3 and all("boom" in f["error"] for f in failed)
    again = sweep.run_sweep(
        _experiment(tmp_path), tmp_path / "out", runner=runner, engine="sequential", log=print
    )
    assert again == {"skipped": 3, "failed": 3}  # failed trials are retried, and fail again

    def fixed(cfg, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text('{"status": "ok"}')
        return {"status": "ok"}

    fixed_run = sweep.run_sweep(
        _experiment(tmp_path), tmp_path / "out", runner=fixed, engine="sequential", log=print
    )
    assert fixed_run == {"skipped": 3, "ok": 3}


def test_a_failed_trial_with_checkpoints_is_retried_from_them(tmp_path, tfds_dir, monkeypatch):
    """A real trial that checkpoints, then fails: the rerun resumes it (it once stopped the
    whole sweep with a "finished run" error) and it ends as the uninterrupted trial does."""
    from bnlab.training.records import Record

    experiment = _experiment(tmp_path, tfds_dir=tfds_dir, seeds=1)
    extra = {"data.train_size": "600", "train.epochs": "2", "checkpoint.every_steps": "10"}
    sweep.run_sweep(experiment, tmp_path / "ref", overrides=extra, log=print)
    end_epoch = Record.end_epoch

    def fail_in_epoch_2(record, epoch, evals):
        if epoch == 1:
            raise RuntimeError("a transient failure after the first checkpoint")
        end_epoch(record, epoch, evals)

    monkeypatch.setattr(Record, "end_epoch", fail_in_epoch_2)
    out = tmp_path / "out"
    assert sweep.run_sweep(experiment, out, overrides=extra, log=print) == {"failed": 2}
    runs = sorted((out / "runs").iterdir())
    assert all(sorted(p.name for p in (d / "checkpoints").iterdir()) == ["10"] for d in runs)
    monkeypatch.setattr(Record, "end_epoch", end_epoch)
    assert sweep.run_sweep(experiment, out, overrides=extra, log=print) == {"ok": 2}
    for run_dir in runs:
        assert "transient" in json.loads((run_dir / sweep.FAILURE_FILE).read_text())["error"]
        ref = tmp_path / "ref" / "runs" / run_dir.name
        assert (run_dir / "metrics.jsonl").read_bytes() == (ref / "metrics.jsonl").read_bytes()


def test_bad_input_stops_the_sweep_instead_of_failing_trials(tmp_path):
    def runner(cfg, run_dir):
        raise config.ConfigError("a message saying how to fix it")

    with pytest.raises(config.ConfigError, match="how to fix"):
        sweep.run_sweep(
            _experiment(tmp_path), tmp_path / "out", runner=runner, engine="sequential", log=print
        )
    assert not list((tmp_path / "out" / "runs").glob("*/summary.json"))


def test_a_failing_chunk_keeps_the_results_of_earlier_chunks(tmp_path, monkeypatch):
    from bnlab.training import batched

    def run_group(cfgs, dirs, **kwargs):  # the first chunk finishes, the second raises
        dirs[0].mkdir(parents=True)
        (dirs[0] / "summary.json").write_text('{"status": "ok"}')
        raise MemoryError("out of memory in chunk 2")

    monkeypatch.setattr(batched, "run_group", run_group)
    counts = sweep.run_sweep(_experiment(tmp_path, seeds=2), tmp_path / "out", log=print)
    assert counts == {"ok": 2, "failed": 2}  # two groups (BN, none) of two seeds
    statuses = sorted(
        json.loads(p.read_text())["status"] for p in (tmp_path / "out").glob("runs/*/summary.json")
    )
    assert statuses == ["failed", "failed", "ok", "ok"]


def test_a_folder_holds_one_variant_of_a_sweep(tmp_path):
    def runner(cfg, run_dir):
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text('{"status": "ok"}')
        return {"status": "ok"}

    experiment, out = _experiment(tmp_path), tmp_path / "out"
    sweep.run_sweep(experiment, out, smoke=True, runner=runner, engine="sequential", log=print)
    with pytest.raises(config.ConfigError, match="smoke=True"):
        sweep.run_sweep(experiment, out, runner=runner, engine="sequential", log=print)
    with pytest.raises(config.ConfigError, match="overrides"):
        sweep.run_sweep(
            experiment, out, smoke=True, overrides={"opt.lr": "0.1"}, runner=runner, log=print
        )


@pytest.mark.slow  # a subprocess killed and resumed
def test_resume_after_kill_runs_each_trial_once(tmp_path, tfds_dir):
    experiment = _experiment(tmp_path, tfds_dir=tfds_dir, seeds=2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bnlab.cli", "sweep", str(experiment), "--workdir", str(out)]
    cmd += ["--config.data.train_size=600", "--config.train.epochs=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("runs/*/summary.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.read_bytes() for p in out.glob("runs/*/summary.json")}
    assert len(finished) >= 1
    mtimes = {name: os.stat(out / "runs" / name / "summary.json").st_mtime_ns for name in finished}

    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = {p.parent.name: p for p in out.glob("runs/*/summary.json")}
    trial_ids = {t["trial_id"] for t in json.loads((out / "sweep.json").read_text())["trials"]}
    assert set(summaries) == trial_ids and len(trial_ids) == 4
    for name, content in finished.items():  # finished results untouched
        assert summaries[name].read_bytes() == content
        assert os.stat(summaries[name]).st_mtime_ns == mtimes[name]
    assert f"{len(finished)} skipped" in result.stdout
    for path in summaries.values():
        assert json.loads(path.read_text())["status"] == "ok"
        steps = [json.loads(line)["step"] for line in (path.parent / "metrics.jsonl").open()]
        assert steps == sorted(steps)  # one attempt's records, not two interleaved


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.py")), ids=lambda p: p.name)
def test_every_experiment_declares_itself_and_validates(path):
    module = config.load_module(path)
    for part in ("Hypothesis", "Command:", "Runtime:", "Expected"):
        assert part in (module.__doc__ or ""), f"{path.name}: docstring lacks {part!r}"
    assert hasattr(module, "SMOKE"), f"{path.name}: no SMOKE variant"
    if hasattr(module, "sweep"):
        for smoke in (False, True):
            for trial in sweep.expand(module, smoke=smoke):
                sweep.trial_config(module, trial, smoke=smoke, extra={})


def _recording_runner(cfg, run_dir):
    """A trial that 'trains' instantly: the files a finished run leaves that sweeps read."""
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "summary.json", {"status": "ok"})
    return {"status": "ok"}


def test_a_folder_is_not_reused_by_another_experiment(tmp_path, capsys):
    out, experiment = tmp_path / "out", _experiment(tmp_path, seeds=2)
    kwargs = {"runner": _recording_runner, "engine": "sequential", "log": print}
    assert sweep.run_sweep(experiment, out, **kwargs) == {"ok": 4}
    index = (out / "sweep.json").read_bytes()
    other = tmp_path / "other.py"
    grid = EXPERIMENT.format(tfds_dir="", seeds=5)
    other.write_text(grid.replace('("batchnorm", "none")', '("none",)'))  # no BN trials
    with pytest.raises(config.ConfigError, match="other.py is another experiment"):
        sweep.run_sweep(other, out, **kwargs)
    assert cli.main(["sweep", str(other), "--workdir", str(out)]) == 2
    assert "Use another --workdir for it" in capsys.readouterr().err
    assert (out / "sweep.json").read_bytes() == index  # the earlier trials stay indexed

    # The same experiment reached by another path (a shard's machine) continues it.
    copy = tmp_path / "copy" / "exp.py"
    copy.parent.mkdir()
    copy.write_text(experiment.read_text())
    assert sweep.run_sweep(copy, out, **kwargs) == {"skipped": 4}
    # The same file with a larger grid adds its new trials.
    experiment.write_text(EXPERIMENT.format(tfds_dir="", seeds=3))
    assert sweep.run_sweep(experiment, out, **kwargs) == {"skipped": 4, "ok": 2}
    # A changed base config would mix with the finished trials' results: refused.
    experiment.write_text(EXPERIMENT.format(tfds_dir="", seeds=3).replace("= 60", "= 30"))
    with pytest.raises(config.ConfigError, match=r"train.batch_size: 60 -> 30"):
        sweep.run_sweep(experiment, out, **kwargs)
