"""Configs: dotted overrides keep types; bad values fail with the reason, before any compile."""

import re
import subprocess
import sys

import pytest

from bnlab import config


def test_overrides_parse_and_keep_types():
    c = config.apply_overrides(
        config.default_config(),
        {"opt.lr": "1", "model.norm": "none", "opt.boundaries": "(0.3, 0.6)", "train.epochs": "3"},
    )
    assert c.opt.lr == 1.0 and isinstance(c.opt.lr, float)
    assert c.model.norm == "none" and c.train.epochs == 3 and c.opt.boundaries == (0.3, 0.6)
    assert config.default_config().opt.lr != 1.0  # the base is not modified


def test_placeholder_string_field_accepts_a_path(monkeypatch):
    monkeypatch.delenv(config.MNIST_DIR_ENV, raising=False)
    c = config.apply_overrides(config.default_config(), {"data.mnist_dir": "/some/dir"})
    assert config.validate(c).data.mnist_dir == "/some/dir"
    assert config.validate(config.default_config()).data.mnist_dir is None


def test_env_var_is_the_default_mnist_dir(monkeypatch):
    monkeypatch.setenv(config.MNIST_DIR_ENV, "/from/env")
    assert config.validate(config.default_config()).data.mnist_dir == "/from/env"


def test_unknown_key_lists_known_fields():
    with pytest.raises(config.ConfigError, match="no field 'lrr'.*'lr'"):
        config.apply_overrides(config.default_config(), {"opt.lrr": "0.1"})
    with pytest.raises(config.ConfigError, match="no field 'optim'"):
        config.apply_overrides(config.default_config(), {"optim.lr": "0.1"})


def test_wrong_type_says_expected_type():
    with pytest.raises(config.ConfigError, match="expected a value of type float"):
        config.apply_overrides(config.default_config(), {"opt.lr": "fast"})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("opt.lr", "-0.1", "opt.lr=-0.1 must be finite and > 0"),
        ("opt.lr", "0", "opt.lr=0.0 must be finite and > 0"),
        ("train.batch_size", "0", "train.batch_size=0 must be finite and > 0"),
        ("train.epochs", "-1", "train.epochs=-1 must be finite and > 0"),
        ("model.norm", "switchnorm", "model.norm='switchnorm' is not one of"),
        ("opt.name", "lion", "opt.name='lion' is not one of"),
        ("norm.momentum", "1.5", "norm.momentum=1.5 must lie in"),
        ("data.task", "cifar", "data.task='cifar'"),
        ("opt.momentum", "1.5", "opt.momentum=1.5 must lie in [0, 1)"),
        ("opt.b2", "-0.1", "opt.b2=-0.1 must lie in [0, 1)"),
        ("opt.decay_rate", "-1", "opt.decay_rate=-1.0 must be finite and > 0"),
        ("opt.lr", "1e400", "opt.lr=inf must be finite"),
        ("opt.warmup_steps", "-5", "opt.warmup_steps=-5 must be >= 0"),
        ("checkpoint.every_steps", "-1", "checkpoint.every_steps=-1 must be >= 0"),
        ("checkpoint.keep", "0", "checkpoint.keep=0 must be >= 1"),
        ("checkpoint.best_metric", "acc", "checkpoint.best_metric='acc' is not one of"),
    ],
)
def test_validate_rejects_bad_values(key, value, message):
    c = config.apply_overrides(config.default_config(), {key: value})
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.validate(c)


def test_validate_lists_every_problem():
    c = config.apply_overrides(config.default_config(), {"opt.lr": "-1", "train.epochs": "0"})
    with pytest.raises(config.ConfigError) as err:
        config.validate(c)
    assert "opt.lr" in str(err.value) and "train.epochs" in str(err.value)


def test_experiment_files_load_and_validate():
    from conftest import ROOT

    for path in sorted((ROOT / "experiments").glob("*.py")):
        cfg = config.validate(config.load_config(path))
        assert cfg.train.epochs > 0, path


def test_missing_config_file_and_get_config(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load_config(tmp_path / "nope.py")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(config.ConfigError, match="get_config"):
        config.load_config(empty)


def test_bool_is_not_an_int():
    with pytest.raises(config.ConfigError, match="got a bool"):
        config.apply_overrides(config.default_config(), {"train.epochs": "true"})


def test_broken_experiment_files_give_config_errors(tmp_path):
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def get_config(:\n")
    with pytest.raises(config.ConfigError, match="failed to load: SyntaxError"):
        config.load_config(syntax)
    raising = tmp_path / "raising.py"
    raising.write_text("def get_config():\n    raise KeyError('x')\n")
    with pytest.raises(config.ConfigError, match=r"get_config\(\) raised KeyError"):
        config.load_config(raising)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "+Infinity"])
