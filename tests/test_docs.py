"""Every Python block and `bnlab` command in README.md and docs/*.md runs; docs/cli.md is current.

A page's blocks run in order in one folder (holding a link to `experiments/`) and, for Python,
one namespace, so a page reads as a session. Shell blocks (```bash) run their `bnlab ...`
commands in process, shrunk with `--smoke --config.train.epochs=1`; other shell lines (the
README's venv set-up) are what CI itself runs. A Python block whose first line is
`# not run: <reason>` is skipped (an excerpt or a signature). In ```text blocks, a transcript
(`$ bnlab ...` and the lines it prints) is run as written and must print that text (numbers
masked, line breaks free).
"""

import importlib.util
import re
import shlex

import pytest
from conftest import ROOT

from bnlab import cli

pytestmark = pytest.mark.slow  # the docs' commands run whole trainings (the fast tier skips them)

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


def shrink(args: list[str], tfds_dir: str, extra=SHRINK) -> list[str]:
    if args[0] not in ("train", "sweep"):
        return args
    shrunk = {a.partition("=")[0] for a in extra}  # the same override twice is refused
    args = [a for a in args if not (a.startswith("--config.") and a.partition("=")[0] in shrunk)]
    return [*args, *(a for a in extra if a not in args), f"--config.data.tfds_dir={tfds_dir}"]


def transcripts(code: str) -> list[tuple[dict[str, str], list[str], str]]:
    """`(env, bnlab args, expected output)` of each `$ [VAR=value ...] bnlab ...` in a block."""
    out = []
    for chunk in re.split(r"^\$ ", code.replace("\\\n", " "), flags=re.M)[1:]:
        command, _, expected = chunk.partition("\n")
        words = shlex.split(command)
        env = {}
        while "=" in words[0]:
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words[0] == "bnlab":
            out.append((env, words[1:], expected))
    return out


def masked(text: str) -> str:
    return " ".join(re.sub(r"\d+(\.\d+)?", "#", text).split())


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch, capsys, tfds_dir):
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
        elif language == "text":
            for env, args, expected in transcripts(code):
                capsys.readouterr()
                with monkeypatch.context() as m:
                    for key, value in env.items():
                        m.setenv(key, value)
                    cli.main(shrink(args, tfds_dir, extra=()))
                printed = capsys.readouterr()
                assert masked(expected) in masked(printed.out + printed.err), (
                    f"{page.name}: `bnlab {shlex.join(args)}` printed:\n{printed.out}{printed.err}"
                )


def test_pages_have_code():
    readme = blocks(ROOT / "README.md")
    assert sum(lang == "python" for lang, _ in readme) >= 2
    for page in PAGES:
        # cli.md is generated; results.md reports measurements whose commands are the
        # experiment files' (test_sweep validates every one of them).
        if page.name not in ("cli.md", "results.md"):
            assert any(lang in ("python", "bash") for lang, _ in blocks(page)), page.name


def test_transcripts_are_found():
    page = ROOT / "docs" / "troubleshooting.md"
    found = [t for lang, code in blocks(page) if lang == "text" for t in transcripts(code)]
    assert len(found) == 4, found


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
