"""The package's layout: imports point down (the rule in `bnlab.layout`), no circles, no module
over 400 lines, every subpackage says what it may import, and the public paths keep working."""

import importlib
import re
import shutil
import subprocess
import sys
import warnings

import pytest
from conftest import ROOT

import bnlab
from bnlab import _moved, layout

PUBLIC = ("norm", "norms", "layers", "models", "nnx", "diagnostics", "config", "results", "export")


def test_every_import_points_down_and_none_circles():
    assert layout.problems() == []


def test_an_upward_import_is_found(tmp_path):
    root = tmp_path / "bnlab"
    shutil.copytree(layout.PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    layers = root / "nn" / "layers.py"
    layers.write_text(layers.read_text() + "\n\ndef _up():\n    from bnlab.training import run\n")
    found = layout.problems(root)
    assert len(found) >= 1 and found[0].startswith("bnlab.nn.layers (layer"), found
    assert "imports bnlab.training.run" in found[0]
    assert any(p.startswith("import circle: ") for p in found)  # run imports the layers back


def test_a_sideways_import_between_siblings_is_found(tmp_path):
    root = tmp_path / "bnlab"
    shutil.copytree(layout.PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "optim.py").write_text(
        (root / "optim.py").read_text() + "\nfrom bnlab import diagnostics\n"
    )
    assert any(
        "bnlab.optim (layer" in p and "imports bnlab.diagnostics" in p
        for p in layout.problems(root)
    )


def test_every_module_has_a_layer_and_at_most_400_lines():
    for name, path in layout.modules().items():
        layout.rank(name)
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path} has {lines} lines: split it by responsibility"
    with pytest.raises(ValueError, match="no layer"):
        layout.rank("elsewhere.module")


def test_each_subpackage_says_what_it_holds_and_may_import():
    for init in layout.PACKAGE.glob("*/__init__.py"):
        doc = importlib.import_module(f"bnlab.{init.parent.name}").__doc__
        assert doc and "May import" in doc, f"{init}: its docstring says what it may import"


def test_the_public_paths_import_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modules = {name: importlib.import_module(f"bnlab.{name}") for name in PUBLIC}
    assert modules["norm"] is importlib.import_module("bnlab.ops")
    assert modules["norms"] is importlib.import_module("bnlab.nn.norms")
    assert modules["nnx"].BatchNorm is importlib.import_module("bnlab.nn.nnx_bn").BatchNorm
    assert (
        modules["results"].load_sweep is importlib.import_module("bnlab.studies.results").load_sweep
    )
    assert bnlab.batch_norm is modules["norm"].batch_norm
    assert set(bnlab.__all__) <= set(dir(bnlab))


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_a_moved_path_warns_naming_the_new_one_and_gives_its_names(old):
    new = importlib.import_module(_moved.MOVED[old])
    name = next(n for n in sorted(vars(new)) if not n.startswith("_"))
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} moved to {new.__name__}")):
        module = importlib.import_module(old)
        assert getattr(module, name) is getattr(new, name)


def test_the_names_users_import_today_still_work():
    with pytest.warns(DeprecationWarning):
        from bnlab.parallel import AXIS
        from bnlab.run import run
        from bnlab.train import TrainState
    from bnlab.training import parallel, step
    from bnlab.training import run as run_lib

    assert (AXIS, run, TrainState) == (parallel.AXIS, run_lib.run, step.TrainState)


def test_an_old_path_warns_in_a_fresh_process_at_the_users_line():
    code = "import warnings; warnings.simplefilter('default')\nimport bnlab.checkpoint\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (
        "<string>:2: DeprecationWarning: bnlab.checkpoint moved to bnlab.training.checkpoint"
        in out.stderr
    )


def test_docs_notebooks_experiments_and_tests_use_the_new_paths():
    old = re.compile(
        r"(?<![\w.])bnlab\.(" + "|".join(m.split(".")[1] for m in _moved.MOVED) + r")\b(?!\.py)"
        r"|from bnlab import [^\n]*\b(" + "|".join(m.split(".")[1] for m in _moved.MOVED) + r")\b"
    )
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("notebooks/*.ipynb")]
    files += [
        *ROOT.glob("experiments/*.py"),
        *ROOT.glob("benchmarks/*.py"),
        *ROOT.glob("tests/*.py"),
    ]
    files += [p for p in layout.PACKAGE.rglob("*.py") if p.name not in ("_moved.py", "__init__.py")]
    stale = [
        f"{f.relative_to(ROOT)}:{i}"
        for f in files
        if f.name != "test_layout.py"
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if old.search(line)
    ]
    assert stale == []
