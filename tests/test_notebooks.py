"""Every notebook runs top to bottom in a fresh kernel under BNLAB_SMOKE=1 (small sizes), after
the same first cell, which installs bnlab where the kernel lacks it."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # each notebook runs in a fresh kernel process

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 240
NOTEBOOK_TIMEOUT_S = 300  # on a busy 2-core CPU; each notebook takes well under a minute alone


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {
        "quickstart.ipynb",
        "functional_bn.ipynb",
        "ablation.ipynb",
        "multi_device.ipynb",
    }


def _install_cell(path) -> str:
    return next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


def test_every_notebook_starts_with_the_same_install_cell():
    cells = {path.name: _install_cell(path) for path in NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the first code cells differ: keep them identical"
    assert '\nBNLAB_SOURCE = ""\n' in cells["quickstart.ipynb"]  # unset in the repository


# Runs the install cell in IPython as a kernel would, with bnlab hidden until the cell has
# "installed" it, and pip replaced by a stub that prints its arguments and exits PIP_STATUS.
DRIVER = """
import importlib.util, subprocess, sys
real_find_spec, pip_calls = importlib.util.find_spec, []
importlib.util.find_spec = lambda name, *a: (
    None if name == "bnlab" and not pip_calls else real_find_spec(name, *a)
)


def pip(command, **kwargs):
    pip_calls.append(command)
    print("pip", command[3:])  # after `python -m pip`
    error = "ERROR: No matching distribution found for bnlab" if PIP_STATUS else ""
    return subprocess.CompletedProcess(command, PIP_STATUS, "", "a warning\\n" + error)


subprocess.run = pip
from IPython.core.interactiveshell import InteractiveShell

if InteractiveShell.instance().run_cell(sys.stdin.read()).success:
    import bnlab

    print("bnlab from", bnlab.__file__)
"""


def _run_install_cell(tmp_path, cwd, source="", pip_status=0) -> list[str]:
    cell = _install_cell(NOTEBOOKS[0]).replace('BNLAB_SOURCE = ""', f"BNLAB_SOURCE = {source!r}")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.replace("PIP_STATUS", str(pip_status)))
    result = subprocess.run(
        [sys.executable, str(driver)],
        input=cell,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},  # bnlab from this checkout only via the cell
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def test_install_cell_without_bnlab_or_a_source_says_what_to_set(tmp_path):
    lines = _run_install_cell(tmp_path, cwd=tmp_path)  # no checkout above tmp_path
    assert len(lines) == 1, lines  # one line, no traceback
    assert (
        lines[0].startswith("BnlabSetupError: bnlab is not installed")
        and "BNLAB_SOURCE" in lines[0]
    )


def test_install_cell_installs_the_checkout_that_holds_the_notebook(tmp_path):
    lines = _run_install_cell(tmp_path, cwd=ROOT / "notebooks")
    constraints = str(ROOT / "constraints.txt")
    assert lines == [
        f"pip ['install', '-q', '-c', '{constraints}', '-e', '{ROOT}']",
        f"bnlab from {ROOT / 'bnlab' / '__init__.py'}",  # importable at once, from the checkout
    ]


def test_install_cell_installs_bnlab_source(tmp_path):
    source = "git+https://example.org/bnlab.git"
    assert _run_install_cell(tmp_path, cwd=tmp_path, source=source)[0] == (
        f"pip ['install', '-q', '{source}']"
    )
    lines = _run_install_cell(tmp_path, cwd=tmp_path, source=source, pip_status=1)
    assert lines[1:] == [
        f"BnlabSetupError: pip install {source} failed: "
        "ERROR: No matching distribution found for bnlab"
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch, tfds_dir):
    # The kernel inherits this environment: this checkout first on the path, small sizes, the
    # session's prepared TFDS folder and MNIST files (conftest), a scratch working folder.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("BNLAB_SMOKE", "1")
    monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )

    def too_slow(signum, frame):
        raise TimeoutError(f"{path.name} ran longer than {NOTEBOOK_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(NOTEBOOK_TIMEOUT_S)
    try:
        client.execute()  # raises CellExecutionError, with the failing cell, when a cell fails
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
