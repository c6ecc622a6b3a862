"""Every notebook runs top to bottom in a fresh kernel under BNLAB_SMOKE=1 (small sizes)."""

import os
import signal

import pytest
from conftest import ROOT

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
