"""Data folders: absolute in every config, relative ones found from a notebook's folder too, and
where a trained run's evaluation reads MNIST now."""

import os

import pytest
from conftest import MNIST_DIR, ROOT

from bnlab import config


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
