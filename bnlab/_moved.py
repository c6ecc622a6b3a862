"""The paths of modules that moved into subpackages: importable for one more release, with a
`DeprecationWarning` that names the new path.

`import bnlab` installs a finder for the old names; importing one (or reading a name from it)
warns and gives the module at its new path. Nothing inside bnlab imports an old path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# old path -> new path; removed in the release after 0.2.
MOVED = {
    "bnlab.bn_core": "bnlab.ops.bn_core",
    "bnlab.bn_variants": "bnlab.ops.bn_variants",
    "bnlab.example_norms": "bnlab.ops.example_norms",
    "bnlab.idx": "bnlab.data.idx",
    "bnlab.tfds_mnist": "bnlab.data.tfds_mnist",
    "bnlab.mnist_arrays": "bnlab.data.mnist_arrays",
    "bnlab.nnx_models": "bnlab.nn.nnx_models",
    "bnlab.nnx_state": "bnlab.nn.nnx_state",
    **{
        f"bnlab.{name}": f"bnlab.training.{name}"
        for name in (
            "train",
            "loop",
            "run",
            "batched",
            "records",
            "checkpoint",
            "parallel",
            "compile_cache",
            "progress",
            "writers",
        )
    },  # fmt: skip
    **{
        f"bnlab.{name}": f"bnlab.studies.{name}"
        for name in ("sweep", "report", "plots", "diag_plots")
    },
}


def _warn(old: str, new: str) -> None:
    # Attributed to the first frame outside this file: the one that imported or read the name
    # (`warnings` itself passes over the import machinery's frames when it counts).
    frame, level = sys._getframe(1), 2
    while frame is not None and (
        frame.f_code.co_filename == __file__
        or frame.f_code.co_filename.startswith("<frozen importlib")
    ):
        level += frame.f_code.co_filename == __file__
        frame = frame.f_back
    warnings.warn(
        f"{old} moved to {new}; import it from there ({old} goes in the next release)",
        DeprecationWarning,
        stacklevel=level,
    )


class _OldPath(types.ModuleType):
    """The old path of a moved module: every name read from it warns and comes from the new one."""

    def __init__(self, old: str, new: str):
        super().__init__(old, f"Moved to {new}.")
        self.__dict__["_new"] = new

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        new = self.__dict__["_new"]
        _warn(self.__name__, new)
        return getattr(importlib.import_module(new), name)

    def __dir__(self):
        return dir(importlib.import_module(self.__dict__["_new"]))


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return _OldPath(spec.name, MOVED[spec.name])

    def exec_module(self, module):
        _warn(module.__name__, MOVED[module.__name__])
        importlib.import_module(MOVED[module.__name__])


def install() -> None:
    """Makes the old paths importable (once per process)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
