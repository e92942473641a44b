"""The commands the README and docs/ show still work: files exist, `--help` runs, every flag exists.

Parsed from the markdown (code blocks and inline code), so a renamed script or flag fails here, not in front
of a reader. `--help` runs in this process (runpy) to share one torch import; each entry point must exit 0
and print its usage.
"""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a repo-relative .py path run by python / .env/bin/python / accelerate launch / $LAUNCH, then its arguments
PY_COMMAND = re.compile(
    r"(?:^|[\s(;&|`])(?:\S*python3?|accelerate launch(?: --\S+(?: [^-\s]\S*)?)*|\$LAUNCH)\s+"
    r"(?P<script>(?:train|eval|preprocessing|script)/[\w./-]+\.py|train_sd15\.py)(?P<args>[^\n`]*)"
)
SH_SCRIPT = re.compile(r"\bbash (?P<script>script/[\w./-]+\.sh)")


def _doc_snippets(path: Path) -> list[str]:
    """Code blocks and inline code spans, with shell line continuations joined."""
    text = path.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    indented = re.findall(r"^    (\S.*)$", rest, flags=re.M)  # markdown's indented code blocks
    inline = re.findall(r"`([^`]+)`", rest)
    snippets = [b.replace("\\\n", " ") for b in blocks] + indented + [s.replace("\n", " ") for s in inline]
    return [re.sub(r"#.*", "", line) for s in snippets for line in s.splitlines()]


def _commands() -> list[tuple[str, str, list[str]]]:
    """(doc name, script, flags given to it) for every python entry-point command in the docs."""
    out = []
    for doc in DOCS:
        for line in _doc_snippets(doc):
            for m in PY_COMMAND.finditer(line):
                args = re.split(r"\s(?:&&|;|\|)\s", m.group("args"))[0]
                flags = re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", args)
                out.append((doc.name, m.group("script"), flags))
    return out


COMMANDS = _commands()
SCRIPTS = sorted({script for _, script, _ in COMMANDS})


def test_the_docs_show_commands():
    assert len(SCRIPTS) >= 15, SCRIPTS  # the parser still finds them (README, every docs page)
    assert {"train/stage1-full/train.py", "train_sd15.py", "eval/evaluate_sd15.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_files_named_in_the_docs_exist(doc):
    text = doc.read_text()
    named = {m.group("script") for m in SH_SCRIPT.finditer(text)}
    named |= {s for d, s, _ in COMMANDS if d == doc.name}
    named |= set(re.findall(r"\b(configs/[\w.-]+\.yaml)\b", text))
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


def _help_text(script: str, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", [str(REPO / script), "--help"])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / script), run_name="__main__")
    assert exit_info.value.code in (0, None), f"{script} --help exited with {exit_info.value.code}"
    return stdout.getvalue()


_HELP: dict[str, str] = {}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs_and_knows_every_flag_the_docs_use(script, monkeypatch):
    text = _HELP.setdefault(script, _help_text(script, monkeypatch))
    assert "usage:" in text
    used = {f for _, s, flags in COMMANDS if s == script for f in flags}
    unknown = sorted(f for f in used if not re.search(rf"{re.escape(f)}\b", text))
    assert not unknown, f"the docs pass {unknown} to {script}, which its --help does not list"


@pytest.mark.parametrize("script", ["script/train/train_stage1-full.sh", "script/train/train_stage2-dual.sh"])
def test_training_scripts_pass_help_through_without_model_or_data(script, tmp_path):
    """`bash script/train/...sh --help` shows the trainer's flags even before SD-1.5 is downloaded, and finds
    the Python on its own (PYTHON given here only so the test uses the interpreter running it)."""
    import os
    import subprocess

    env = {**os.environ, "PYTHON": sys.executable, "MODEL_NAME": str(tmp_path / "nope")}
    result = subprocess.run(["bash", script, "--help"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--pretrained_model_name_or_path" in result.stdout


def test_quoted_arguments_parse():
    """Docs commands are valid shell words (an unbalanced quote would break copy-paste)."""
    for doc in DOCS:
        for line in _doc_snippets(doc):
            if PY_COMMAND.search(line):
                shlex.split(line)
