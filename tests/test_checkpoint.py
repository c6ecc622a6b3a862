"""Checkpoints: killed runs resume bit-identical, damaged checkpoints fall back loudly, changed
models are refused, a full disk keeps the old checkpoints, exports round-trip."""

import errno
import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ROOT

from bnlab import cli, config, export
from bnlab.studies import sweep
from bnlab.training import checkpoint, run, train
from bnlab.training.checkpoint import CheckpointError, CheckpointWarning

MLP = "experiments/bn_paper_mlp.py"
# The paper MLP on 600 examples: 10 steps per epoch; chunks of 3, windows of 4 steps.
SMALL = {
    "data.train_size": "600",
    "train.epochs": "2",
    "train.log_every_steps": "4",
    "checkpoint.every_steps": "3",
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tfds_dir):
    """One uninterrupted run of the small config: `(cfg, workdir)`; checkpoints [16, 19, 20]."""
    cfg = _config(tfds_dir)
    workdir = tmp_path_factory.mktemp("reference") / "run"
    run.run(cfg, workdir)
    return cfg, workdir


def _config(tfds_dir, **overrides):
    overrides = {**SMALL, "data.tfds_dir": tfds_dir, **overrides}
    return config.validate(config.apply_overrides(config.load_config(ROOT / MLP), overrides))


def _unfinished_copy(workdir: Path, dest: Path) -> Path:
    """The run as if killed after its last checkpoint, before writing summary.json."""
    shutil.copytree(workdir, dest)
    (dest / "summary.json").unlink()
    return dest


def _final_state(workdir):
    return run.load_checkpoint(workdir)[1]


def _assert_same_run(workdir, ref_workdir):
    got, want = _final_state(workdir), _final_state(ref_workdir)
    assert got.step == want.step
    jax.tree.map(np.testing.assert_array_equal, got.state, want.state)  # all of TrainState
    assert (workdir / "metrics.jsonl").read_bytes() == (ref_workdir / "metrics.jsonl").read_bytes()
    summary = json.loads((workdir / "summary.json").read_text())
    ref_summary = json.loads((ref_workdir / "summary.json").read_text())
    for key in ("status", "test_accuracy", "test_loss", "steps", "epochs"):
        assert summary[key] == ref_summary[key], key


def _damage(step_dir: Path) -> None:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _steps(workdir):
    root = workdir / checkpoint.CHECKPOINT_DIR
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


@pytest.mark.slow  # subprocesses killed and resumed
def test_killed_and_signalled_runs_resume_bit_identical(tmp_path, tfds_dir):
    """SIGKILL twice at random moments (mid-step or mid-save), then SIGTERM (a checkpoint, the
    metrics flushed, exit status 4; SIGINT takes the same path), then the same command finishes
    the run exactly."""
    overrides = {**SMALL, "train.epochs": "8", "checkpoint.every_steps": "2"}  # 80 steps
    ref = tmp_path / "ref"
    run.run(_config(tfds_dir, **overrides), ref)
    ref_records = (ref / "metrics.jsonl").read_text().splitlines()
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bnlab.cli", "train", "--config", MLP, "--workdir", str(workdir)]
    cmd += ["--no-progress", f"--config.data.tfds_dir={tfds_dir}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    interrupted = []
    for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM):
        before = max(_steps(workdir), default=0)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while proc.poll() is None and max(_steps(workdir), default=0) <= before:
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        if sig == signal.SIGKILL:
            time.sleep(rng.uniform(0.0, 0.4))  # anywhere: in a chunk or in a save
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break  # finished before the signal landed
        interrupted.append(max(_steps(workdir)))
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            continue
        assert proc.returncode == cli.EXIT_INTERRUPTED, err.decode()
        assert f"stopped by {sig.name}" in err.decode() and b"resume" in err
        # Saved at the signal and flushed: the records are exactly the reference's up to it.
        saved = max(_steps(workdir))
        records = (workdir / "metrics.jsonl").read_text().splitlines()
        assert records == [r for r in ref_records if json.loads(r)["step"] <= saved]
        assert not (workdir / "summary.json").exists()
    assert len(interrupted) == 3, f"the run finished too early (seed {seed})"
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _assert_same_run(workdir, ref)


