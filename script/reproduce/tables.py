"""The final artefacts of a plan: one markdown + one CSV table per paper table, published figures beside ours,
and the plots (FID vs step; aligned vs baseline).

Published figures come from ``published.csv`` only (one row per figure, with its source and status); a figure
that could not be read offline is shown as such, never as a number. Every row carries the keys (D1, D2, ...) of
the plan's deviations that affect it; the legend under each table spells them out. Missing results (a unit not
run yet) are shown as ``missing`` and left out of the mean, which then says over how many rows it is.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from script.reproduce.units import Plan
from utils.checkpoint import atomic_write

PUBLISHED_CSV = Path(__file__).with_name("published.csv")
MISSING = "missing"


def load_published(plan: str) -> list[dict[str, str]]:
    with open(PUBLISHED_CSV, newline="") as f:
        return [r for r in csv.DictReader(f) if r["plan"] == plan]


def published(rows: list[dict[str, str]], table: str, row: str, metric: str) -> dict[str, str] | None:
    """The published figure for (table, row, metric); a row '*' applies to every row of the table."""
    for key in (row, "*"):
        for r in rows:
            if r["table"] == table and r["row"] == key and r["metric"] == metric:
                return r
    return None


def published_cell(rec: dict[str, str] | None) -> str:
    if rec is None:
        return "-"
    return rec["value"] if rec["value"] else rec["status"]


def fmt(x: Any, digits: int = 3, pct: bool = False) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return f"{100 * x:.1f}" if pct else f"{x:.{digits}f}"


def mean(values: Sequence[float | None]) -> tuple[float | None, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return (sum(vals) / len(vals) if vals else None), len(vals)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class Table:
    """Rows of cells (ours, published, deviations), written as markdown and CSV with legends."""

    def __init__(self, plan: Plan, name: str, title: str, header: list[str], intro: str = ""):
        self.plan, self.name, self.title, self.header, self.intro = plan, name, title, header, intro
        self.rows: list[list[str]] = []
        self.sources: dict[str, str] = {}  # source text -> key P1, P2, ...
        self.used_deviations: set[str] = set()

    def source_key(self, rec: dict[str, str] | None) -> str:
        if rec is None:
            return ""
        text = rec["source"] + (f" [protocol: {rec['protocol']}]" if rec.get("protocol") else "")
        if text not in self.sources:
            self.sources[text] = f"P{len(self.sources) + 1}"
        return self.sources[text]

    def pub(self, rec: dict[str, str] | None) -> str:
        key = self.source_key(rec)
        return f"{published_cell(rec)} [{key}]" if key else "-"

    def add(self, cells: list[str], deviation_keys: list[str]) -> None:
        self.used_deviations.update(deviation_keys)
        self.rows.append([*cells, ", ".join(deviation_keys) or "none"])

    def write(self, out_dir: Path) -> list[Path]:
        legend = {k: v for k, v in self.plan.deviation_legend().items() if k in self.used_deviations}
        header = [*self.header, "deviations"]
        md = [f"# {self.title}", ""]
        if self.intro:
            md += [self.intro, ""]
        md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in self.rows]
        md += ["", "Published figures (sources):", ""]
        md += [f"- {k}: {text}" for text, k in self.sources.items()] or ["- none"]
        md += ["", "Deviations from the paper's protocol (the `deviations` column):", ""]
        md += [f"- {k}: {text}" for k, text in legend.items()] or ["- none: every setting is the paper's"]
        md.append("")
        md_path, csv_path = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        with atomic_write(md_path) as tmp:
            tmp.write_text("\n".join(md))
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow([*self.header, "deviations"])
        expand = {**{k: f"{k}: {t}" for k, t in self.plan.deviation_legend().items()}}
        for row in self.rows:
            cells = [self._expand_sources(c) for c in row[:-1]]
            devs = (
                " | ".join(expand.get(k.strip(), k) for k in row[-1].split(",")) if row[-1] != "none" else ""
            )
            writer.writerow([*cells, devs])
        with atomic_write(csv_path) as tmp:
            tmp.write_text(buf.getvalue())
        return [md_path, csv_path]

    def _expand_sources(self, cell: str) -> str:
        for text, key in self.sources.items():
            cell = cell.replace(f"[{key}]", f"[{text}]")
        return cell


def unit_deviations(plan: Plan, prefixes: Sequence[str]) -> list[str]:
    """Deviation keys of the units whose names start with one of ``prefixes``."""
    names: list[str] = []
    for u in plan.units:
        if any(u.name.startswith(p) for p in prefixes):
            names += [n for n in u.deviations if n not in names]
    return plan.deviation_keys(names)


# --- DualAnoDiff ------------------------------------------------------------------------------------------


LOC_METRICS = (
    ("image_auroc", "image AUROC"),
    ("image_ap", "image AP"),
    ("image_f1_max", "image F1-max"),
    ("pixel_auroc", "pixel AUROC"),
    ("pixel_ap", "pixel AP"),
    ("pixel_f1_max", "pixel F1-max"),
    ("au_pro", "AU-PRO"),
)
VARIANT_NAMES = {
    "dual": "DualAnoDiff dual-interrelated",
    "bcm": "DualAnoDiff + BCM",
    "dino": "seed 000: stage 1 + dual, DINOv2 loss",
}


def _class_prefixes(variant: str, cls: str, kinds: Sequence[str]) -> list[str]:
    prefixes = [f"dualanodiff/{variant}/{k}/{cls}" for k in kinds]
    if variant == "bcm":
        prefixes.append(f"dualanodiff/fg_masks/{cls}")
    if variant == "dino":
        prefixes.append(f"dualanodiff/dino/stage1/{cls}")
    return prefixes


def dualanodiff_report(plan: Plan) -> list[Path]:
    out_dir = plan.out / "tables"
    pub = load_published("dualanodiff")
    classes: dict[str, list[str]] = plan.info["classes"]
    variants: list[str] = plan.info["variants"]
    written: list[Path] = []

    gen_kinds = ("train", "generate", "is", "ic_lpips")
    t = Table(
        plan, "dualanodiff_generation_quality", "DualAnoDiff on MVTec AD: generation quality (IS, IC-LPIPS)",
        ["variant", "class", "IS (ours)", "IS (published)", "IC-LPIPS (ours)", "IC-LPIPS (published)", "defect types"],
        "IS: torch-fidelity per defect type, the class value is the mean over its types (DualAnoDiff's "
        "compute-is.py); IC-LPIPS: mean over the class's defect folders (eval/compute_ic_lpips.py).",
    )  # fmt: skip
    for variant in variants:
        gen = plan.out / variant / "generate_data"
        is_vals, lp_vals = [], []
        for cls, defects in classes.items():
            per = [read_json(gen / cls / d / "is.json") for d in defects]
            is_val, n_is = mean([r["is_mean"] if r else None for r in per])
            lp = read_json(gen / cls / "ic_lpips.json")
            lp_val = lp.get("class_average_over_defects") if lp else None
            is_vals.append(is_val if n_is == len(defects) else None)
            lp_vals.append(lp_val)
            t.add(
                [VARIANT_NAMES[variant], cls,
                 fmt(is_val) + ("" if n_is in (0, len(defects)) else f" ({n_is}/{len(defects)} types)"),
                 t.pub(published(pub, "generation_quality", cls, "IS")), fmt(lp_val),
                 t.pub(published(pub, "generation_quality", cls, "IC-LPIPS")), " ".join(defects)],
                unit_deviations(plan, _class_prefixes(variant, cls, gen_kinds)),
            )  # fmt: skip
        m_is, k_is = mean(is_vals)
        m_lp, k_lp = mean(lp_vals)
        t.add(
            [VARIANT_NAMES[variant], f"**mean** ({k_is}/{len(classes)} classes)", fmt(m_is),
             t.pub(published(pub, "generation_quality", "mean", "IS")), fmt(m_lp),
             t.pub(published(pub, "generation_quality", "mean", "IC-LPIPS")), ""],
            unit_deviations(plan, [f"dualanodiff/{variant}/", "dualanodiff/fg_masks/" if variant == "bcm" else "~"]),
        )  # fmt: skip
    written += t.write(out_dir)

    loc_kinds = ("train", "generate", "localization")
    t = Table(
        plan, "dualanodiff_localization",
        "DualAnoDiff on MVTec AD: anomaly detection and localization (U-Net trained on generated pairs), %",
        ["variant", "class", *[f"{name} (ours)" for _, name in LOC_METRICS],
         *[f"{name} (published)" for _, name in LOC_METRICS]],
        "Protocol and its own deviations: docs/anomaly_downstream.md (real held-out MVTec test images).",
    )  # fmt: skip
    rows_by_variant = [(v, plan.out / v / "downstream", v) for v in variants]
    if any(u.name.startswith("dualanodiff/perlin/") for u in plan.units):
        rows_by_variant.append(("perlin", plan.out / "perlin", "perlin"))
    for variant, root, key in rows_by_variant:
        label = VARIANT_NAMES.get(variant, "Perlin baseline (DRAEM-style anomalies)")
        per_class = []
        for cls in classes:
            sub = "localization-perlin" if variant == "perlin" else "localization-generated"
            rec = read_json(root / cls / sub / "metrics.json")
            vals = [rec["metrics"]["all"][k] if rec else None for k, _ in LOC_METRICS]
            per_class.append(vals)
            t.add(
                [label, cls, *[fmt(v, pct=True) for v in vals],
                 *[t.pub(published(pub, "localization", cls, name)) for _, name in LOC_METRICS]],
                unit_deviations(plan, _class_prefixes(key, cls, loc_kinds)),
            )  # fmt: skip
        means = [mean([row[i] for row in per_class]) for i in range(len(LOC_METRICS))]
        n = min(k for _, k in means)
        t.add(
            [label, f"**mean** ({n}/{len(classes)} classes)", *[fmt(m, pct=True) for m, _ in means],
             *[t.pub(published(pub, "localization", "mean", name)) for _, name in LOC_METRICS]],
            unit_deviations(plan, [f"dualanodiff/{key}/"]),
        )  # fmt: skip
    written += t.write(out_dir)

    t = Table(
        plan, "dualanodiff_classification", "DualAnoDiff on MVTec AD: anomaly classification (ResNet-34), accuracy %",
        ["variant", "class", "accuracy (ours)", "accuracy (published)", "per defect type (ours)"],
        "ResNet-34 trained on the generated images, tested on the real held-out images (classes with >= 2 types).",
    )  # fmt: skip
    for variant in variants:
        accs = []
        for cls, defects in classes.items():
            if len(defects) < 2:
                continue
            rec = read_json(plan.out / variant / "downstream" / cls / "classification" / "metrics.json")
            acc = rec["metrics"]["accuracy"] if rec else None
            accs.append(acc)
            per = (
                ", ".join(f"{d} {fmt(a, pct=True)}" for d, a in rec["metrics"]["per_defect"].items())
                if rec
                else ""
            )
            t.add(
                [VARIANT_NAMES[variant], cls, fmt(acc, pct=True),
                 t.pub(published(pub, "classification", cls, "accuracy")), per],
                unit_deviations(plan, _class_prefixes(variant, cls, ("train", "generate", "classification"))),
            )  # fmt: skip
        m, k = mean(accs)
        t.add(
            [VARIANT_NAMES[variant], f"**mean** ({k}/{len(accs)} classes)", fmt(m, pct=True),
             t.pub(published(pub, "classification", "mean", "accuracy")), ""],
            unit_deviations(plan, [f"dualanodiff/{variant}/"]),
        )  # fmt: skip
    written += t.write(out_dir)
    return written


# --- U-REPA -----------------------------------------------------------------------------------------------


def urepa_results(plan: Plan) -> list[dict[str, Any]]:
    """Every evaluated checkpoint: setting, step, fid, sfid, svcca_mid, the JSON's path."""
    out = []
    for setting in plan.info["settings"]:
        for path in sorted((plan.out / "eval" / setting).glob("checkpoint-*.json")):
            if path.name.endswith(".manifest.json"):
                continue
            rec = read_json(path)
            if rec is None:
                continue
            out.append(dict(rec, setting=setting, path=str(path)))
    return sorted(out, key=lambda r: (plan.info["settings"].index(r["setting"]), r["step"]))


