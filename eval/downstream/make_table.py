"""Markdown tables of every downstream result under a folder (one row per class and method).

    python eval/downstream/make_table.py --root outputs/downstream [--output outputs/downstream/results.md]

Reads ``<root>/**/metrics.json`` written by ``localization.py`` and ``classification.py``. Values are
percentages with one decimal, as in the papers; a mean row is added per method when there are several
classes. Rows whose run carries a note or a warning (smoke tests, random-init backbones) show it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
from typing import Any

from eval.downstream.metrics import METRIC_NAMES
from eval.downstream.report import METRICS_JSON
from utils.checkpoint import atomic_write

LOCALIZATION_HEADERS = (
    "image AUROC",
    "image AP",
    "image F1-max",
    "pixel AUROC",
    "pixel AP",
    "pixel F1-max",
    "AU-PRO",
)
METHOD_NAMES = {
    "generated": "generated pairs",
    "perlin": "Perlin baseline (DRAEM-style)",
    "both": "generated pairs + Perlin",
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _remark(rec: dict[str, Any]) -> str:
    return "; ".join(s for s in (rec.get("warning", ""), rec.get("note", "")) if s).replace("|", "/")


def load_records(root: str | Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(Path(root).rglob(METRICS_JSON)):
        rec = json.loads(path.read_text())
        if rec.get("job") in ("localization", "classification"):
            rec["_path"] = str(path.relative_to(root))
            records.append(rec)
    return records


def localization_table(records: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in records if r["job"] == "localization"]
    if not rows:
        return []
    lines = [
        "## Localization (DRAEM segmentation U-Net, real held-out MVTec test images)",
        "",
        "| class | training anomalies | " + " | ".join(LOCALIZATION_HEADERS) + " | remark |",
        "|---|---|" + "---:|" * len(LOCALIZATION_HEADERS) + "---|",
    ]
    rows.sort(key=lambda r: (r["class"], r["method"] != "generated", r["method"]))
    for r in rows:
        m = r["metrics"]["all"]
        lines.append(
            f"| {r['class']} | {METHOD_NAMES.get(r['method'], r['method'])} | "
            + " | ".join(_pct(m[k]) for k in METRIC_NAMES)
            + f" | {_remark(r)} |"
        )
    for method in sorted({r["method"] for r in rows}):
        group = [r for r in rows if r["method"] == method]
        if len({r["class"] for r in group}) > 1:
            mean = {k: sum(r["metrics"]["all"][k] for r in group) / len(group) for k in METRIC_NAMES}
            lines.append(
                f"| **mean ({len(group)})** | {METHOD_NAMES.get(method, method)} | "
                + " | ".join(_pct(mean[k]) for k in METRIC_NAMES)
                + " | |"
            )
    lines += ["", "Per defect type (good images + that type's held-out images):", ""]
    lines += [
        "| class | training anomalies | defect | " + " | ".join(LOCALIZATION_HEADERS) + " |",
        "|---|---|---|" + "---:|" * len(LOCALIZATION_HEADERS),
    ]
    for r in rows:
        for scope, m in r["metrics"].items():
            if scope != "all":
                lines.append(
                    f"| {r['class']} | {METHOD_NAMES.get(r['method'], r['method'])} | {scope} | "
                    + " | ".join(_pct(m[k]) for k in METRIC_NAMES)
                    + " |"
                )
    return lines + [""]


def classification_table(records: list[dict[str, Any]]) -> list[str]:
    rows = sorted((r for r in records if r["job"] == "classification"), key=lambda r: r["class"])
    if not rows:
        return []
    lines = [
        "## Classification (ResNet-34 trained on generated images, tested on real held-out images)",
        "",
        "| class | top-1 accuracy | per defect type | test images | ImageNet init | remark |",
        "|---|---:|---|---:|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{d} {_pct(a)}" for d, a in r["metrics"]["per_defect"].items())
        lines.append(
            f"| {r['class']} | {_pct(r['metrics']['accuracy'])} | {per} | {sum(r['n_test_images'].values())} | "
            f"{'yes' if r.get('imagenet_weights') else 'no'} | {_remark(r)} |"
        )
    if len(rows) > 1:
        mean = sum(r["metrics"]["accuracy"] for r in rows) / len(rows)
        lines.append(f"| **mean ({len(rows)})** | {_pct(mean)} | | | | |")
    return lines + [""]


def make_tables(root: str | Path) -> str:
    records = load_records(root)
    if not records:
        raise FileNotFoundError(f"no {METRICS_JSON} of a downstream job under {root}")
    lines = ["# Downstream evaluation of generated anomalies", ""]
    if any(r.get("note") or r.get("warning") for r in records):
        lines += ["> Rows with a remark are not comparable with published numbers (see the remark).", ""]
    lines += localization_table(records) + classification_table(records)
    lines += ["Sources: " + ", ".join(f"`{r['_path']}`" for r in records), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="folder searched recursively for metrics.json")
    p.add_argument("--output", default=None, help="Markdown file to write (default: <root>/results.md)")
    args = p.parse_args(argv)
    out = Path(args.output or Path(args.root) / "results.md")
    text = make_tables(args.root)
    with atomic_write(out) as tmp:
        tmp.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
