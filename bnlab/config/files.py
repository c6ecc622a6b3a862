"""Experiment files and dotted overrides: loading a Python config file, its smoke variant, and
`--config.G.F=V` applied to the `ConfigDict`."""

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import ml_collections

from bnlab.schema import ConfigError, parse_value


def load_module(path: str | os.PathLike):
    """Imports an experiment file as a module; any error in it becomes a `ConfigError`."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.py") if not p.name.startswith("_"))
        listed = ", ".join(str(path / name) for name in found) or "none"
        raise ConfigError(
            f"--config {str(path)!r} is a folder; pass one experiment file in it ({listed})."
        )
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass e.g. experiments/mnist_cnn.py"
        )
    spec = importlib.util.spec_from_file_location(f"bnlab_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        message = f"config file {path} failed to load: {type(err).__name__}: {err}"
        raise ConfigError(message) from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(); an experiment file must define one.")
    return module


# A quick check of any experiment: few examples, one epoch (an experiment's SMOKE overrides).
DEFAULT_SMOKE = {"data.train_size": 1200, "train.epochs": 1}


def smoke_overrides(module) -> dict[str, str]:
    """The experiment's `SMOKE` overrides (or `DEFAULT_SMOKE`) as command-line texts."""
    smoke = getattr(module, "SMOKE", DEFAULT_SMOKE)
    return {k: v if isinstance(v, str) else repr(v) for k, v in smoke.items()}


def smoke_note(module, path: str | os.PathLike) -> str | None:
    """What `--smoke` uses for an experiment without `SMOKE` (None when it has its own)."""
    if hasattr(module, "SMOKE"):
        return None
    shown = " ".join(f"--config.{k}={v}" for k, v in smoke_overrides(module).items())
    return (
        f"{path} defines no SMOKE: --smoke uses the defaults {shown} (define SMOKE, a dict of "
        "overrides, in it to choose others)"
    )


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Imports an experiment file and returns its `get_config()`."""
    module = load_module(path)
    return config_of(module, path)


def config_of(module, path: str | os.PathLike = "experiment") -> ml_collections.ConfigDict:
    """An experiment module's `get_config()`, with its errors as `ConfigError`."""
    try:
        return module.get_config()
    except Exception as err:
        raise ConfigError(f"{path}: get_config() raised {type(err).__name__}: {err}") from err


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: dict[str, str]
) -> ml_collections.ConfigDict:
    """Sets dotted keys (`"opt.lr" -> "0.1"`) on a copy of `cfg`, parsing values as literals."""
    cfg = copy.deepcopy(cfg)
    for key, text in overrides.items():
        parent, leaf = _resolve(cfg, key)
        old = parent[leaf]
        value = _parsed(key, text, parent.get_type(leaf), old)
        if isinstance(value, bool) and not isinstance(old, bool) and old is not None:
            raise ConfigError(f"--config.{key}={text}: expected {type(old).__name__}, got a bool.")
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            parent[leaf] = value
        except TypeError as err:
            raise ConfigError(
                f"--config.{key}={text}: expected a value of type {type(old).__name__}, "
                f"got {type(value).__name__} ({value!r})."
            ) from err
    return cfg


def _parsed(key: str, text: str, kind: type, old: Any) -> Any:
    """`text` as a value of the field `key` of type `kind`, or a `ConfigError` that says how
    to write one."""
    value = parse_value(text)
    flag = f"--config.{key}"
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(
            f"{flag}={text}: {key} is true or false; write {flag}=true or {flag}=false."
        )
    if kind not in (int, float) or isinstance(value, bool):
        return value
    unquoted = text.strip()[1:-1] if text.strip()[:1] in "'\"" and len(text.strip()) > 1 else None
    if isinstance(value, str) and unquoted is not None and _is_number(unquoted):
        raise ConfigError(
            f"{flag}={text}: drop the quotes, {flag}={unquoted}; quoted, the value is a string "
            f"and {key} is a number."
        )
    word = value.strip().lower().lstrip("+-") if isinstance(value, str) else ""
    if word in ("nan", "inf", "infinity"):  # (too large a number, 1e400, is inf: validated)
        from bnlab.config.spec import describe

        meaning = next((f" ({doc})" for name, _, doc in describe() if name == key), "")
        example = f", e.g. {flag}={old}" if old is not None else ""
        raise ConfigError(f"{flag}={text}: {key}{meaning} must be a finite number{example}.")
    return value


def _is_number(text: str) -> bool:
    value = parse_value(text)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _resolve(cfg, key):
    parts = key.split(".")
    node = cfg
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(
                f"unknown config key {key!r}: {where} has no field {part!r}. Known fields: {known}."
            )
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]
