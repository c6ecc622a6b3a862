"""One linter and formatter (ruff, configured in pyproject.toml) over the whole tree."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _ruff(*args):
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    return subprocess.run([exe, *args, str(ROOT)], capture_output=True, text=True, cwd=ROOT)


def test_ruff_check():
    result = _ruff("check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format():
    result = _ruff("format", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
