"""Data folders: absolute in every config, relative ones found from a notebook's folder too, and
where a trained run's evaluation reads MNIST now. Workdirs: new, empty, or a bnlab run's."""

import json
import os

import pytest
from conftest import MNIST_DIR, ROOT

from bnlab import cli, config
from bnlab.training import run


def _validated(**overrides):
    return config.validate(config.apply_overrides(config.default_config(), overrides))


def test_the_readmes_relative_mnist_dir_works_from_the_notebooks_folder(monkeypatch):
    relative = os.path.relpath(MNIST_DIR, ROOT)  # e.g. ../shared/data/mnist, as in README.md
    monkeypatch.setenv(config.MNIST_DIR_ENV, relative)
    for folder in (ROOT, ROOT / "notebooks"):
        monkeypatch.chdir(folder)
        assert config.validate(config.default_config()).data.mnist_dir == str(MNIST_DIR)


def test_a_relative_folder_is_taken_from_the_working_folder_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notebooks").mkdir()  # also a folder of the checkout's root
    cfg = _validated(**{"data.mnist_dir": "notebooks", "data.tfds_dir": "tfds"})
    assert cfg.data.mnist_dir == str(tmp_path / "notebooks")
    assert cfg.data.tfds_dir == str(tmp_path / "tfds")  # found nowhere: the working folder's


def test_absolute_home_and_unset_folders(monkeypatch):
    monkeypatch.delenv(config.MNIST_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = _validated(**{"data.mnist_dir": "~/mnist", "data.tfds_dir": "/data/../data/tfds"})
    assert (cfg.data.mnist_dir, cfg.data.tfds_dir) == ("/home/someone/mnist", "/data/tfds")
    cfg = _validated(**{"data.tfds_dir": "''"})
    assert (cfg.data.mnist_dir, cfg.data.tfds_dir) == (None, "")  # TFDS's defaults stay


def test_config_json_round_trips_to_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _validated(**{"data.mnist_dir": "mnist"})
    monkeypatch.chdir(ROOT)  # read back elsewhere: the path it names does not move
    assert config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "env, given, expected",
    [
        (None, {}, "/trained/here"),  # the run's own folder
        ("/from/env", {}, "/from/env"),  # $BNLAB_MNIST_DIR before it
        ("/from/env", {"mnist_dir": "/given"}, "/given"),  # the flag before both
    ],
)
def test_where_a_trained_run_reads_mnist_now(monkeypatch, env, given, expected):
    monkeypatch.delenv(config.MNIST_DIR_ENV, raising=False)
    trained = _validated(**{"data.mnist_dir": "/trained/here", "data.tfds_dir": "/tfds"}).data
    if env:
        monkeypatch.setenv(config.MNIST_DIR_ENV, env)
    data = config.data_now(trained, **given)
    assert data.mnist_dir == expected and data.tfds_dir == "/tfds"
    assert config.data_now(trained, tfds_dir="/elsewhere").tfds_dir == "/elsewhere"


# --- workdirs: new, empty, or a bnlab run's; anything else exits 2 with nothing written -------

MLP = str(ROOT / "experiments" / "bn_paper_mlp.py")
SWEEP = "from bnlab.config import default_config as get_config\n\n\ndef sweep():\n    yield {}\n"


def _train(workdir, mnist_dir):
    """`bnlab train` that would fail on its data (`mnist_dir` is empty) once past the workdir."""
    return cli.main(
        ["train", "--config", MLP, "--workdir", workdir, f"--config.data.mnist_dir={mnist_dir}"]
    )


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_an_empty_workdir_is_refused_not_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "no-mnist").mkdir()
    experiment = tmp_path / "exp.py"
    experiment.write_text(SWEEP)
    before = _listing(tmp_path)
    assert _train("", tmp_path / "no-mnist") == cli.EXIT_BAD_INPUT
    assert "--workdir is empty; pass a folder path" in capsys.readouterr().err
    assert cli.main(["sweep", str(experiment), "--workdir", " "]) == cli.EXIT_BAD_INPUT
    assert "--workdir is empty" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_a_folder_of_other_files_is_no_workdir(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (tmp_path / "no-mnist").mkdir()
    monkeypatch.chdir(mine)
    before = _listing(mine)
    assert _train(".", tmp_path / "no-mnist") == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "holds files that are not a bnlab run's (data, notes.txt)" in err
    assert len(err.strip().splitlines()) == 1
    experiment = tmp_path / "exp.py"
    experiment.write_text(SWEEP)
    assert cli.main(["sweep", str(experiment), "--workdir", "."]) == cli.EXIT_BAD_INPUT
    assert "holds files that are not a bnlab sweep's (data, notes.txt)" in capsys.readouterr().err
    assert _listing(mine) == before


def test_an_unrelated_config_json_is_no_run(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"x": 1}')
    (tmp_path / "no-mnist").mkdir()
    assert _train(str(other), tmp_path / "no-mnist") == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "config.json is not a bnlab run's config (unknown groups 'x')" in err
    assert _listing(other) == ["config.json"]  # no checkpoints/ left behind


def test_a_truncated_config_json_is_one_message_for_evaluate_and_train(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = json.dumps(config.validate(config.default_config()).to_dict())
    (run_dir / "config.json").write_text(text[: len(text) // 2])
    (tmp_path / "no-mnist").mkdir()
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert cli.main(["evaluate", str(run_dir)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{run_dir / 'config.json'} is damaged" in err and "move it away" in err
    assert len(err.strip().splitlines()) == 1
    assert _train(str(run_dir), tmp_path / "no-mnist") == cli.EXIT_BAD_INPUT
    assert f"{run_dir / 'config.json'} is damaged" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_the_writability_probe_leaves_another_hosts_probe_alone(tmp_path):
    """Processes of two hosts share the workdir and may have the same process id."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    theirs = run_dir / f".write_test.{os.getpid()}"
    theirs.write_text("another host's probe")
    assert run.prepare_workdir(run_dir) == run_dir
    assert theirs.read_text() == "another host's probe"
    assert sorted(p.name for p in run_dir.iterdir()) == [theirs.name]
