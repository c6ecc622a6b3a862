"""README's and the docs' lists checked against the code, so that they cannot drift from it: the
config groups, the files a run writes, each command's flags, and the exit statuses."""

import argparse
import json
import re

import pytest
from conftest import ROOT

from bnlab import cli, config

README = (ROOT / "README.md").read_text()
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _names(text: str) -> list[str]:
    """The `backticked` words of a piece of text, in order."""
    return re.findall(r"`([\w.<>/-]+)`", text)


def test_readme_and_experiments_md_name_every_config_group_in_order():
    groups = list(config.groups())
    (readme,) = re.findall(r"the groups are\s+(.*?)\s+\(", README, flags=re.S)
    assert _names(readme) == groups
    experiments = (ROOT / "docs" / "experiments.md").read_text()
    ((count, listed),) = re.findall(r"with (\w+) groups: (.*?)\.\s", experiments, flags=re.S)
    assert _names(listed) == groups and count == NUMBERS[len(groups)]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_readme_cli_table_lists_every_flag_of_each_command(command):
    (row,) = [line for line in README.splitlines() if line.startswith(f"| `bnlab {command} ")]
    usage = row.split(" | ")[0]
    listed = set(re.findall(r"--[a-z][a-z-]*(?![\w.-])", usage))
    options = {o for a in _subcommands()[command]._actions for o in a.option_strings}
    assert listed == {o for o in options if o.startswith("--") and o != "--help"}
    assert ("--config.G.F=V" in usage) == (command in ("train", "sweep"))  # overrides


def test_readme_states_the_exit_statuses_as_the_command_does():
    assert list(cli.EXIT_STATUSES) == sorted(cli.EXIT_STATUSES)
    statuses = cli.EXIT_CODES.removeprefix("exit status: ")
    assert f"Exit status: {statuses}." in _flat(README)
    assert cli.EXIT_CODES in _flat(cli._parser().format_help())


def _run_files_table() -> dict[str, str]:
    """`{file or folder: its row}` of README's table of what a run writes."""
    start = README.index("| file | content |")
    rows = README[start:].split("\n\n")[0].splitlines()[2:]
    return {_names(row.split(" | ")[0])[0].split("/")[0]: row for row in rows}


def test_readme_lists_every_file_a_run_writes_and_every_kind_of_record(tmp_path, tfds_dir):
    workdir = tmp_path / "run"
    args = [
        "train", "--config", str(ROOT / "experiments" / "bn_paper_mlp.py"), "--smoke",
        "--workdir", str(workdir), "--no-progress", f"--config.data.tfds_dir={tfds_dir}",
        "--config.data.validation_size=120", "--config.diagnostics.names=ics",
        "--config.diagnostics.every_steps=9", "--config.data.train_eval_size=60",
    ]  # fmt: skip
    assert cli.main(args) == 0
    assert cli.main(["evaluate", str(workdir), "--recalibrate", "60"]) == 0  # evaluate.json
    table = _run_files_table()
    assert set(table) == {p.name for p in workdir.iterdir()}
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    splits = {r["split"] for r in records}
    assert splits == {"train", "test", "validation", "diag", "train_eval"}
    assert splits <= set(_names(table["metrics.jsonl"]))
