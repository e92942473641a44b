"""Shared parts of the replica scripts (script/replicas/*.py): entry points called in-process, mean +- std
tables, result files.

Entry points are the repo's own `main(argv)` functions (the same code as the command line), loaded from their
files so that folders such as `train/stage1-full` (not importable as packages) work; calling them in one
process saves the interpreter and library start-up of every run (tens of seconds on the shared CPU).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from utils.checkpoint import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_main(rel_path: str) -> Callable[..., Any]:
    """``main`` of the repo file ``rel_path`` (e.g. ``"train/stage1-full/train.py"``)."""
    path = REPO_ROOT / rel_path
    name = "replica_entry_" + rel_path.replace("/", "_").replace("-", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return Path(path)


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """One row per dict; the columns are the union of the keys, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def machine_line() -> str:
    """Where and when a replica ran (for the docs fragment)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} {os.cpu_count()} CPUs "
        f"(shared; load average {load:.1f} at the end), torch threads {_threads()}"
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def resolve_replica_assets(assets: str | os.PathLike | None, quick: bool, work: Path) -> dict[str, Any]:
    """Paths of the models and digits: a trained-asset tree, or (quick, no --assets) the random tiny assets and
    the digits written under ``work``."""
    import json

    from preprocessing.trained_assets import STAMP_NAME, asset_paths
    from utils.cli import UserError

    repo = Path(__file__).resolve().parents[2]
    if assets is None and quick:
        from preprocessing.digits import write_digits
        from preprocessing.make_tiny_assets import ensure_tiny_assets

        tiny = ensure_tiny_assets(repo / ".cache" / "tiny")
        digits = Path(work) / "digits"
        if not (digits / "test").is_dir():
            write_digits(digits)
        return {
            "digits": digits,
            "sd15": Path(tiny["sd15"]),
            "dinov2_official": Path(tiny["dinov2_official"]),
            "classifier": None,
            "kind": "random tiny assets (preprocessing/make_tiny_assets.py)",
        }
    root = Path(assets or repo / ".cache" / "trained")
    if not (root / STAMP_NAME).is_file():
        raise UserError(
            f"--assets {root}: no {STAMP_NAME} in it (not a finished trained-asset tree); build it with "
            f"python preprocessing/trained_assets.py --out {root}"
        )
    paths = asset_paths(root)
    stamp = json.loads((root / STAMP_NAME).read_text())
    quick_build = stamp.get("options", {}).get("sd_steps", 0) < 100
    return {
        "digits": paths["digits"],
        "sd15": paths["sd15"],
        "dinov2_official": paths["dinov2_official"],
        "classifier": paths["classifier"],
        "kind": f"trained assets {root} ({'QUICK build, untrained' if quick_build else 'full build'})",
    }
