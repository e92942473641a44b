"""The shell scripts find the repo's virtual environment, and script/lib/env.sh (used by script/demo.sh and
script/test.sh) builds .env once, skips a second install, names a failing requirement and redoes a failed or
interrupted install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHELL_SCRIPTS = sorted(p for p in (REPO / "script").rglob("*.sh") if "lib" not in p.parts)


def _bash(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "LAUNCH")}
    return subprocess.run(["bash", "-c", code], cwd=cwd, env={**clean, **env}, capture_output=True, text=True)


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_script_takes_python_from_the_shared_helper(script):
    text = script.read_text()
    assert "source script/lib/python.sh" in text or "source script/lib/env.sh" in text
    assert not re.search(r"^\s*(PY|PYTHON|LAUNCH)=\$\{(PYTHON|LAUNCH):-", text, flags=re.M), "own default"
    assert not re.search(r"(^|[\s\"'])accelerate launch", text.replace("# ", "")), "bare accelerate on PATH"


def test_python_helper_prefers_caller_then_dot_env_then_python3(tmp_path):
    (tmp_path / "script" / "lib").mkdir(parents=True)
    shutil.copy(REPO / "script" / "lib" / "python.sh", tmp_path / "script" / "lib")
    show = 'source script/lib/python.sh; echo "$PYTHON|$LAUNCH"'
    assert _bash(show, tmp_path).stdout.strip() == "python3|python3 -m accelerate.commands.launch"
    (tmp_path / ".env" / "bin").mkdir(parents=True)
    (tmp_path / ".env" / "bin" / "python").write_text("#!/bin/sh\n")
    (tmp_path / ".env" / "bin" / "python").chmod(0o755)
    assert (
        _bash(show, tmp_path).stdout.strip()
        == ".env/bin/python|.env/bin/python -m accelerate.commands.launch"
    )
    assert _bash(show, tmp_path, PYTHON="/opt/py", LAUNCH="/opt/py").stdout.strip() == "/opt/py|/opt/py"


def test_launch_default_is_a_working_accelerate():
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "--num_processes" in result.stdout


def _ensure(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    return _bash(
        f'source env.sh; ensure_env {" ".join(args)} && echo "PYTHON=$PYTHON"',
        repo,
        VENV_PYTHON=sys.executable,
        **offline,
        **env,
    )


def test_env_setup_builds_once_redoes_failures_and_names_the_requirement(tmp_path):
    """One venv for the whole story (venv creation is the slow part). Offline: 'pip' is already in a new
    venv, so pip never needs an index; the failing requirement cannot be found without one."""
    shutil.copy(REPO / "script" / "lib" / "env.sh", tmp_path)
    (tmp_path / "requirements.txt").write_text("pip\n")
    (tmp_path / "requirements-dev.txt").write_text("definitely-not-a-package-4e2b==1.0\n")
    (tmp_path / ".env").mkdir()  # left over by an interrupted `python -m venv`: no bin/python

    failed = _ensure(tmp_path, "dev")
    assert failed.returncode != 0
    assert "removing it and starting again" in failed.stdout
    assert "definitely-not-a-package-4e2b==1.0" in failed.stderr  # pip's ERROR line names the requirement
    assert "not marked as ready" in failed.stderr
    assert not (tmp_path / ".env" / ".stamp-requirements-dev.txt.sha256").exists()

    ok = _ensure(tmp_path)  # the demo's set-up needs only requirements.txt
    assert ok.returncode == 0, ok.stderr
    assert "installing requirements.txt" in ok.stdout and "PYTHON=.env/bin/python" in ok.stdout
    again = _ensure(tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout and "installing" not in again.stdout

    (tmp_path / "requirements-dev.txt").write_text("pip>=1\n")  # fixed: only the changed file is installed
    fixed = _ensure(tmp_path, "dev")
    assert fixed.returncode == 0, fixed.stderr
    assert "installing requirements-dev.txt into" in fixed.stdout
    assert "up to date" in _ensure(tmp_path, "dev").stdout

    (tmp_path / "requirements.txt").write_text("pip  # changed\n")  # any edit reinstalls that file
    assert "installing requirements.txt into" in _ensure(tmp_path, "dev").stdout

    own = _ensure(tmp_path, "dev", PYTHON="/some/python")  # PYTHON given: nothing is set up
    assert own.returncode == 0 and "as it is" in own.stdout and "PYTHON=/some/python" in own.stdout
