"""Writes docs/cli.md from the `bnlab` parser itself: `python docs/gen_cli.py` (tests check it)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from unittest import mock

from bnlab import cli

OUTPUT = Path(__file__).resolve().parent / "cli.md"
WIDTH = "100"  # argparse wraps help text to $COLUMNS; fixed so the file is the same everywhere

HEADER = """# CLI reference

Generated from the parser by `python docs/gen_cli.py`; `tests/test_docs.py` fails when this
file and the CLI disagree. Every command also takes `--config.GROUP.FIELD=VALUE` overrides
(`train` and `sweep`; see [experiments.md](experiments.md)). Exit status: 0 done, 2 bad input
(the message says what to change), 3 a diverged `train` run (non-finite loss).
"""


def help_text(*args: str) -> str:
    """What `bnlab ARGS --help` prints."""
    out = io.StringIO()
    with (
        mock.patch.dict(os.environ, {"COLUMNS": WIDTH}),
        contextlib.redirect_stdout(out),
        contextlib.suppress(SystemExit),
    ):
        cli.main([*args, "--help"])
    return out.getvalue().rstrip()


def render() -> str:
    """The Markdown of docs/cli.md."""
    parts = [HEADER, "## `bnlab`", "", "```text", help_text(), "```", ""]
    for command in cli.COMMANDS:
        parts += [f"## `bnlab {command}`", "", "```text", help_text(command), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    OUTPUT.write_text(render())
    sys.stdout.write(f"wrote {OUTPUT}\n")
