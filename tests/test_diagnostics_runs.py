"""Diagnostics in runs: records in metrics.jsonl, vmapped trials equal single runs, resume,
a diagnostic from outside the package, and no cost (the same training) when they are off."""

import json

import jax
import numpy as np
import pytest
from conftest import ROOT

from bnlab import cli
from bnlab.training import batched, run, train
from bnlab.training.writers import read_jsonl

MLP = "experiments/bn_paper_mlp.py"
SMALL = {"data.train_size": 600, "train.epochs": 2, "train.log_every_steps": 5}
DIAG = {
    "diagnostics.names": "activations,ics,landscape,hessian,hessian_data,init_gradients",
    "diagnostics.every_steps": 4,
    "diagnostics.batch_size": 60,
    "diagnostics.hessian_num_iters": 8,
    "diagnostics.hessian_top_k": 2,
    "diagnostics.hessian_data_batch_size": 20,
    "diagnostics.hessian_data_num_iters": 8,
    "diagnostics.hessian_data_top_k": 2,
    "diagnostics.hessian_data_num_probes": 2,
    "diagnostics.init_gradients_max_depth": 3,
}


def _records(workdir, split):
    return [r for r in read_jsonl(workdir / "metrics.jsonl") if r["split"] == split]


def _close(got, want, rtol=2e-4, atol=1e-5):
    assert got.keys() == want.keys()
    for key in got:
        np.testing.assert_allclose(
            np.asarray(got[key], float), np.asarray(want[key], float), rtol, atol, err_msg=key
        )


def test_a_run_writes_diag_records_at_every_multiple(make_config, tmp_path):
    cfg = make_config(MLP, **SMALL, **DIAG)
    run.run(cfg, tmp_path / "run")
    diag = _records(tmp_path / "run", "diag")
    assert [r["step"] for r in diag] == [0, 4, 8, 12, 16, 20]  # 10 steps per epoch
    names = {k.split("/")[0] for r in diag for k in r if "/" in k}
    assert names == set(DIAG["diagnostics.names"].split(","))
    # init_gradients at step 0 only; the others at every measurement
    assert [any(k.startswith("init_gradients/") for k in r) for r in diag] == [True] + [False] * 5
    assert all("ics/dense1/l2" in r and "hessian/lambda_max" in r for r in diag)
    assert len(diag[0]["init_gradients/batchnorm/depth3"]) == 3  # a norm per layer


def test_off_they_change_nothing_in_training(make_config, tmp_path):
    """Measuring reads the state and never writes it: with diagnostics on, every train and
    test record is bit-identical to the run without them, and the training program is the
    same program (diagnostics run outside it)."""
    off, on = make_config(MLP, **SMALL), make_config(MLP, **SMALL, **DIAG)
    run.run(off, tmp_path / "off")
    run.run(on, tmp_path / "on")
    for split in ("train", "test"):
        assert _records(tmp_path / "on", split) == _records(tmp_path / "off", split)
    hlo = []
    for cfg in (off, on):
        programs = train.make_programs(cfg, 600)
        state = jax.eval_shape(programs.init, *_init_args(programs, cfg))
        images = jax.ShapeDtypeStruct((600, 28, 28, 1), np.uint8)
        labels = jax.ShapeDtypeStruct((600,), np.int32)
        key = jax.random.key(0)
        lowered = programs.train_epoch.lower(state, images, labels, key, 0, steps=4)
        hlo.append(lowered.as_text())
    assert hlo[0] == hlo[1]


def _init_args(programs, cfg):
    init_key, _ = train.run_keys(cfg.train.seed)
    return init_key, jax.ShapeDtypeStruct((cfg.train.batch_size, 28, 28, 1), np.float32)


def test_vmapped_trials_measure_what_single_runs_measure(make_config, tmp_path):
    configs = [
        make_config(MLP, **SMALL, **DIAG, **{"train.seed": 0}),
        make_config(MLP, **SMALL, **DIAG, **{"train.seed": 1, "opt.lr": 0.2}),
    ]
    dirs = [tmp_path / f"vmap{i}" for i in range(2)]
    batched.run_group(configs, dirs)
    for i, cfg in enumerate(configs):
        alone = tmp_path / f"alone{i}"
        run.run(cfg, alone)
        got, want = _records(dirs[i], "diag"), _records(alone, "diag")
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want, strict=True):
            # Lanczos amplifies round-off in its smallest Ritz values: compare the rest tightly.
            density = [k for k in g if "/density" in k or k == "split"]
            _close({k: v for k, v in g.items() if k not in density},
                   {k: v for k, v in w.items() if k not in density})  # fmt: skip


