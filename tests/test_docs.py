"""Every Python block and `bnlab` command in README.md and docs/*.md runs; docs/cli.md is current.

A page's blocks run in order in one folder (holding a link to `experiments/`) and, for Python,
one namespace, so a page reads as a session. Shell blocks (```bash) run their `bnlab ...`
commands in process, shrunk with `--smoke --config.train.epochs=1`; other shell lines (the
README's venv set-up) are what CI itself runs. A Python block whose first line is
`# not run: <reason>` is skipped (an excerpt or a signature); ```text blocks are output.
"""

import importlib.util
import re
import shlex

import pytest
from conftest import ROOT

from bnlab import cli

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
SKIP = "# not run:"
SHRINK = ["--smoke", "--config.train.epochs=1"]


def blocks(page):
    """`(language, code)` of every fenced block of a page, in order."""
    return FENCE.findall(page.read_text())


def commands(code: str) -> list[list[str]]:
    """The `bnlab ...` commands of a shell block (lines joined at `\\`, split at `&&`)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words[:1] == ["bnlab"]:
                out.append(words[1:])
    return out


def shrink(args: list[str], tfds_dir: str) -> list[str]:
    if args[0] not in ("train", "sweep"):
        return args
    return [*args, *(a for a in SHRINK if a not in args), f"--config.data.tfds_dir={tfds_dir}"]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch, tfds_dir):
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for language, code in blocks(page):
        if language == "python" and not code.startswith(SKIP):
            exec(compile(code, str(page), "exec"), namespace)
        elif language == "bash":
            for args in commands(code):
                status = cli.main(shrink(args, tfds_dir))
                assert status == 0, f"{page.name}: `bnlab {shlex.join(args)}` exited {status}"


def test_pages_have_code():
    readme = blocks(ROOT / "README.md")
    assert sum(lang == "python" for lang, _ in readme) >= 2
    for page in PAGES:
        if page.name != "cli.md":
            assert any(lang in ("python", "bash") for lang, _ in blocks(page)), page.name


def test_skipped_blocks_are_few():
    skipped = [c for p in PAGES for lang, c in blocks(p) if lang == "python" and c.startswith(SKIP)]
    assert len(skipped) <= 3, skipped


def test_experiment_in_docs_is_the_file():
    text = (ROOT / "experiments" / "bn_momentum.py").read_text()
    assert f"```python\n{text}```" in (ROOT / "docs" / "experiments.md").read_text()


def test_cli_reference_is_current():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    gen_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_cli)
    assert (ROOT / "docs" / "cli.md").read_text() == gen_cli.render(), (
        "docs/cli.md is out of date with the bnlab parser; run `python docs/gen_cli.py`."
    )
