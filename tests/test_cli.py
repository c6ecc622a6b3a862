"""The `bnlab` commands: a real run on MNIST, its files, evaluation and export from anywhere, and
early, clear errors."""

import json
import os
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from conftest import MNIST_DIR, ROOT

from bnlab import cli, config, export
from bnlab.studies import sweep


def _bnlab(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "bnlab.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.mark.slow  # the main job's CNN, trained through the CLI
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


_BEFORE_JAX = """
import json, sys
from bnlab import cli

HEAVY = ("jax", "flax", "optax", "orbax.checkpoint", "tensorboardX")
out = {}
try:
    cli.main(["--help"])
except SystemExit as exit:
    out["help"] = (exit.code, [m for m in HEAVY if m in sys.modules])
workdir = sys.argv[1]
commands = {
    "train": ["train", "--config", "experiments/mnist_cnn.py", "--workdir", workdir,
              "--config.opt.lr=nan"],
    "unknown key": ["train", "--config", "experiments/mnist_cnn.py", "--workdir", workdir,
                    "--config.opt.lrr=0.1"],
    "invalid": ["train", "--config", "experiments/mnist_cnn.py", "--workdir", workdir,
                "--config.model.norm=layer", "--config.diagnostics.hessian_top_k=0"],
    "sweep": ["sweep", "experiments/bn_momentum.py", "--workdir", workdir,
              "--config.model.name=resnet"],
    "evaluate": ["evaluate", workdir, "--config.opt.lr=1"],
}
for name, args in commands.items():
    out[name] = (cli.main(args), [m for m in HEAVY if m in sys.modules])
print(json.dumps(out))
"""


@pytest.mark.slow  # a fresh process: the test session has JAX loaded
def test_help_and_refused_input_come_before_jax_and_flax(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _BEFORE_JAX, str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out.pop("help") == [0, []]
    assert out == {name: [2, []] for name in out}, (out, proc.stderr)
    assert not (tmp_path / "run").exists()
    assert "opt.lr (peak learning rate) must be a finite number" in proc.stderr
    assert "model.norm='layer' is not one of" in proc.stderr
    assert "diagnostics.hessian_top_k=0 must be >= 1" in proc.stderr
    assert "model.name='resnet' is not one of" in proc.stderr


_LEAVE = """
import atexit, sys, threading, time
from pathlib import Path
from bnlab import cli

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late():
    time.sleep(0.5)
    (out / "thread").write_text("finished")

threading.Thread(target=late).start()
sys.stdout.write("buffered")
cli._leave(3)
"""


@pytest.mark.slow  # a subprocess
def test_leaving_runs_the_exit_handlers_waits_for_threads_and_flushes(tmp_path):
    """`bnlab` skips the interpreter's teardown, not what shutting down does that matters."""
    proc = subprocess.run(
        [sys.executable, "-c", _LEAVE, str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 3, proc.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "finished"
    assert proc.stdout == "buffered"


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
    """An MLP run trained in folder `a` with relative data folders; checkpoints at steps 5, 10."""
    a = tmp_path_factory.mktemp("a")
    (a / "mnist").symlink_to(MNIST_DIR)
    (a / "tfds").symlink_to(tfds_dir)
    with pytest.MonkeyPatch.context() as m:
        m.chdir(a)
        code = cli.main(
            [
                "train", "--config", str(ROOT / "experiments/bn_paper_mlp.py"), "--workdir", "run",
                "--no-progress", "--config.data.mnist_dir=mnist", "--config.data.tfds_dir=tfds",
                "--config.data.train_size=600", "--config.train.epochs=1",
                "--config.checkpoint.every_steps=5",
            ]
        )  # fmt: skip
    assert code == 0
    return a / "run"


def _accuracy_line(workdir) -> str:
    summary = json.loads((workdir / "summary.json").read_text())
    return f"test_accuracy={summary['test_accuracy']:.4f}"


def test_evaluate_works_from_any_folder_and_finds_moved_data(
    trained, tmp_path, monkeypatch, capsys
):
    data = json.loads((trained / "config.json").read_text())["data"]
    assert (data["mnist_dir"], data["tfds_dir"]) == (
        str(trained.parent / "mnist"),
        str(trained.parent / "tfds"),
    )
    monkeypatch.chdir(tmp_path)  # not where it trained
    monkeypatch.delenv(config.MNIST_DIR_ENV)
    assert cli.main(["evaluate", str(trained)]) == 0
    assert _accuracy_line(trained) in capsys.readouterr().out
    moved = tmp_path / "moved"
    (trained.parent / "mnist").rename(moved)
    try:
        assert cli.main(["evaluate", str(trained)]) == 2
        assert f"MNIST folder {trained.parent / 'mnist'} does not exist" in capsys.readouterr().err
        for args, env in [
            (["--mnist-dir", "moved"], None),  # relative to this folder
            ([f"--config.data.mnist_dir={moved}"], None),
            ([], str(moved)),
        ]:
            if env:
                monkeypatch.setenv(config.MNIST_DIR_ENV, env)
            assert cli.main(["evaluate", str(trained), *args]) == 0, args
            assert _accuracy_line(trained) in capsys.readouterr().out
    finally:
        moved.rename(trained.parent / "mnist")
    assert cli.main(["evaluate", str(trained), "--config.opt.lr=1"]) == 2
    assert "--mnist-dir" in capsys.readouterr().err


def test_evaluate_a_missing_step_lists_the_steps_there_are(trained, capsys):
    assert cli.main(["evaluate", str(trained), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint of step 7; its checkpoints are of steps 5, 10" in err
    assert "damaged" not in err
    assert cli.main(["evaluate", str(trained), "--step", "5"]) == 0
    assert "step=5 " in capsys.readouterr().out


def test_export_creates_the_folders_of_out(trained, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "weights.npz"
    assert cli.main(["export", str(trained), "--format", "npz", "--out", str(out)]) == 0
    assert export.load_npz(out)[2] == 10
    assert cli.main(["export", str(trained), "--format", "npz", "--out", str(out.parent)]) == 0
    assert export.load_npz(out.parent / "export.npz")[2] == 10  # a folder gets export.npz
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["export", str(trained), "--format", "npz", "--out", f"{a_file}/w.npz"]) == 2
    assert f"cannot create the folder {a_file} for the export" in capsys.readouterr().err


def test_export_torch_without_torch_gives_an_install_command_that_works(
    trained, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    out = tmp_path / "w.pt"
    assert cli.main(["export", str(trained), "--format", "torch", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    pin = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"pip install {pin['torch'][0]} " in err and "bnlab[torch]'" not in err
    assert "-c constraints.txt -e '.[torch]'" in err and not out.exists()


def test_a_data_error_leaves_no_new_folder_behind(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["train", "--config", str(ROOT / "experiments/mnist_cnn.py")]
    args += [f"--config.data.mnist_dir={empty}"]
    assert cli.main([*args, "--workdir", str(tmp_path / "new" / "run")]) == 2
    assert f"MNIST folder {empty} has no" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
    assert cli.main([*args, "--workdir", str(empty)]) == 2
    assert empty.is_dir()  # it existed before: kept


def test_a_shard_without_trials_says_so(tmp_path, capsys):
    experiment = tmp_path / "one.py"
    experiment.write_text(
        "from bnlab.config import default_config\nget_config = default_config\n"
        "def sweep():\n    yield {'train.seed': 0}\n"
    )
    trials = sweep.expand(sweep.load_experiment(experiment))
    empty = next(i for i in range(8) if not sweep.shard(trials, i, 8))
    args = ["sweep", str(experiment), "--workdir", str(tmp_path / "out"), "--shard", f"{empty}/8"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"shard {empty}/8 holds none of the sweep's 1 trials" in out
    assert f"sweep done: nothing to run in shard {empty}/8" in out


@pytest.mark.slow  # subprocesses
def test_a_refused_resume_exits_2_without_aborting(tmp_path, tfds_dir):
    """The run stops in its resume check while its first programs still compile in background
    threads: the command must wait for them and exit 2 with the message, not abort."""
    workdir = tmp_path / "run"
    args = ["train", "--config", "experiments/bn_paper_mlp.py", "--workdir", str(workdir),
            "--no-progress", f"--config.data.tfds_dir={tfds_dir}",
            "--config.data.train_size=600", "--config.train.epochs=1"]  # fmt: skip
    assert _bnlab(*args).returncode == 0
    (workdir / "summary.json").unlink()  # unfinished, as if killed after its last checkpoint
    refused = _bnlab(*args, "--config.opt.lr=0.1")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "opt.lr: 0.5 -> 0.1" in refused.stderr
    assert "FATAL" not in refused.stderr and "terminate called" not in refused.stderr


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run's folder as training leaves it (config.json, checkpoint 5), saved without training
    (zero arrays of the state's shapes: nothing to compile)."""
    import functools

    import jax

    from bnlab import optim
    from bnlab.training import checkpoint, train
    from bnlab.training.writers import write_json

    cfg = config.validate(config.load_config(ROOT / "experiments/bn_paper_mlp.py"))
    model = train.build_model(cfg)
    tx, _ = optim.make_optimizer(cfg.opt, total_steps=1)
    init = functools.partial(train.init_state, model, tx)
    shapes = jax.eval_shape(init, jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    workdir = tmp_path_factory.mktemp("saved") / "run"
    workdir.mkdir()
    write_json(workdir / "config.json", cfg.to_dict())
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    ckpt.save(5, state, {"config": cfg.to_dict()})
    ckpt.close()
    return workdir


def test_export_refuses_an_existing_file_unless_forced(saved_run, tmp_path, capsys):
    out = tmp_path / "w.npz"
    out.write_text("keep me")
    args = ["export", str(saved_run), "--format", "npz", "--out", str(out)]
    assert cli.main(args) == cli.EXIT_BAD_INPUT
    assert f"{out} exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert cli.main([*args, "--force"]) == cli.EXIT_OK
    assert export.load_npz(out)[2] == 5
    default = ["export", str(saved_run), "--format", "npz"]  # WORKDIR/export.npz
    assert cli.main(default) == cli.EXIT_OK
    written = (saved_run / "export.npz").read_bytes()
    assert cli.main(default) == cli.EXIT_BAD_INPUT
    assert "export.npz exists; pass --force" in capsys.readouterr().err
    assert (saved_run / "export.npz").read_bytes() == written
    assert [p.name for p in saved_run.iterdir() if p.name.endswith(".tmp")] == []


def test_export_never_writes_over_the_runs_own_files(saved_run, capsys):
    from bnlab.training import run

    own = {p: p.read_bytes() for p in saved_run.rglob("*") if p.is_file()}
    for out in ("config.json", "checkpoints", "checkpoints/5/w.npz", "tensorboard/w.npz"):
        for force in ([], ["--force"]):
            args = ["export", str(saved_run), "--format", "npz", "--out", str(saved_run / out)]
            assert cli.main([*args, *force]) == cli.EXIT_BAD_INPUT, out
            assert "is among the run's own files" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in saved_run.rglob("*") if p.is_file()} == own
    assert run.load_checkpoint(saved_run)[1].step == 5  # the run still reads back


def test_the_same_override_twice_is_refused_naming_both(tmp_path, capsys):
    with pytest.raises(config.ConfigError, match=r"--config.opt.lr is given twice \('0.1' and"):
        cli.split_overrides(["--config.opt.lr=0.1", "--config.opt.lr", "0.2"])
    args = ["train", "--config", str(ROOT / "experiments/mnist_cnn.py")]
    args += ["--workdir", str(tmp_path / "run"), "--config.train.epochs=1"]
    assert cli.main([*args, "--config.train.epochs=2"]) == 2
    assert "given twice ('1' and '2')" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_smoke_says_which_defaults_it_uses(tmp_path, capsys):
    experiment = tmp_path / "plain.py"
    experiment.write_text(
        "from bnlab.config import default_config\nget_config = default_config\n"
        "def sweep():\n    yield {'train.seed': 0}\n    yield {'train.seed': 1}\n"
    )
    bad = "--config.opt.lr=nan"  # refused after the notes: nothing runs
    train = ["train", "--config", str(experiment), "--workdir", str(tmp_path / "r"), "--smoke"]
    assert cli.main([*train, bad]) == 2
    err = capsys.readouterr().err
    assert f"{experiment} defines no SMOKE: --smoke uses the defaults --config.data" in err
    assert (
        cli.main(["sweep", str(experiment), "--workdir", str(tmp_path / "s"), "--smoke", bad]) == 2
    )
    err = capsys.readouterr().err
    assert "defines no SMOKE" in err
    assert "sweep() takes no smoke argument: --smoke runs its whole grid (2 trials)" in err
    assert cli.main(["sweep", str(experiment), "--workdir", str(tmp_path / "s"), bad]) == 2
    assert "SMOKE" not in capsys.readouterr().err  # no --smoke, no note


def _sweep_folder(path, trials):
    (path / "runs").mkdir(parents=True)
    (path / "sweep.json").write_text("{}")
    for trial in trials:
        (path / "runs" / trial).mkdir()
        (path / "runs" / trial / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("command", [["evaluate"], ["export", "--format", "npz"]])
def test_evaluate_and_export_point_a_sweep_folder_at_its_trials(tmp_path, capsys, command):
    sweep_dir = _sweep_folder(tmp_path / "sweep", ["t-a", "t-b", "t-c", "t-d"])
    assert cli.main([command[0], str(sweep_dir), *command[1:]]) == 2
    err = capsys.readouterr().err
    assert f"{sweep_dir} is a sweep folder; pass one of its trials, {sweep_dir}/runs/<trial>" in err
    runs = sweep_dir / "runs"
    assert f"{runs / 't-a'}, {runs / 't-b'}, {runs / 't-c'} (4 in all)." in err, err
    empty = _sweep_folder(tmp_path / "empty", [])
    assert cli.main([command[0], str(empty), *command[1:]]) == 2
    assert "none has started yet" in capsys.readouterr().err


@pytest.mark.parametrize("every, best", [(500, ""), (0, "accuracy")])
def test_evaluate_before_the_first_checkpoint_says_when_it_comes(tmp_path, capsys, every, best):
    workdir = tmp_path / "run"
    workdir.mkdir()
    c = config.apply_overrides(
        config.default_config(),
        {"checkpoint.every_steps": str(every), "checkpoint.best_metric": repr(best)},
    )
    (workdir / "config.json").write_text(json.dumps(config.validate(c).to_dict()))
    for command in (["evaluate"], ["export", "--format", "npz"]):
        assert cli.main([command[0], str(workdir), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert f"{workdir} has no checkpoint yet: its run writes the first one " in err, err
        assert ("at or after step 500 (checkpoint.every_steps)" in err) == bool(every)
        assert ("at its first epoch end (checkpoint.best_metric)" in err) == bool(best)
        assert "when its training ends" in err
    (workdir / "checkpoints").mkdir()  # created by the run before its first save
    assert cli.main(["evaluate", str(workdir)]) == 2
    assert "has no checkpoint yet" in capsys.readouterr().err