def urepa_report(plan: Plan) -> list[Path]:
    from utils.figures import RANDOM_WEIGHTS_NOTE, plot_metric_vs_step

    out_dir = plan.out / "tables"
    pub = load_published("urepa")
    settings: list[str] = plan.info["settings"]
    final_steps: dict[str, int] = plan.info["final_steps"]
    results = urepa_results(plan)
    svcca_off = not plan.settings.v("align_num")
    for r in results:
        if svcca_off:
            r.setdefault("svcca_mid", "off (align_num 0)")
    written: list[Path] = []
    groups: dict[str, str] = plan.info["groups"]
    devs = {s: unit_deviations(plan, [f"urepa/train/{s}", f"urepa/eval/{s}/", f"urepa/caches/{groups[s]}/",
                                      f"urepa/subset/{groups[s]}"]) for s in settings}  # fmt: skip

    t = Table(
        plan, "urepa_fid_vs_step", "U-REPA on SD-1.5: FID / sFID / SVCCA of every evaluated checkpoint",
        ["setting", "step", "FID (ours)", "sFID (ours)", "SVCCA mid (ours)", "run"],
        "EMA weights, the seed's sampler unless a deviation says otherwise; FID/sFID through clean-fid "
        "(docs/urepa.md). Plot: urepa_fid_vs_step.png.",
    )  # fmt: skip
    for r in results:
        t.add([r["setting"], str(r["step"]), fmt(r.get("fid")), fmt(r.get("sfid")), fmt(r.get("svcca_mid")), r["run"]],
              devs[r["setting"]])  # fmt: skip
    written += t.write(out_dir)

    final = {}
    for s in settings:
        at = [r for r in results if r["setting"] == s and r["step"] == final_steps[s]]
        final[s] = at[0] if at else None
    t = Table(
        plan, "urepa_final", "U-REPA on SD-1.5: final checkpoints (settings A and B, ablations), published beside",
        ["setting", "step", "FID (ours)", "sFID (ours)", "SVCCA mid (ours)", "FID (published)", "sFID (published)"],
        "A published U-REPA figure exists only for another protocol (ImageNet 256, U-Net from scratch); it is shown "
        "as context in its own row, not as a target of these runs.",
    )  # fmt: skip
    for s in settings:
        r = final[s]
        t.add([s, str(final_steps[s]), fmt(r and r.get("fid")), fmt(r and r.get("sfid")),
               fmt(r and r.get("svcca_mid")), t.pub(published(pub, "final", s, "FID")),
               t.pub(published(pub, "final", s, "sFID"))], devs[s])  # fmt: skip
    for row in ("paper (ImageNet 256)", "seed target"):
        rec = published(pub, "final", row, "FID")
        if rec is not None and rec["row"] == row:
            t.add([row, "", "", "", "", t.pub(rec), "-"], [])
    written += t.write(out_dir)

    base = final.get("lambda0")
    t = Table(
        plan, "urepa_ablations", "U-REPA on SD-1.5: ablations at the final step (seed 004, section 5.3)",
        ["setting", "change", "FID (ours)", "FID - FID(A)", "FID - FID(baseline lambda 0)", "sFID (ours)"],
        "Negative differences = better than the reference row.",
    )  # fmt: skip
    ref = final.get("A")
    for s in settings:
        r = final[s]
        fid = r.get("fid") if r else None
        d_a = fid - ref["fid"] if fid is not None and ref and "fid" in ref else None
        d_b = fid - base["fid"] if fid is not None and base and "fid" in base else None
        t.add([s, plan.info["changes"][s], fmt(fid), fmt(d_a), fmt(d_b), fmt(r and r.get("sfid"))], devs[s])
    written += t.write(out_dir)

    with_fid = [dict(r, run=r["setting"]) for r in results if "fid" in r]
    if with_fid:
        random = any(r.get("inception") == "random" for r in with_fid)
        note = ("Inception with " + RANDOM_WEIGHTS_NOTE) if random else ""
        if plan.profile != "paper":
            note = "; ".join(n for n in (note, f"profile {plan.profile}: see the deviations") if n)
        written.append(
            plot_metric_vs_step(
                with_fid,
                out_dir / "urepa_fid_vs_step.png",
                title="U-REPA on SD-1.5: FID / sFID vs training step",
                note=note,
            )
        )
        pair = [dict(r, run=("baseline (lambda 0)" if r["setting"] == "lambda0" else f"aligned ({r['setting']})"))
                for r in with_fid if r["setting"] in ("A", "B", "lambda0")]  # fmt: skip
        if pair:
            written.append(
                plot_metric_vs_step(
                    pair,
                    out_dir / "urepa_aligned_vs_baseline.png",
                    title="U-REPA: aligned vs baseline (lambda 0)",
                    note=note,
                )
            )
    return written


def write_index(plan: Plan, written: list[Path]) -> Path:
    """``<out>/tables/README.md``: what was written, the plan's deviations, the units still missing."""
    from script.reproduce.units import Markers

    markers = Markers(plan.out)
    missing = [u.name for u in plan.units if not u.always_run and not markers.is_complete(u)]
    lines = [f"# Reproduction: {plan.name} (profile {plan.profile})", "", "Tables and plots:", ""]
    lines += [f"- [{p.name}]({p.name})" for p in written if p.suffix in (".md", ".png")]
    lines += ["", "Deviations from the paper's protocol:", ""]
    lines += [f"- {k}: {v}" for k, v in plan.deviation_legend().items()] or ["- none"]
    lines += ["", f"Units not complete: {len(missing)}", ""]
    lines += [f"- {n}" for n in missing[:50]]
    path = plan.out / "tables" / "README.md"
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
