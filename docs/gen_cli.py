"""Writes docs/cli.md from the `bnlab` parser itself: `python docs/gen_cli.py` (tests check it)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import textwrap
from pathlib import Path
from unittest import mock

from bnlab import cli

OUTPUT = Path(__file__).resolve().parent / "cli.md"
WIDTH = "100"  # argparse wraps help text to $COLUMNS; fixed so the file is the same everywhere

HEADER = f"""# CLI reference

Generated from the parser by `python docs/gen_cli.py`; `tests/test_docs.py` fails when this
file and the CLI disagree. `train` and `sweep` take `--config.GROUP.FIELD=VALUE` overrides (see
[experiments.md](experiments.md)); `evaluate` takes only `--config.data.mnist_dir` and
`--config.data.tfds_dir` (the same as its flags).

{textwrap.fill(cli.EXIT_CODES[0].upper() + cli.EXIT_CODES[1:] + ".", 96, break_on_hyphens=False)}
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