def test_damaged_latest_checkpoint_warns_and_falls_back(reference, tmp_path):
    cfg, ref = reference
    workdir = _unfinished_copy(ref, tmp_path / "run")
    assert _steps(workdir) == [16, 19, 20]
    _damage(workdir / "checkpoints" / "20")
    with pytest.warns(CheckpointWarning, match=r"checkpoints/20 is damaged.*previous"):
        assert run.load_checkpoint(workdir)[1].step == 19
    with pytest.warns(CheckpointWarning, match=r"checkpoints/20 is damaged"):
        run.run(cfg, workdir)
    assert (workdir / "checkpoints.corrupt" / "20").is_dir()  # set aside, not deleted
    _assert_same_run(workdir, ref)


def test_arrays_that_orbax_reads_back_but_differ_from_the_digest_are_damage(reference, tmp_path):
    """Checkpoint 20's arrays replaced by checkpoint 19's: orbax restores them without error,
    only the SHA-256 digest saved with 20 tells that they are not what was saved."""
    cfg, ref = reference
    workdir = _unfinished_copy(ref, tmp_path / "run")
    shutil.rmtree(workdir / "checkpoints" / "20" / "state")
    shutil.copytree(
        workdir / "checkpoints" / "19" / "state", workdir / "checkpoints" / "20" / "state"
    )
    with pytest.warns(CheckpointWarning, match=r"checkpoints/20 is damaged \(array bytes differ"):
        assert run.load_checkpoint(workdir)[1].step == 19
    with pytest.warns(CheckpointWarning, match=r"checkpoints/20 is damaged"):
        run.run(cfg, workdir)
    _assert_same_run(workdir, ref)


def test_no_good_checkpoint_is_an_error_not_a_fresh_start(reference, tmp_path, capsys):
    cfg, ref = reference
    workdir = _unfinished_copy(ref, tmp_path / "run")
    for step in _steps(workdir):
        (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text("{trunc")
    metrics = (workdir / "metrics.jsonl").read_bytes()
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(CheckpointError, match="no good checkpoint"),
    ):
        run.run(cfg, workdir)
    assert (workdir / "metrics.jsonl").read_bytes() == metrics
    assert not (workdir / "summary.json").exists()
    with pytest.warns(CheckpointWarning):
        assert cli.main(["evaluate", str(workdir)]) == cli.EXIT_BAD_INPUT
    assert "Nothing was overwritten" in capsys.readouterr().err


def test_resume_refuses_a_changed_model_and_allows_more_epochs(reference, tmp_path, tfds_dir):
    _, ref = reference
    workdir = _unfinished_copy(ref, tmp_path / "run")
    changed = _config(tfds_dir, **{"model.norm": "none", "opt.lr": "0.1"})
    with pytest.raises(config.ConfigError) as err:
        run.run(changed, workdir)
    message = str(err.value)
    assert "model.norm: 'batchnorm' -> 'none'" in message and "opt.lr: 0.5 -> 0.1" in message
    assert _steps(workdir) == [16, 19, 20]
    summary = run.run(_config(tfds_dir, **{"train.epochs": "3"}), workdir)
    assert summary["steps"] == 30 and summary["epochs"] == 3
    assert json.loads((workdir / "config.json").read_text())["train"]["epochs"] == 3


def test_without_config_json_the_checkpoints_own_config_refuses_a_change(
    reference, tmp_path, tfds_dir
):
    """The config saved in each checkpoint is checked too: a lost or replaced config.json
    does not let a run resume under other hyperparameters of the same structure."""
    _, ref = reference
    workdir = _unfinished_copy(ref, tmp_path / "run")
    (workdir / "config.json").unlink()
    with pytest.raises(config.ConfigError, match=r"opt\.lr: 0\.5 -> 0\.1"):
        run.run(_config(tfds_dir, **{"opt.lr": "0.1"}), workdir)
    assert _steps(workdir) == [16, 19, 20]


def test_a_checkpoint_of_another_model_is_refused(reference, tmp_path):
    _, ref = reference
    workdir = _unfinished_copy(ref, tmp_path / "run")
    cfg = json.loads((workdir / "config.json").read_text())
    cfg["model"]["norm"] = "none"  # the config now describes a model without BN
    (workdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="holds another model's state"):
        run.load_checkpoint(workdir)


def test_full_disk_while_saving_keeps_the_earlier_checkpoints(
    reference, tmp_path, monkeypatch, tfds_dir
):
    cfg, ref = reference
    from orbax.checkpoint._src.handlers import standard_checkpoint_handler as handler

    original, calls = handler.StandardCheckpointHandler.async_save, []

    async def full_after_two(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(handler.StandardCheckpointHandler, "async_save", full_after_two)
    workdir = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"checkpoint 9 .*the disk is full.*\(3, 6\) are"):
        run.run(cfg, workdir)
    monkeypatch.undo()
    assert _steps(workdir) == [3, 6]
    assert run.load_checkpoint(workdir)[1].step == 6  # intact and readable
    run.run(cfg, workdir)  # space freed: the same call resumes
    _assert_same_run(workdir, ref)


