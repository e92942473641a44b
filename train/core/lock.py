"""One writer per run folder: ``<output_dir>/run.lock`` holds the owner's pid and host while it trains.

Two trainers on one output folder would interleave ``losses.jsonl`` and trip over each other's
``.checkpoint-N.partial``; the second one is refused instead, naming the first. The lock is taken with
``O_CREAT | O_EXCL`` (atomic on local and NFSv3+ file systems) by the main process only and removed when the
run ends (normally, by an exception or Ctrl-C: ``atexit``). A process killed hard (``kill -9``, OOM killer,
power loss) cannot remove it: the next start then finds a lock whose process is gone, says so and tells how
to remove it, rather than deleting a lock on its own (on another host the pid cannot be checked).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from utils.cli import UserError

LOCK_NAME = "run.lock"


class RunLockedError(UserError):
    """The output folder is in use by another run (or a dead run left its lock)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """The lock of one run folder; :meth:`acquire` raises :class:`RunLockedError` when another run holds it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written this instant, or not ours: reported as an unknown owner

    def acquire(self) -> RunLock:
        host, pid = socket.gethostname(), os.getpid()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": pid, "host": host, "started": time.time(), "argv": sys.argv})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = self._owner()
            if (
                owner.get("pid") == pid and owner.get("host") == host
            ):  # this process again (a second run in-process)
                return self
            raise RunLockedError(self._message(owner, host)) from None
        with os.fdopen(fd, "w") as f:
            f.write(record)
        atexit.register(self.release)
        return self

    def _message(self, owner: dict, host: str) -> str:
        who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
        remove = f"remove it with: rm {self.path}"
        if owner.get("host") == host and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
            return (
                f"{self.path} is a stale lock: the run that took it ({who}) is no longer running (killed "
                f"before it could remove it). If no other job uses {self.path.parent}, {remove}"
            )
        if owner.get("host") not in (None, host):
            return (
                f"{self.path.parent} is in use by another run ({who}; this host cannot check whether it still "
                f"runs). Wait for it to end or use another output_dir; if it is not running, {remove}"
            )
        return (
            f"{self.path.parent} is in use by another run ({who}, still running): two runs on one output folder "
            f"would overwrite each other's logs and checkpoints. Wait for it, stop it, or use another output_dir."
        )

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent; another run's lock is left alone)."""
        owner = self._owner()
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
