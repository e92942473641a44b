"""The two plans end to end on the tiny assets (CPU), to their final tables: DualAnoDiff on both synthetic MVTec
classes and all their defect types; U-REPA settings A and B and the lambda-0 baseline, with the driver killed
in the middle (SIGKILL to its process group once units have completed and another has started) and run again:
only the missing units run, and the finished outputs keep their bytes and mtimes.

Kept to seconds of CPU: one step per trainer, two samples per set, --in_process for the runs that finish
(tests/reproduce/test_plans.py covers every variant and setting through --dry_run)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from script.reproduce.run import main
from script.reproduce.units import marker_name

REPO = Path(__file__).resolve().parents[2]


def last_run(out: Path) -> dict:
    return json.loads((out / ".reproduce" / "runs.jsonl").read_text().splitlines()[-1])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_tiny_dualanodiff_to_its_tables(tmp_path, random_inception_torchscript):
    out = tmp_path / "dualanodiff"
    argv = ["dualanodiff", "--profile", "tiny", "--in_process", "--variants", "dual", "--out", str(out),
            "--set", f"inception_path={random_inception_torchscript}", "figure_images=0"]  # fmt: skip
    # a stage-2 unit killed before its first checkpoint: its losses.jsonl and running marker are left behind
    half = out / "dual" / "models" / "hazelnut" / "stage2-hole"
    half.mkdir(parents=True)
    (half / "losses.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    running = out / ".reproduce" / "running" / marker_name("dualanodiff/dual/train/hazelnut/hole")
    running.parent.mkdir(parents=True)
    running.write_text("{}")

    assert main(argv) == 0
    run = last_run(out)
    assert run["failed"] == {} and run["blocked"] == {} and run["skipped"] == []
    defects = {"carpet": ["color", "cut"], "hazelnut": ["crack", "hole"]}
    expected = {
        f"dualanodiff/dual/{k}/{c}/{d}"
        for c, ds in defects.items()
        for d in ds
        for k in ("train", "generate", "is")
    }
    expected |= {
        f"dualanodiff/dual/{k}/{c}" for c in defects for k in ("ic_lpips", "localization", "classification")
    }
    assert set(run["ran"]) == expected | {"dualanodiff/report"}
    assert not running.exists()

    tables = out / "tables"
    gen = read_csv(tables / "dualanodiff_generation_quality.csv")
    assert [r["class"] for r in gen] == ["carpet", "hazelnut", "**mean** (2/2 classes)"]
    for r in gen:
        assert is_number(r["IS (ours)"]) and is_number(r["IC-LPIPS (ours)"])
        assert r["IS (published)"].startswith("not available offline [DualAnoDiff")  # never a made-up number
        assert "base_model = .cache/tiny/sd15" in r["deviations"] and "random VGG16" in r["deviations"]
    assert "color cut" in gen[0]["defect types"] and "crack hole" in gen[1]["defect types"]
    loc = read_csv(tables / "dualanodiff_localization.csv")
    assert len(loc) == 3 and all(is_number(r[f"{m} (ours)"]) for r in loc for m in ("pixel AUROC", "AU-PRO"))
    assert "loc_steps = 1 (paper: 6400)" in loc[0]["deviations"]
    cls = read_csv(tables / "dualanodiff_classification.csv")
    assert len(cls) == 3 and all(is_number(r["accuracy (ours)"]) for r in cls)
    md = (tables / "dualanodiff_generation_quality.md").read_text()
    assert "| D1, D2," in md and "- D1: base_model" in md and "- P1: DualAnoDiff" in md
    assert "Units not complete: 0" in (tables / "README.md").read_text()

    # everything complete: a rerun only redraws the tables
    assert main(argv) == 0
    again = last_run(out)
    assert again["ran"] == ["dualanodiff/report"] and set(again["skipped"]) == expected


def _snapshot(out: Path, names: list[str]) -> dict[str, dict]:
    """Declared outputs of completed units, as their markers recorded them, and as they are now."""
    state = {}
    for name in names:
        done = json.loads((out / ".reproduce" / "done" / marker_name(name)).read_text())
        for path in done["outputs"]:
            p = Path(path)
            files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
            state[path] = {str(q): (q.stat().st_size, q.stat().st_mtime_ns) for q in files}
    return state


def test_tiny_urepa_killed_then_rerun_runs_only_the_missing_units(
    tmp_path, random_inception_torchscript, fast_sqrtm
):
    out = tmp_path / "urepa"
    argv = ["urepa", "--profile", "tiny", "--out", str(out), "--settings", "A", "B", "lambda0",
            "--set", f"inception_path={random_inception_torchscript}", "eval_every=2"]  # fmt: skip
    done_dir, running_dir = out / ".reproduce" / "done", out / ".reproduce" / "running"
    log = open(tmp_path / "driver.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    driver = subprocess.Popen(
        [sys.executable, "script/reproduce/run.py", *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill below takes the running unit with it
    )  # fmt: skip
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill once a unit completed and the next one is running
            started = {p.name for p in running_dir.glob("*.json")} if running_dir.is_dir() else set()
            if (done_dir / marker_name("urepa/subset/A")).is_file() and started - {
                marker_name("urepa/subset/A")
            }:
                break
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.05)
        else:
            raise AssertionError(
                "no unit completed in time: " + (tmp_path / "driver.log").read_text()[-3000:]
            )
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    completed = sorted(json.loads(p.read_text())["unit"] for p in done_dir.glob("*.json"))
    half = sorted(json.loads(p.read_text())["unit"] for p in running_dir.glob("*.json"))
    assert "urepa/subset/A" in completed and half and not set(half) & set(completed)
    before = _snapshot(out, completed)

    assert main([*argv, "--in_process"]) == 0
    run = last_run(out)
    all_units = {json.loads(p.read_text())["unit"] for p in done_dir.glob("*.json")}
    assert set(run["skipped"]) == set(completed)  # finished before the kill: not run again
    assert set(run["ran"]) == all_units - set(completed) and set(half) <= set(
        run["ran"]
    )  # the killed one reran
    assert run["failed"] == {} and run["blocked"] == {}
    assert _snapshot(out, completed) == before  # bytes and mtimes of every finished output untouched
    assert {
        "urepa/train/A",
        "urepa/train/B",
        "urepa/train/lambda0",
        "urepa/eval/B/2",
        "urepa/report",
    } <= all_units

    tables = out / "tables"
    final = {r["setting"]: r for r in read_csv(tables / "urepa_final.csv")}
    for s in ("A", "B", "lambda0"):
        assert (
            is_number(final[s]["FID (ours)"])
            and is_number(final[s]["sFID (ours)"])
            and final[s]["step"] == "2"
        )
        assert final[s]["FID (published)"].startswith("no published figure")
        assert "random Inception" in final[s]["deviations"]
    assert final["paper (ImageNet 256)"]["FID (published)"].startswith("< 1.5 [U-REPA (Tian et al.")
    ablations = {r["setting"]: r for r in read_csv(tables / "urepa_ablations.csv")}
    assert is_number(ablations["A"]["FID - FID(baseline lambda 0)"]) and ablations["lambda0"][
        "change"
    ].startswith("baseline")
    steps = read_csv(tables / "urepa_fid_vs_step.csv")
    assert {(r["setting"], r["run"]) for r in steps} == {
        ("A", "aligned:A"),
        ("B", "aligned:B"),
        ("lambda0", "baseline:lambda0"),
    }
    for png in ("urepa_fid_vs_step.png", "urepa_aligned_vs_baseline.png"):
        assert (tables / png).stat().st_size > 1000
