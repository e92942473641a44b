"""The sample CSV shared by the preprocessing jobs and the datasets: `id,img_path,class_id,synset`."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from utils.cli import UserError

CSV_COLUMNS = ("id", "img_path", "class_id", "synset")


class SampleCSVError(UserError, ValueError):
    """A malformed sample CSV (the message names the file and line); entry points exit 2 with it."""


@dataclass(frozen=True)
class SampleRow:
    id: str
    img_path: str
    class_id: int
    synset: str


def read_sample_csv(path: str | os.PathLike) -> list[SampleRow]:
    """Rows of a sample CSV, with errors naming the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"sample CSV not found: {path} (make one with preprocessing/sample_imagenet_subset.py)"
        )
    rows: list[SampleRow] = []
    seen: set[str] = set()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SampleCSVError(
                f"{path}: missing CSV columns {missing}; header is {reader.fieldnames}, need {list(CSV_COLUMNS)}"
            )
        for line, rec in enumerate(reader, start=2):
            try:
                class_id = int(rec["class_id"])
            except (TypeError, ValueError):
                raise SampleCSVError(
                    f"{path}:{line}: class_id {rec['class_id']!r} is not an integer"
                ) from None
            sid = (rec["id"] or "").strip()
            if not sid:
                raise SampleCSVError(f"{path}:{line}: empty id")
            if sid in seen:
                raise SampleCSVError(f"{path}:{line}: duplicate id {sid!r}")
            seen.add(sid)
            rows.append(SampleRow(sid, rec["img_path"], class_id, rec["synset"]))
    if not rows:
        raise SampleCSVError(f"{path}: no rows")
    return rows
