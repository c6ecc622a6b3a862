"""A name -> spec table that experiment files extend, shared by the normalization and the
diagnostics registries (`bnlab.norms.NORMS`, `bnlab.diagnostics.DIAGNOSTICS`).

Its rules: registering the same piece again (an experiment file imported twice: a spec equal
to the registered one, field by field and function by function, `same_spec`) replaces it;
another piece under a taken name, or a config field that another entry (or the shared fields)
already declares, is an error that names both places. What is registered decides, not where
from: a helper function that registers whatever it is given has one origin for all its calls.
Each entry's config fields join the shared ones in one frozen dataclass: the config group it
owns.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from collections.abc import Mapping
from typing import Any, Generic, TypeVar

from bnlab.schema import ConfigError

S = TypeVar("S")  # a frozen dataclass with `fields` (name -> schema.field) and `origin`


class Registry(dict[str, S], Generic[S]):
    """`name -> spec`; `register` and `get` enforce the rules above."""

    def __init__(
        self,
        kind: str,
        key: str,
        group: str,
        shared: Mapping[str, dataclasses.Field],
        shared_owner: str,
    ):
        super().__init__()
        self.kind = kind  # "normalization"
        self.key = key  # the config field that names an entry: "model.norm"
        self.group = group  # the config group of the entries' fields: "norm"
        self.shared = dict(shared)  # fields every entry's group has...
        self.shared_owner = shared_owner  # ...and who they belong to, for messages
        self._class: type | None = None

    def register(self, name: str, spec: S) -> S:
        """Adds `spec` under `name` (see the module doc); returns it.

        Raises:
          ValueError: another piece holds `name`, or declares one of `spec`'s config fields.
        """
        # The caller's frame alone: inspect.stack() reads the source of every frame (about 30
        # ms a call, half a second of every command's start-up for the built-in entries).
        caller = sys._getframe(1)
        origin = f"{caller.f_code.co_filename}:{caller.f_lineno}"
        spec = dataclasses.replace(spec, origin=origin)
        old = self.get_spec(name)
        if old is not None and not same_spec(old, spec):
            raise ValueError(
                f"{self.kind} {name!r} is already registered (at {old.origin}) as another "
                f"{self.kind}; the one at {spec.origin} needs another name (or unregister the "
                "first)."
            )
        taken = {k: n for n, s in self.items() if n != name for k in s.fields}
        taken |= dict.fromkeys(self.shared, self.shared_owner)
        for field_name in spec.fields:
            if field_name in taken:
                raise ValueError(
                    f"{self.kind} {name!r} declares the config field {self.group}.{field_name}, "
                    f"which {taken[field_name]!r} already declares; give it another name."
                )
        self[name] = spec
        return spec

    def __setitem__(self, name: str, spec: S) -> None:
        super().__setitem__(name, spec)
        self._class = None

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._class = None

    def pop(self, name: str, *default: Any) -> Any:
        self._class = None
        return super().pop(name, *default)

    def get_spec(self, name: str) -> S | None:
        return dict.get(self, name)

    def lookup(self, name: str) -> S:
        """The spec under `name`; a `ConfigError` listing the registered names otherwise."""
        if name not in self:
            raise ConfigError(
                f"{self.key}={name!r} is not one of {sorted(self)} (the registered {self.kind}s; "
                f"an experiment file may register its own)."
            )
        return self[name]

    def config_class(self, class_name: str) -> type:
        """The frozen dataclass of the entries' config group: the shared fields, then each
        entry's own (rebuilt after a registration)."""
        if self._class is None:
            groups = [self.shared, *(s.fields for s in self.values())]
            fields = [
                (key, f.metadata.get("type") or _type_of(f.default), _fresh(f))
                for group in groups
                for key, f in group.items()
            ]
            self._class = dataclasses.make_dataclass(class_name, fields, frozen=True)
        return self._class


def _type_of(default: Any) -> type:
    return tuple if isinstance(default, tuple) else type(default)


def _fresh(f: dataclasses.Field) -> dataclasses.Field:
    # A Field object belongs to one class only: every rebuild gets new ones.
    return dataclasses.field(default=f.default, metadata=f.metadata)


def same_spec(a: Any, b: Any) -> bool:
    """Whether two specs register the same piece: equal fields (`origin` aside), and functions
    of the same code with the same defaults and closures, so that an experiment file executed
    twice (new function objects) gives equal specs, and two calls of one helper with other
    functions or values do not."""
    return _same(a, b, set())


def _same(a: Any, b: Any, seen: set[tuple[int, int]]) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if (id(a), id(b)) in seen:  # a cycle (a recursive closure): equal so far
        return True
    seen.add((id(a), id(b)))
    return _same_parts(a, b, seen)


def _same_parts(a: Any, b: Any, seen: set[tuple[int, int]]) -> bool:
    same = lambda x, y: _same(x, y, seen)  # noqa: E731
    if isinstance(a, types.FunctionType):
        parts = lambda f: (  # noqa: E731
            f.__defaults__,
            f.__kwdefaults__,
            tuple(_contents(c) for c in f.__closure__ or ()),
        )
        return a.__code__ == b.__code__ and same(parts(a), parts(b))
    if isinstance(a, types.MethodType):
        return same(a.__func__, b.__func__) and same(a.__self__, b.__self__)
    if isinstance(a, functools.partial):
        return same((a.func, a.args, a.keywords), (b.func, b.args, b.keywords))
    if isinstance(a, type):  # a class of an experiment file executed again
        methods = lambda c: {k: v for k, v in vars(c).items() if callable(v)}  # noqa: E731
        names = lambda c: (c.__module__, c.__qualname__)  # noqa: E731
        return names(a) == names(b) and same(methods(a), methods(b))
    if isinstance(a, dataclasses.Field):
        keys = ("default", "default_factory", "metadata", "init", "compare", "kw_only")
        return all(same(getattr(a, k), getattr(b, k)) for k in keys)
    if dataclasses.is_dataclass(a):
        keys = [f.name for f in dataclasses.fields(a) if f.name != "origin"]
        return all(same(getattr(a, k), getattr(b, k)) for k in keys)
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(same, a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an object without a truth value of ==: not the same
        return False


_EMPTY = object()  # the contents of a closure cell not yet assigned


def _contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY
