"""Units, settings and completion markers of a reproduction plan.

A **unit** is one command of an entry point (``train/stage2-dual/train.py ...``) with its declared outputs, the
units it depends on, a completeness check of its outputs and a GPU-hour estimate. A unit is *complete* when its
completion marker exists **and** its outputs still pass the check; the marker
(``<out>/.reproduce/done/<unit>.json``: the command, the time it took, every declared output's size and mtime) is
written atomically, only after the command exited 0 and its outputs passed the check. A unit that was killed
(``<out>/.reproduce/running/<unit>.json`` left behind, no done marker) or failed is *half-finished* and is run
again with the same command: every entry point resumes (trainers from their latest checkpoint, generation from
the files that exist), so nothing finished is redone. Nothing here deletes an output.

**Settings** are the plan's knobs (steps, sample counts, weights, ...), each with the paper's value. ``--set
key=value`` and ``--profile tiny`` change them; every setting that differs from the paper's value is a
*deviation*, printed by ``--dry_run`` and carried by every table row it affects.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.checkpoint import atomic_write
from utils.cli import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ".reproduce"  # under the plan's --out


# --- settings ---------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One knob of a plan: its value, the paper's value and what it means."""

    value: Any
    paper: Any
    help: str
    deviation: str = ""  # why a value other than the paper's matters, shown with the value ("" = help)
    # False: where things are or how fast they run (paths, sampling batch): never a deviation
    protocol: bool = True
    kind: type | None = (
        None  # type of --set values (default: the paper's value's, else the value's, else str)
    )

    @property
    def deviates(self) -> bool:
        return self.protocol and self.value != self.paper


def _parse_value(text: str, like: Any) -> Any:
    """``text`` as the type of ``like`` (the paper's value): bool, int, float or str; none/null -> None."""
    if text.lower() in ("none", "null"):
        return None
    if isinstance(like, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(like, int):
        return int(text)
    if isinstance(like, float):
        return float(text)
    return text


class Settings(dict):
    """``name -> Setting``; ``s["steps"]`` is the Setting, ``s.v("steps")`` its value."""

    def v(self, name: str) -> Any:
        return self[name].value

    def not_protocol(self, *names: str) -> Settings:
        for name in names:
            self[name].protocol = False
        return self

    def apply(self, values: dict[str, Any], origin: str) -> None:
        """Set values (already typed, e.g. a profile's); an unknown name is a user error naming the valid ones."""
        for name, value in values.items():
            if name not in self:
                raise UserError(f"{origin}: unknown setting {name!r}; settings: {', '.join(sorted(self))}")
            self[name].value = value

    def apply_overrides(self, items: Iterable[str]) -> None:
        """``key=value`` strings (``--set``), typed like the paper's value."""
        problems = []
        for item in items:
            if "=" not in item:
                problems.append(f"--set {item!r}: expected key=value")
                continue
            name, text = item.split("=", 1)
            if name not in self:
                problems.append(f"--set {name}: unknown setting; settings: {', '.join(sorted(self))}")
                continue
            setting = self[name]
            like = setting.kind() if setting.kind is not None else setting.paper
            like = setting.value if like is None else like
            try:
                self[name].value = _parse_value(text, "" if like is None else like)
            except ValueError as err:
                problems.append(f"--set {name}={text}: {err}")
        if problems:
            raise UserError("\n".join(problems))

    def deviations(self) -> dict[str, str]:
        """``name -> "name: value (paper: value): why"`` for every setting off the paper's value."""
        out = {}
        for name, s in self.items():
            if s.deviates:
                out[name] = f"{name} = {s.value} (paper: {s.paper}): {s.deviation or s.help}"
        return out


# --- units ------------------------------------------------------------------------------------------------


@dataclass
class Unit:
    """One command with declared outputs, dependencies, a completeness check and a cost estimate."""

    name: str  # "dualanodiff/dual/train/hazelnut/hole": '/'-separated, unique in the plan
    entry: str  # repository-relative script, run as `python <entry> <args>` or `main(args)` in-process
    args: list[str]
    outputs: list[Path]  # what the unit promises (files or folders)
    deps: tuple[str, ...] = ()
    check: Callable[[], list[str]] | None = None  # problems with the outputs; [] = complete
    flops: float | None = None  # counted FLOPs of the whole unit (None: not estimated)
    precision: str = "bf16"  # the arithmetic it runs in (sets the assumed throughput)
    estimate_note: str = ""  # what the FLOP count is made of
    always_run: bool = False  # the report: redrawn at the end of every run, never "complete"
    deviations: tuple[str, ...] = ()  # names of the settings whose deviation this unit's results carry

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, self.entry, *self.args]

    def shell(self, python: str = "python") -> str:
        return shlex.join(self.command(python))

    def problems(self) -> list[str]:
        """What is missing or wrong in the outputs ([] = the outputs are complete)."""
        missing = [f"missing {p}" for p in self.outputs if not Path(p).exists()]
        if missing or self.check is None:
            return missing
        return self.check()


