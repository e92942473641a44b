"""script/reproduce: settings, completion markers, the runner's scheduling, --dry_run on a real-layout MVTec AD tree
(every unit listed, GPU-hours from given FLOP counts), the SLURM arrays, the published-figures file. No model runs
here (tests/reproduce/test_end_to_end.py runs the tiny plans)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from script.reproduce import dualanodiff, urepa
from script.reproduce.estimate import COUNT_KEYS, FP32_PEAK_TFLOPS, gpu_hours
from script.reproduce.execute import Runner, run_single
from script.reproduce.run import main, make_plan, resolve_args
from script.reproduce.tables import PUBLISHED_CSV
from script.reproduce.units import Markers, Unit
from utils.cli import UserError

REPO = Path(__file__).resolve().parents[2]

# MVTec AD's class and defect-type folder names (test/<defect>; 15 classes, 73 defect types)
MVTEC_AD = {
    "bottle": ["broken_large", "broken_small", "contamination"],
    "cable": ["bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation",
              "missing_cable", "missing_wire", "poke_insulation"],
    "capsule": ["crack", "faulty_imprint", "poke", "scratch", "squeeze"],
    "carpet": ["color", "cut", "hole", "metal_contamination", "thread"],
    "grid": ["bent", "broken", "glue", "metal_contamination", "thread"],
    "hazelnut": ["crack", "cut", "hole", "print"],
    "leather": ["color", "cut", "fold", "glue", "poke"],
    "metal_nut": ["bent", "color", "flip", "scratch"],
    "pill": ["color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"],
    "screw": ["manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"],
    "tile": ["crack", "glue_strip", "gray_stroke", "oil", "rough"],
    "toothbrush": ["defective"],
    "transistor": ["bent_lead", "cut_lead", "damaged_case", "misplaced"],
    "wood": ["color", "combined", "hole", "liquid", "scratch"],
    "zipper": ["broken_teeth", "combined", "fabric_border", "fabric_interior", "rough", "split_teeth",
               "squeezed_teeth"],
}  # fmt: skip


def mvtec_tree(root: Path) -> Path:
    """The MVTec AD layout with one empty file per folder (the dry run reads folder names only)."""
    for cls, defects in MVTEC_AD.items():
        for sub in (
            "train/good",
            "test/good",
            *[f"test/{d}" for d in defects],
            *[f"ground_truth/{d}" for d in defects],
        ):
            (root / cls / sub).mkdir(parents=True)
            (root / cls / sub / "000.png").touch()
    return root


def flop_counts(path: Path) -> Path:
    """Round made-up counts: the estimates below are checked against them by hand."""
    counts = {k: 1e12 for k in COUNT_KEYS} | {"dual_unet_pair": 2e12, "train_dual_pair_lora32": 4e12}
    path.write_text(json.dumps({"counts": counts}))
    return path


def test_sum_of_defect_types_is_mvtecs():
    assert sum(map(len, MVTEC_AD.values())) == 73


def test_dry_run_lists_every_unit_of_a_real_layout(tmp_path, capsys):
    root = mvtec_tree(tmp_path / "mvtec_ad")
    counts = flop_counts(tmp_path / "counts.json")
    common = [
        "dualanodiff",
        "--mvtec_root",
        str(root),
        "--out",
        str(tmp_path / "out"),
        "--flop_counts",
        str(counts),
    ]
    assert main([*common, "--dry_run", "--set", "stand_in_masks=true"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[1] for line in out.splitlines() if line.startswith("[todo] ")]
    expected = {f"dualanodiff/fg_masks/{c}" for c in MVTEC_AD} | {"dualanodiff/report"}
    for variant in ("dual", "bcm", "dino"):
        for cls, defects in MVTEC_AD.items():
            expected |= {
                f"dualanodiff/{variant}/{k}/{cls}/{d}" for d in defects for k in ("train", "generate", "is")
            }
            expected |= {f"dualanodiff/{variant}/{k}/{cls}" for k in ("ic_lpips", "localization")}
            if len(defects) >= 2:  # classification needs two defect types: not toothbrush
                expected.add(f"dualanodiff/{variant}/classification/{cls}")
        expected |= {f"dualanodiff/dino/stage1/{c}" for c in MVTEC_AD}
    assert set(listed) == expected and len(listed) == len(expected) == 73 * 9 + 15 * 8 + 14 * 3 + 1
    assert "note: dual/toothbrush: classification left out (one defect type)" in out
    assert f"{len(expected)} units, 0 complete, {len(expected)} to run" in out
    assert "GPU-hours = counted FLOPs" in out and "deviations from the paper's protocol" in out
    assert "DEVIATION" in out.split("deviations from the paper's protocol")[0]  # stand_in_masks
    # every unit's command is printed, the stage-2 runs with their reference settings
    assert (
        "train/stage2-dual/train.py" in out
        and "--interaction_init default" in out
        and "--bcm_fg_mask_dir" in out
    )

    # the estimates: counted FLOPs x samples / (H100 peak x 23 %), fp32 units at the fp32 peak
    plan = make_plan(
        resolve_args([*common, "--set", "stand_in_masks=true"]), json.loads(counts.read_text())["counts"]
    )
    units = plan.by_name()
    train = units["dualanodiff/dual/train/bottle/broken_large"]
    assert train.flops == 5000 * 4 * 4e12 and train.precision == "fp32"
    assert gpu_hours(train.flops, "fp32") == pytest.approx(8e16 / (FP32_PEAK_TFLOPS * 1e12 * 0.23) / 3600)
    gen = units["dualanodiff/dual/generate/bottle/broken_large"]
    assert gen.flops == 500 * (
        2 * 101 * 2e12 + 2 * 1e12
    )  # PNDM 100 steps = 101 evaluations, CFG doubles them
    bcm = units["dualanodiff/bcm/generate/bottle/broken_large"]
    assert bcm.flops == 500 * (2 * 51 * (2e12 + 1e12) + 2 * 1e12)  # official_bcm: 50 steps + the write pass
    stage2_dino = units["dualanodiff/dino/train/bottle/broken_large"]
    assert stage2_dino.flops == 3000 * 4 * (4e12 + 1e12) and stage2_dino.deps == (
        "dualanodiff/dino/stage1/bottle",
    )

    # without masks the BCM variant is left out, and the dry run says why
    assert main([*common, "--dry_run", "--classes", "hazelnut", "toothbrush"]) == 0
    out = capsys.readouterr().out
    assert "variant bcm left out" in out and "dualanodiff/bcm/" not in out
    assert "dualanodiff/dual/train/hazelnut/print" in out and "dualanodiff/dual/train/bottle" not in out
    with pytest.raises(UserError, match="screws.*classes there: bottle"):
        main([*common, "--dry_run", "--classes", "screws"])


def test_urepa_dry_run_lists_settings_and_every_checkpoint(tmp_path, capsys):
    root = tmp_path / "imagenet"
    (root / "ILSVRC" / "Data" / "CLS-LOC" / "train").mkdir(parents=True)
    counts = flop_counts(tmp_path / "counts.json")
    argv = [
        "urepa",
        "--imagenet_root",
        str(root),
        "--out",
        str(tmp_path / "out"),
        "--flop_counts",
        str(counts),
    ]
    assert main([*argv, "--dry_run"]) == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[todo] ")]
    evals = [n for n in listed if n.startswith("urepa/eval/")]
    # every 5k steps (seed 004): 12 checkpoints of 60k for A and the ablations, 24 of 120k for B
    assert len(evals) == 6 * 12 + 24 and "urepa/eval/B/120000" in evals and "urepa/eval/lambda0/5000" in evals
    assert {f"urepa/train/{s}" for s in urepa.CONFIGS} <= set(listed)
    assert {"urepa/subset/A", "urepa/subset/B", "urepa/clip", "urepa/caches/A/shard-7"} <= set(listed)
    plan = make_plan(resolve_args(argv), json.loads(counts.read_text())["counts"])
    unit = plan.by_name()["urepa/eval/A/60000"]
    # DDPM 250 steps, CFG on t/T <= 0.7: 425 U-Net evaluations (docs/scaling.md); + decode + Inception, + refs
    assert unit.flops == 10000 * (425 * 1e12 + 1e12 + 1e12) + 10000 * 1e12 and unit.precision == "bf16"
    assert "--baseline" in plan.by_name()["urepa/eval/lambda0/5000"].args


def test_settings_are_typed_and_deviations_named():
    s = dualanodiff.settings()
    s.apply_overrides(["num_images=100", "random_metric_networks=true", "sampling_steps=50", "gen_batch=8"])
    assert s.v("num_images") == 100 and s.v("random_metric_networks") is True and s.v("sampling_steps") == 50
    assert set(s.deviations()) == {"num_images", "random_metric_networks", "sampling_steps"}  # gen_batch: no
    with pytest.raises(UserError, match="num_image: unknown setting"):
        s.apply_overrides(["num_image=3"])
    with pytest.raises(UserError, match="expected true/false"):
        s.apply_overrides(["perlin_baseline=maybe"])


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text("import sys\nfrom pathlib import Path\n" + body)
    return str(path)


def test_markers_and_runner_skip_rerun_and_block(tmp_path):
    """Complete units are skipped, a failure blocks its dependents only, a changed output makes a unit stale, a
    half-finished one runs again, and nothing is deleted."""
    write = _script(tmp_path, "write", "Path(sys.argv[1]).write_text(sys.argv[2])\n")
    fail = _script(tmp_path, "fail", "sys.exit(3)\n")
    out = tmp_path / "out"
    a, d = out / "a.txt", out / "d.txt"
    out.mkdir()
    units = [
        Unit("t/a", write, [str(a), "A"], [a]),
        Unit("t/b", fail, [], [out / "b.txt"], deps=("t/a",)),
        Unit("t/c", write, [str(out / "c.txt"), "C"], [out / "c.txt"], deps=("t/b",)),
        Unit("t/d", write, [str(d), "D"], [d], check=lambda: [] if d.read_text() == "D" else ["d changed"]),
    ]
    markers = Markers(out)
    quiet = []
    outcome = Runner(markers, [None], log=quiet.append).run(units)
    assert (
        outcome.ran == ["t/a", "t/d"]
        and outcome.failed == {"t/b": "exit 3"}
        and outcome.blocked == {"t/c": "t/b"}
    )
    assert markers.status(units[1])[0] == "half-finished"  # started, never completed: run again next time
    done = json.loads(markers.done_path(units[0]).read_text())
    assert done["outputs"][str(a)]["bytes"] == 1 and "write.py" in done["command"]
    assert (markers.root / "logs").is_dir()
    d.write_text("changed")  # outputs changed after completion: stale, run again
    assert markers.status(units[3]) == ("stale", "d changed")
    mtime = a.stat().st_mtime_ns
    outcome = Runner(markers, [None], log=quiet.append).run(units)
    assert outcome.skipped == ["t/a"] and outcome.ran == ["t/d"] and a.stat().st_mtime_ns == mtime
    assert d.read_text() == "D" and (out / "b.txt").exists() is False and a.exists()
    # one unit by name (a SLURM task): refused while a dependency is incomplete, except the report
    by_name = {u.name: u for u in units}
    assert run_single(units[2], by_name, markers) == 1
    report = Unit(
        "t/report", write, [str(out / "r.txt"), "R"], [out / "r.txt"], deps=("t/b",), always_run=True
    )
    assert (
        run_single(report, {**by_name, "t/report": report}, markers) == 0
        and (out / "r.txt").read_text() == "R"
    )


def test_emit_slurm_writes_arrays_by_dependency_level(tmp_path, capsys):
    slurm = tmp_path / "slurm"
    argv = ["urepa", "--profile", "tiny", "--out", str(tmp_path / "out"), "--settings", "A", "lambda0",
            "--set", "eval_every=2"]  # fmt: skip
    assert main([*argv, "--emit_slurm", str(slurm)]) == 0
    levels = [(slurm / f"level_{k}.txt").read_text().split() for k in range(5)]
    assert levels == [
        ["urepa/subset/A", "urepa/clip"], ["urepa/caches/A/shard-0"], ["urepa/train/A", "urepa/train/lambda0"],
        ["urepa/eval/A/2", "urepa/eval/lambda0/2"], ["urepa/report"],
    ]  # fmt: skip
    submit = (slurm / "submit.sh").read_text()
    assert (
        submit.count("sbatch --parsable") == 5
        and "--dependency=afterany:$prev" in submit
        and "--array=0-1" in submit
    )
    task = slurm / "reproduce_unit.sbatch"
    for script in (task, slurm / "submit.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = task.read_text()
    assert (
        "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text
    )
    env = dict(os.environ, DRY_RUN="1", SLURM_ARRAY_TASK_ID="1", UNITS_FILE=str(slurm / "level_2.txt"))
    res = subprocess.run(["bash", str(task)], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert "--unit urepa/train/lambda0" in res.stdout and "--profile tiny" in res.stdout
    plan = json.loads((slurm / "plan.json").read_text())
    assert [u["level"] for u in plan["units"] if u["unit"] == "urepa/report"] == [4]
    # a task whose dependencies are not complete refuses to run (exit 1) and names them
    assert main([*argv, "--unit", "urepa/train/A"]) == 1
    assert "dependencies not complete: urepa/caches/A/shard-0, urepa/clip" in capsys.readouterr().err


def test_published_figures_have_sources_and_no_invented_numbers():
    rows = list(csv.DictReader(open(PUBLISHED_CSV, newline="")))
    assert rows and all(r["source"].strip() for r in rows)
    for r in rows:
        if r["status"] in ("not available offline", "no published figure"):
            assert r["value"] == "", r  # never a number where the figure could not be read
        else:
            assert r["value"] and r["status"] in ("published (other protocol)", "target (not a result)"), r
    assert {r["table"] for r in rows if r["plan"] == "dualanodiff"} == {
        "generation_quality", "localization", "classification"
    }  # fmt: skip


def test_cli_help_explains(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--dry_run" in text and "never deletes" in text and "--emit_slurm" in text
    with pytest.raises(SystemExit):
        main(["dualanodiff", "--help"])
    assert "seed 000" in capsys.readouterr().out


def test_runner_in_process_reports_failures_and_goes_on(tmp_path):
    bad = _script(tmp_path, "bad", "def main(argv):\n    raise RuntimeError('boom')\n")
    ok = _script(tmp_path, "ok", "def main(argv):\n    Path(argv[0]).write_text('x')\n")
    out = tmp_path / "out"
    out.mkdir()
    units = [Unit("t/bad", bad, [], [out / "never"]), Unit("t/ok", ok, [str(out / "x")], [out / "x"])]
    outcome = Runner(Markers(out), [None], in_process=True, log=lambda s: None).run(units)
    assert outcome.failed == {"t/bad": "exit 1"} and outcome.ran == ["t/ok"] and outcome.exit_code() == 1


@pytest.mark.skipif(sys.platform != "linux", reason="process groups")
def test_sigterm_reaches_the_running_unit(tmp_path):
    """The driver passes SIGTERM on to its units (trainers checkpoint and exit 75) and exits 75 itself."""
    slow = _script(
        tmp_path, "slow",
        "import signal, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
        "Path(sys.argv[1]).write_text('started')\ntime.sleep(60)\n",
    )  # fmt: skip
    driver = tmp_path / "driver.py"
    driver.write_text(
        f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom pathlib import Path\n"
        "from script.reproduce.execute import Runner, run_single\nfrom script.reproduce.units import Markers, Unit\n"
        f"out = Path({str(tmp_path)!r})\n"
        f"u = Unit('t/slow', {slow!r}, [str(out / 'flag')], [out / 'never'])\n"
        "sys.exit(Runner(Markers(out), [None]).run([u]).exit_code())\n"
    )
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    import time

    deadline = time.time() + 60
    while not (tmp_path / "flag").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.terminate()
    assert proc.wait(timeout=30) == 75
    assert b"passed on to 1 running unit" in proc.stdout.read()