def test_best_checkpoint_is_kept_beside_the_latest(tmp_path, tfds_dir):
    overrides = {"train.epochs": "4", "checkpoint.every_steps": "0", "checkpoint.keep": "1"}
    cfg = _config(tfds_dir, **overrides, **{"checkpoint.best_metric": "loss", "opt.lr": "5.0"})
    run.run(cfg, tmp_path / "run")
    tests = [r for r in _records(tmp_path / "run") if r["split"] == "test"]
    best = min(tests, key=lambda r: r["loss"])["step"]
    assert _steps(tmp_path / "run") == sorted({best, 40})


def test_interrupted_sweep_trial_resumes_from_its_checkpoints(reference, tmp_path, tfds_dir):
    cfg, ref = reference
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        f"from bnlab.config import load_config\n\n\ndef get_config():\n"
        f"    return load_config({str(ROOT / MLP)!r})\n\n\ndef sweep():\n"
        "    yield {'train.seed': 0}\n"
    )
    extra = {**SMALL, "data.tfds_dir": tfds_dir}
    (trial,) = sweep.expand(sweep.load_experiment(experiment))
    module = sweep.load_experiment(experiment)
    assert sweep.trial_config(module, trial, smoke=False, extra=extra) == cfg
    run_dir = _unfinished_copy(ref, tmp_path / "out" / "runs" / trial.trial_id)
    shutil.rmtree(run_dir / "checkpoints" / "20")
    kept = (run_dir / "checkpoints" / "16").stat().st_mtime_ns
    counts = sweep.run_sweep(experiment, tmp_path / "out", overrides=extra, log=lambda s: None)
    assert counts == {"ok": 1}
    assert (run_dir / "checkpoints" / "16").stat().st_mtime_ns == kept  # resumed, not redone
    _assert_same_run(run_dir, ref)


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _eval_logits(cfg, params, batch_stats, images):
    model = train.build_model(cfg)
    return model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)


def test_export_npz_round_trips(reference, tmp_path, capsys):
    cfg, ref = reference
    assert cli.main(["export", str(ref), "--format", "npz", "--out", str(tmp_path / "w.npz")]) == 0
    params, batch_stats, step = export.load_npz(tmp_path / "w.npz")
    restored = _final_state(ref)
    assert step == restored.step == 20
    images = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    np.testing.assert_array_equal(
        _eval_logits(cfg, params, batch_stats, images),
        _eval_logits(cfg, restored.state.params, restored.state.batch_stats, images),
    )
    assert cli.main(["evaluate", str(ref)]) == 0
    summary = json.loads((ref / "summary.json").read_text())
    assert f"test_accuracy={summary['test_accuracy']:.4f}" in capsys.readouterr().out


