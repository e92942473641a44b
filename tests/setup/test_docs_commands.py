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
SH_SCRIPT = re.compile(r"\bbash (?P<script>script/[\w./-]+\.sh)(?P<args>[^\n`]*)")
# wrappers that pass their extra arguments to a trainer: the flags the docs give them are the trainer's
PASS_THROUGH = {
    "script/train/train_stage1-full.sh": "train/stage1-full/train.py",
    "script/train/train_stage2-dual.sh": "train/stage2-dual/train.py",
}


def _expand_variables(block: str, values: dict[str, str]) -> str:
    """Replace ``$NAME`` by the value of a ``NAME="..."`` assignment made earlier on the page."""
    for m in re.finditer(r'^(\w+)="([^"]*)"', block, flags=re.M):
        values[m.group(1)] = " ".join(m.group(2).split())
    return re.sub(r"\$(\w+)\b", lambda m: values.get(m.group(1), m.group(0)), block)


def _doc_snippets(path: Path) -> list[str]:
    """Code blocks and inline code spans, with shell line continuations joined."""
    text = path.read_text()
    values: dict[str, str] = {}
    blocks = [_expand_variables(b, values) for b in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)]
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
            found = [(m.group("script"), m.group("args")) for m in PY_COMMAND.finditer(line)]
            found += [
                (PASS_THROUGH[m.group("script")], m.group("args"))
                for m in SH_SCRIPT.finditer(line)
                if m.group("script") in PASS_THROUGH
            ]
            for script, args in found:
                args = re.split(r"\s(?:&&|;|\|)\s", args)[0]
                flags = re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*", args)
                out.append((doc.name, script, flags))
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


def _flag_values(tokens: list[str]) -> dict[str, tuple[str, ...]]:
    """``--a 1 --b=x y --c`` -> {"a": ("1",), "b": ("x", "y"), "c": ()}; a later flag wins."""
    out: dict[str, tuple[str, ...]] = {}
    key = None
    for tok in tokens:
        if tok.startswith("--"):
            key, _, value = tok[2:].partition("=")
            out[key] = (value,) if value else ()
        elif key is not None:
            out[key] += (tok,)
    return out


# the two forms write to different folders on purpose
_RUN_SPECIFIC = {"output_dir", "resume_from_checkpoint"}


@pytest.mark.parametrize("stage", ["stage1-full", "stage2-dual"])
def test_the_tiny_demo_trains_the_same_with_and_without_the_scripts(stage):
    """docs/anomaly_training.md: the plain command and "the same through the scripts" give the trainer the
    same settings (the script's defaults and environment variables, then the flags the docs append)."""
    trainer, wrapper = f"train/{stage}/train.py", f"script/train/train_{stage}.sh"
    lines = _doc_snippets(REPO / "docs" / "anomaly_training.md")
    plain = next(
        line for line in lines if re.search(rf"python {re.escape(trainer)} .*--max_train_steps", line)
    )
    via_script = next(line for line in lines if f"bash {wrapper} --" in line and "--max_train_steps" in line)
    plain_flags = _flag_values(shlex.split(plain.split(trainer, 1)[1]))

    script_text = (REPO / wrapper).read_text().replace("\\\n", " ")
    env = dict(
        re.findall(r'^(\w+)="\$\{\w+:-([^}]*)\}"', script_text, flags=re.M)
    )  # NAME="${NAME:-hazelnut}"
    for line in lines:  # the docs' `export MODEL_NAME=... INSTANCE_DIR=...`
        if line.strip().startswith("export "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    launch = re.search(rf"\$LAUNCH {re.escape(trainer)}(.*?)\"\$@\"", script_text, flags=re.S).group(1)
    launch = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), launch)
    script_flags = _flag_values(shlex.split(launch))
    script_flags.update(_flag_values(shlex.split(via_script.split(wrapper, 1)[1])))

    keys = (set(plain_flags) | set(script_flags)) - _RUN_SPECIFIC
    differ = {
        k: (plain_flags.get(k), script_flags.get(k))
        for k in keys
        if plain_flags.get(k) != script_flags.get(k)
    }
    assert not differ, f"plain command vs {wrapper} (plain, script): {differ}"