def _stopped_after_epoch_0(cfg, workdir, monkeypatch):
    """Runs `cfg` in `workdir` until a SIGTERM at the end of epoch 0 stops it (saved)."""
    from bnlab.training.records import Record

    end_epoch = Record.end_epoch

    def stop_after_epoch_0(record, epoch, evals):
        end_epoch(record, epoch, evals)
        if epoch == 0:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(Record, "end_epoch", stop_after_epoch_0)
        with pytest.raises(run.Interrupted):
            run.run(cfg, workdir)


def test_a_resumed_run_measures_each_step_once(make_config, tmp_path, monkeypatch):

    cfg = make_config(MLP, **SMALL, **DIAG, **{"checkpoint.every_steps": 4})
    run.run(cfg, tmp_path / "ref")
    _stopped_after_epoch_0(cfg, tmp_path / "run", monkeypatch)
    run.run(cfg, tmp_path / "run")
    got, want = (
        read_jsonl(tmp_path / "run" / "metrics.jsonl"),
        read_jsonl(tmp_path / "ref" / "metrics.jsonl"),
    )
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    assert got == want


def test_a_run_resumed_at_a_measurement_step_measures_it_once(make_config, tmp_path, monkeypatch):
    """Stopped after epoch 0 at step 10, a multiple of diagnostics.every_steps: the checkpoint
    of step 10 holds its measurement, so the resumed run does not measure step 10 again."""

    light = {**DIAG, "diagnostics.names": "activations,ics", "diagnostics.every_steps": 5}
    cfg = make_config(MLP, **SMALL, **light)
    run.run(cfg, tmp_path / "ref")
    _stopped_after_epoch_0(cfg, tmp_path / "run", monkeypatch)
    assert run.load_checkpoint(tmp_path / "run")[1].step == 10
    run.run(cfg, tmp_path / "run")
    got = [
        r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["split"] == "diag"
    ]
    assert got == [0, 5, 10, 15, 20]


def test_a_diagnostic_registered_by_an_experiment_file_runs_through_bnlab_train(tmp_path, tfds_dir):
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        f"from bnlab.config import load_config\n"
        "import optax\n"
        "from bnlab import schema\n"
        "from bnlab.diagnostics import DiagnosticSpec, register_diagnostic\n\n"
        "def weight_norm(ctx):\n"
        "    scale = ctx.cfg.diagnostics.weight_norm_scale\n"
        "    return {'l2': scale * optax.tree.norm(ctx.state.params)}\n\n"
        "FIELD = schema.field(1.0, 'a factor', check=schema.positive)\n"
        "register_diagnostic('weight_norm', DiagnosticSpec(fn=weight_norm, doc='||w||',\n"
        "    fields={'weight_norm_scale': FIELD}))\n\n"
        f"def get_config():\n"
        f"    return load_config({str(ROOT / MLP)!r})\n"
    )
    workdir = tmp_path / "run"
    args = ["train", "--config", str(experiment), "--workdir", str(workdir), "--no-progress"]
    args += ["--smoke", f"--config.data.tfds_dir={tfds_dir}"]
    args += ["--config.diagnostics.names=weight_norm", "--config.diagnostics.every_steps=10"]
    args += ["--config.diagnostics.weight_norm_scale=2.0"]
    assert cli.main(args) == 0
    diag = _records(workdir, "diag")
    assert [r["step"] for r in diag] == [0, 10, 20]
    final = run.load_checkpoint(workdir)[1].state
    import optax

    np.testing.assert_allclose(
        diag[-1]["weight_norm/l2"], 2 * optax.tree.norm(final.params), rtol=1e-6
    )
    assert (
        json.loads((workdir / "config.json").read_text())["diagnostics"]["weight_norm_scale"] == 2.0
    )