def marker_name(unit_name: str) -> str:
    return unit_name.replace("/", "__") + ".json"


def _describe(path: Path) -> dict[str, Any]:
    """Size and mtime of a file, or of every file under a folder (the marker's record of an output)."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    files = [p for p in sorted(path.rglob("*")) if p.is_file()]
    return {
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "mtime_ns": max((p.stat().st_mtime_ns for p in files), default=0),
    }


@dataclass
class Markers:
    """Completion and running markers of one plan's units, under ``<out>/.reproduce``."""

    out: Path
    root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.out) / STATE_DIR

    def done_path(self, unit: Unit) -> Path:
        return self.root / "done" / marker_name(unit.name)

    def running_path(self, unit: Unit) -> Path:
        return self.root / "running" / marker_name(unit.name)

    def log_path(self, unit: Unit) -> Path:
        return self.root / "logs" / (marker_name(unit.name)[: -len(".json")] + ".log")

    def mark_running(self, unit: Unit) -> None:
        record = {"unit": unit.name, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with atomic_write(self.running_path(unit)) as tmp:
            tmp.write_text(json.dumps(record, indent=1))

    def mark_done(self, unit: Unit, seconds: float, python: str = "python") -> None:
        """Written only after the command succeeded and its outputs passed the check; atomically."""
        record = {
            "unit": unit.name,
            "command": unit.shell(python),
            "seconds": round(seconds, 2),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "outputs": {str(p): _describe(p) for p in unit.outputs},
        }
        with atomic_write(self.done_path(unit)) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        self.running_path(unit).unlink(missing_ok=True)

    def status(self, unit: Unit) -> tuple[str, str]:
        """(state, detail): ``complete``, ``todo`` (never started), ``half-finished`` (killed or failed: run again),
        ``stale`` (marked done but its outputs changed since: run again)."""
        if unit.always_run:
            return "todo", "redrawn on every run"
        if self.done_path(unit).is_file():
            problems = unit.problems()
            if not problems:
                return "complete", ""
            return "stale", "; ".join(problems[:3])
        if self.running_path(unit).is_file():
            return "half-finished", "started earlier, never completed"
        return "todo", ""

    def is_complete(self, unit: Unit) -> bool:
        return self.status(unit)[0] == "complete"


def count_files(folder: Path, pattern: str = "*.png") -> int:
    return sum(1 for p in Path(folder).glob(pattern) if p.is_file()) if Path(folder).is_dir() else 0


def json_problems(path: Path, keys: Iterable[str] = ()) -> list[str]:
    """[] when ``path`` is a JSON object holding every key."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return [f"{path}: unreadable ({type(err).__name__})"]
    missing = [k for k in keys if k not in data]
    return [f"{path}: no {k!r}" for k in missing]


@dataclass
class Plan:
    """A paper's reproduction: its settings, its units in dependency order, and the report that makes its tables."""

    name: str
    out: Path
    settings: Settings
    units: list[Unit]
    report: Callable[[Plan], list[Path]]
    profile: str = "paper"
    notes: list[str] = field(default_factory=list)  # e.g. a variant left out and why
    # the plan's shape, for the report: dualanodiff "classes" {class: defects}, "variants"; urepa "settings",
    # "final_steps" {setting: step}, "changes" {setting: what it changes}, "groups" {setting: data group}
    info: dict[str, Any] = field(default_factory=dict)

    def by_name(self) -> dict[str, Unit]:
        return {u.name: u for u in self.units}

    def deviation_legend(self) -> dict[str, str]:
        """``D1 -> text`` for every setting off the paper's value, in settings order (the tables' footnotes)."""
        return {f"D{i}": text for i, text in enumerate(self.settings.deviations().values(), start=1)}

    def deviation_keys(self, names: Iterable[str]) -> list[str]:
        """The legend keys of the given settings (those that deviate)."""
        keys = {name: i for i, name in enumerate(self.settings.deviations(), start=1)}
        return [f"D{i}" for i in sorted({keys[n] for n in names if n in keys})]