def test_export_torch_state_dict_gives_the_same_eval_outputs(reference, tmp_path):
    torch = pytest.importorskip("torch")
    cfg, ref = reference
    path = export.export(ref, "torch", tmp_path / "w.pt")
    nn = torch.nn
    model = nn.Module()
    for i in range(3):
        model.add_module(f"dense{i}", nn.Linear(784 if i == 0 else 100, 100))
        block = nn.Module()
        block.add_module("norm", nn.BatchNorm1d(100, eps=cfg.norm.epsilon))
        model.add_module(f"block{i}", block)
    model.add_module("head", nn.Linear(100, 10))
    model.load_state_dict(torch.load(path), strict=True)
    model.eval()
    images = np.random.default_rng(0).uniform(size=(8, 28, 28, 1)).astype(np.float32)
    x = torch.from_numpy(images.reshape(8, -1))
    with torch.no_grad():
        for i in range(3):
            x = torch.sigmoid(getattr(model, f"block{i}").norm(getattr(model, f"dense{i}")(x)))
        logits = model.head(x).numpy()
    restored = _final_state(ref)
    expected = _eval_logits(cfg, restored.state.params, restored.state.batch_stats, images)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_torch_layout_of_the_cnn(make_config):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    cfg = make_config("experiments/mnist_cnn.py")
    model = train.build_model(cfg)
    images = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
    variables = model.init(jax.random.key(1), images, train=False)
    keys = iter(jax.random.split(jax.random.key(2), 100))
    stats = jax.tree.map(  # non-trivial running statistics, variances positive
        lambda v: v + jax.random.uniform(next(keys), v.shape, minval=0.1, maxval=0.5),
        variables["batch_stats"],
    )
    layout = export.to_torch_layout(variables["params"], stats, step=7)
    tm = nn.Module()
    for i, (cin, cout) in enumerate([(1, 32), (32, 64)]):
        tm.add_module(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1))
    for i, (features, bn) in enumerate([(32, nn.BatchNorm2d), (64, nn.BatchNorm2d), (256, None)]):
        block = nn.Module()
        block.add_module("norm", (bn or nn.BatchNorm1d)(features, eps=cfg.norm.epsilon))
        tm.add_module(f"block{i}", block)
    tm.add_module("dense", nn.Linear(7 * 7 * 64, 256))
    tm.add_module("head", nn.Linear(256, 10))
    tm.load_state_dict({k: torch.tensor(v) for k, v in layout.items()}, strict=True)
    tm.eval()
    assert int(tm.block0.norm.num_batches_tracked) == 7
    relu, pool = torch.relu, nn.AvgPool2d(2)
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        x = pool(relu(tm.block0.norm(tm.conv0(x))))
        x = pool(relu(tm.block1.norm(tm.conv1(x))))
        x = relu(tm.block2.norm(tm.dense(torch.flatten(x, 1))))
        logits = tm.head(x).numpy()
    expected = model.apply(
        {"params": variables["params"], "batch_stats": stats}, images, train=False
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def _small_checkpoints(directory, steps=(1, 2)):
    """A `Checkpointer` holding tiny checkpoints of `steps` (no training): `(ckpt, tree)`."""
    ckpt = checkpoint.Checkpointer(directory, config.CheckpointConfig())
    tree = {"w": np.arange(6.0).reshape(2, 3), "b": np.ones(3, np.float32)}
    for step in steps:
        meta = {"step": step, "stale_epochs": 0, "best": {"epoch": 0, "value": 0.5}}
        ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, tree), meta)
    return ckpt, tree


def test_changed_checkpoint_metadata_is_damage_and_falls_back(tmp_path):
    """The metadata (progress, best, stale epochs) is covered by a digest like the arrays."""
    ckpt, tree = _small_checkpoints(tmp_path / "checkpoints")
    meta_file = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert ckpt.restore(tree).meta["stale_epochs"] == 0
    meta["stale_epochs"] = 3  # still valid JSON, still the same arrays
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(CheckpointWarning, match=r"checkpoints/2 is damaged \(metadata differs"):
        restored = ckpt.restore(tree)
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["w"], tree["w"])
    with pytest.raises(CheckpointError, match="metadata differs from its saved digest"):
        ckpt.restore(tree, step=2)
    ckpt.close()


def test_full_disk_inside_orbax_is_one_error_and_leaves_no_partial_checkpoint(
    tmp_path, monkeypatch, caplog, capfd
):
    """As a real full disk fails: inside orbax's writer threads, which log each failure with
    its traceback before the save raises."""
    from orbax.checkpoint._src.serialization import type_handlers

    ckpt, tree = _small_checkpoints(tmp_path / "checkpoints", steps=(1,))

    async def no_space(self, *args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: Failed to write: No space left on device")

    monkeypatch.setattr(type_handlers.NumpyHandler, "_background_serialize", no_space)
    capfd.readouterr()
    with pytest.raises(CheckpointError, match=r"checkpoint 2 .*the disk is full.*\(1\) are"):
        ckpt.save(2, tree, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]  # no tmp
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "Traceback" not in "".join(capfd.readouterr())
    monkeypatch.undo()
    ckpt.save(2, tree, {"step": 2})  # space freed: the same step saves
    assert ckpt.steps() == [1, 2]
    ckpt.close()


def test_files_that_fail_to_close_on_a_full_disk_leave_the_first_error_reported(
    tmp_path, monkeypatch
):
    """A failed save's run closes its metric files in a `finally`; their flush failing too
    must not replace the save's message with an OSError traceback."""
    from bnlab.training.records import Record

    record = Record(config.validate(config.default_config()), tmp_path, steps_per_epoch=1)
    record.start()

    def no_space():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record._writer, "close", no_space)
    with pytest.raises(CheckpointError, match="the disk is full"):
        try:
            raise CheckpointError("could not save checkpoint 9: the disk is full")
        finally:
            record.close()
    record.start()
    monkeypatch.setattr(record._writer, "close", no_space)
    with pytest.raises(OSError, match="No space left"):  # alone, the failure is not hidden
        record.close()