def test_a_non_finite_override_says_the_field_must_be_finite(text):
    with pytest.raises(config.ConfigError) as err:
        config.apply_overrides(config.default_config(), {"opt.lr": text})
    message = str(err.value)
    assert "opt.lr (peak learning rate) must be a finite number" in message, message
    assert "--config.opt.lr=0.05" in message and "got str" not in message


def test_a_non_finite_value_from_a_config_file_is_refused_by_every_float_field():
    c = config.default_config()
    c.opt.weight_decay = float("inf")  # `must be >= 0` alone would let it through
    c.model.dropout = float("nan")
    with pytest.raises(config.ConfigError) as err:
        config.validate(c)
    assert "opt.weight_decay=inf must be a finite number" in str(err.value)
    assert "model.dropout=nan must be a finite number" in str(err.value)


@pytest.mark.parametrize(
    "key, text, fix",
    [
        ("opt.lr", '"1e-3"', "drop the quotes, --config.opt.lr=1e-3"),
        ("train.epochs", "'3'", "drop the quotes, --config.train.epochs=3"),
        ("parallel.num_processes", '"2"', "drop the quotes, --config.parallel.num_processes=2"),
    ],
)
def test_a_quoted_number_says_to_drop_the_quotes(key, text, fix):
    with pytest.raises(config.ConfigError, match=re.escape(fix)):
        config.apply_overrides(config.default_config(), {key: text})


def test_a_quoted_string_field_keeps_its_quotes_off():
    c = config.apply_overrides(config.default_config(), {"model.norm": '"none"'})
    assert c.model.norm == "none"


@pytest.mark.parametrize("text", ["yes", "1", "on"])
def test_a_bool_field_says_to_write_true_or_false(text):
    key = "norm.allow_single_value"
    with pytest.raises(config.ConfigError) as err:
        config.apply_overrides(config.default_config(), {key: text})
    assert f"write --config.{key}=true or --config.{key}=false" in str(err.value)
    c = config.apply_overrides(config.default_config(), {key: "True"})
    assert c.norm.allow_single_value is True


def test_a_folder_as_config_file_lists_its_experiment_files(tmp_path):
    for name in ("b.py", "a.py", "_helper.py", "notes.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(config.ConfigError) as err:
        config.load_module(tmp_path)
    message = str(err.value)
    assert f"{str(tmp_path)!r} is a folder" in message
    assert f"({tmp_path / 'a.py'}, {tmp_path / 'b.py'})" in message, message


def test_smoke_note_names_the_defaults_only_without_smoke(tmp_path):
    plain = tmp_path / "plain.py"
    plain.write_text("from bnlab.config import default_config\nget_config = default_config\n")
    note = config.smoke_note(config.load_module(plain), plain)
    shown = " ".join(f"--config.{k}={v}" for k, v in config.DEFAULT_SMOKE.items())
    assert note.startswith(f"{plain} defines no SMOKE: --smoke uses the defaults {shown}"), note
    own = tmp_path / "own.py"
    own.write_text(plain.read_text() + "SMOKE = {'train.epochs': 1}\n")
    assert config.smoke_note(config.load_module(own), own) is None


@pytest.mark.slow  # a fresh process: the test session has JAX loaded
def test_a_config_validates_without_jax_or_flax():
    code = (
        "import sys; from bnlab import config\n"
        "config.validate(config.apply_overrides(config.default_config(), {'opt.lr': '0.1'}))\n"
        "print([m for m in ('jax', 'flax', 'optax') if m in sys.modules])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_the_light_declarations_name_what_the_code_has():
    """The `model` group and norm.convention/backward name their choices without importing
    Flax or JAX; the tables they name are the ones the code builds from."""
    from bnlab import ops
    from bnlab.nn import model_config, models, norms

    assert tuple(models.MODELS) == model_config.MODEL_NAMES
    assert tuple(models.ACTIVATIONS) == model_config.ACTIVATION_NAMES
    assert tuple(models.INITS) == model_config.INIT_NAMES
    assert model_config.NORM_WIDTHS["mlp"] == models.MLP.hidden
    fields = norms.NORMS.shared
    assert fields["convention"].metadata["choices"] == ops.CONVENTIONS
    assert fields["backward"].metadata["choices"] == ops.BACKWARDS
