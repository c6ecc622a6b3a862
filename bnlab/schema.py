"""Config fields stated once: default, type, meaning and check, on a frozen dataclass field.

A config group is a frozen dataclass whose fields are declared with `field(default, doc, ...)`.
Its `ml_collections.ConfigDict` (what experiment files edit), its validation and the CLI
reference are all derived from those declarations. Standard library only: every module that
owns config fields imports this one, and it imports none of them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


# A check returns the requirement that a value fails ("must be >= 0"), or None when it passes.
Check = Callable[[Any], str | None]


def field(
    default: Any,
    doc: str,
    *,
    check: Check | None = None,
    choices: Mapping | tuple | str | Callable[[], Any] | None = None,
) -> Any:
    """A config field: its default, a one-line meaning, and how it is checked.

    `choices` is a table whose keys (or items) are the allowed values; a `"module:NAME"` string
    or a callable gives it lazily (a registry that grows after this module is imported).
    """
    return dataclasses.field(
        default=default, metadata={"doc": doc, "check": check, "choices": choices}
    )


def doc(f: dataclasses.Field) -> str:
    return f.metadata.get("doc", "")


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The allowed values of a field, resolved now (None: any value of its type)."""
    table = f.metadata.get("choices")
    if table is None:
        return None
    if isinstance(table, str):
        module, _, name = table.partition(":")
        table = getattr(importlib.import_module(module), name)
    elif callable(table):
        table = table()
    return tuple(table)


# Checks shared by many fields; each returns the requirement a value fails.
def positive(v) -> str | None:
    return None if v > 0 and math.isfinite(v) else "must be finite and > 0"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def unit_interval(v) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must lie in [0, 1]"


def unit_interval_open(v) -> str | None:
    return None if 0.0 <= v < 1.0 else "must lie in [0, 1)"


def at_least(low: float, why: str = "") -> Check:
    text = f"must be >= {low}" + (f" ({why})" if why else "")
    return lambda v: None if v >= low else text


def _value_text(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def field_problems(prefix: str, group: Any) -> list[str]:
    """Every field of a group instance that fails its choices or its check, as messages."""
    problems = []
    for f in dataclasses.fields(group):
        value = getattr(group, f.name)
        allowed = choices_of(f)
        if allowed is not None and value not in allowed:
            shown = sorted(allowed, key=str)
            problems.append(f"{prefix}.{f.name}={value!r} is not one of {shown}")
            continue
        check = f.metadata.get("check")
        requirement = check(value) if check is not None else None
        if (
            isinstance(value, float)
            and not math.isfinite(value)
            and "finite" not in str(requirement)
        ):
            requirement = "must be a finite number"
        if requirement:
            problems.append(f"{prefix}.{f.name}={_value_text(value)} {requirement}")
    return problems


def defaults(cls: type) -> dict[str, Any]:
    """`{name: default}` of a group's fields, in declaration order."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def coerce(value: Any, annotation: Any) -> tuple[Any, str | None]:
    """`value` as the annotated type (int -> float, list -> tuple), or a reason it is not one."""
    options = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    if value is None:
        return (None, None) if type(None) in options else (value, "must not be None")
    for option in options:
        if option is type(None):
            continue
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value), None
        if origin is tuple and isinstance(value, list | tuple):
            return tuple(value), None
        if origin is bool and isinstance(value, bool):
            return value, None
        if origin in (int, str) and isinstance(value, origin) and not isinstance(value, bool):
            return value, None
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    return value, f"expected {names}, got {type(value).__name__} ({value!r})"


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def parse_value(text: str) -> Any:
    """`"0.1" -> 0.1`, `"(1, 2)" -> (1, 2)`, `"None" -> None`, `"true" -> True`, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


OVERRIDE_PREFIX = "--config."  # a dotted override on the command line


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Separates `--config.a.b=value` (or `--config.a.b value`) from the other arguments; the
    same key twice is refused, naming both values."""
    rest, overrides, i = [], {}, 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE_PREFIX):
            key, eq, value = arg[len(OVERRIDE_PREFIX) :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
                value, i = argv[i + 1], i + 1
            if key in overrides:
                raise ConfigError(
                    f"--config.{key} is given twice ({overrides[key]!r} and {value!r}); give it "
                    "once, with the value you mean."
                )
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides
