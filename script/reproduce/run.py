"""One command per paper table: plan the units of a reproduction, run what is not done yet, survive crashes, end
with the tables (published figures beside ours).

    python script/reproduce/run.py dualanodiff --mvtec_root datasets/mvtec_ad --dry_run     # every unit, GPU-hours
    python script/reproduce/run.py dualanodiff --mvtec_root datasets/mvtec_ad              # run on the visible GPUs
    python script/reproduce/run.py dualanodiff --classes hazelnut bottle --variants dual --set fg_mask_dir=masks
    python script/reproduce/run.py urepa --imagenet_root /data/imagenet --settings A lambda0 --emit_slurm slurm/
    python script/reproduce/run.py urepa --profile tiny --in_process                      # tiny assets, CPU, minutes

Plans: ``dualanodiff`` (MVTec AD: every class and defect type found on disk, or --classes; variants dual,
bcm, dino = seed 000's DINOv2 loss) and ``urepa`` (seed 004: settings A and B and the ablations). A plan is a list
of units: one entry-point command each, with declared outputs, a completeness check and a GPU-hour estimate.

- A unit whose outputs are complete (its completion marker exists and its outputs pass the check) is skipped;
  a failed or killed unit runs again with the same command, and the entry point resumes (trainers from their
  latest checkpoint, generation from the files it has). The driver never deletes anything.
- Locally: one unit per visible GPU at a time (``--gpus``, else CUDA_VISIBLE_DEVICES, else all), one at a time
  without a GPU; each in its own process (logs under <out>/.reproduce/logs/), or all inside this process with
  ``--in_process`` (no start-up cost per unit; what the tests use).
- ``--emit_slurm DIR`` writes job arrays (one per dependency level) and submit.sh instead of running.
- ``--dry_run`` lists every unit with its status, command and GPU-hour estimate (how it is estimated: printed
  with the list and in docs/reproduce.md).
- The last unit writes <out>/tables/: one markdown + CSV table per paper table (per class and the mean, the
  published figures beside ours with their sources, each row's deviations from the paper's protocol) and the
  plots. ``--report_only`` redraws them from what exists.

``--profile tiny`` runs the same plan on the offline tiny assets (random-weight stand-in models, synthetic MVTec
classes and ImageNet, a step or two per trainer): every number is meaningless, and every row says so through
its deviations. ``--set KEY=VALUE`` changes one setting (``--dry_run`` lists them; a value off the paper's is a
deviation carried by the rows it affects). Details: docs/reproduce.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import fnmatch
import json
import time
from collections import defaultdict

from script.reproduce import dualanodiff, urepa
from script.reproduce.estimate import HOW, gpu_hours, load_counts
from script.reproduce.execute import Outcome, Runner, run_single, visible_gpus
from script.reproduce.units import REPO_ROOT, STATE_DIR, Markers, Plan, Unit
from utils.checkpoint import atomic_write
from utils.cli import UserError, run_cli

PROFILES = ("paper", "tiny")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("plan")
    g.add_argument(
        "--out", default=None, help="where everything goes (default outputs/reproduce/<plan>[-tiny])"
    )
    g.add_argument(
        "--profile", choices=PROFILES, default="paper",
        help="paper: the paper's protocol (real weights and data); tiny: the offline tiny assets, a step or two "
        "per trainer, random metric networks (numbers meaningless; CPU minutes)",
    )  # fmt: skip
    g.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="change a setting (e.g. num_images=100 loc_steps=3200); --dry_run lists every setting",
    )  # fmt: skip
    m = common.add_argument_group("mode (default: run what is not complete, then write the tables)")
    m.add_argument(
        "--dry_run", action="store_true", help="list every unit (status, command, estimate); run nothing"
    )
    m.add_argument(
        "--emit_slurm", metavar="DIR", help="write SLURM job arrays for the incomplete units; run nothing"
    )
    m.add_argument("--slurm_time", default="24:00:00", help="--time of each array task (default 24:00:00)")
    m.add_argument("--report_only", action="store_true", help="only (re)write the tables from what exists")
    m.add_argument("--unit", metavar="NAME", help="run this one unit (what each SLURM array task does)")
    r = common.add_argument_group("running")
    r.add_argument("--in_process", action="store_true",
                   help="run the units one after the other inside this process (main(argv) of each entry point) "
                   "instead of one process each; no crash isolation, no start-up cost")  # fmt: skip
    r.add_argument(
        "--gpus", default=None, help="GPU ids to use, e.g. 0,1,2 (default: CUDA_VISIBLE_DEVICES / all)"
    )
    r.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                   help="run only the units whose names match (fnmatch), e.g. 'dualanodiff/dual/*/hazelnut*'")  # fmt: skip
    r.add_argument("--flop_counts", default=None, metavar="FILE",
                   help="FLOP counts for the estimates (default: counted once, cached in .cache/reproduce/)")  # fmt: skip
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = p.add_subparsers(dest="plan", required=True, metavar="PLAN")
    d = sub.add_parser(
        "dualanodiff", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="DualAnoDiff on MVTec AD (+ BCM, + seed 000's DINOv2 loss)", description=dualanodiff.__doc__,
    )  # fmt: skip
    d.add_argument(
        "--mvtec_root", default=None, help="MVTec AD root (default datasets/mvtec_ad; tiny: the tiny set)"
    )
    d.add_argument(
        "--classes", nargs="+", default=None, help="a subset of the classes (default: every one on disk)"
    )
    d.add_argument("--variants", nargs="+", choices=dualanodiff.VARIANTS, default=list(dualanodiff.VARIANTS),
                   help="variants to plan (default: all; bcm needs foreground masks, see above)")  # fmt: skip
    u = sub.add_parser(
        "urepa", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="U-REPA on SD-1.5 (seed 004): settings A, B and the ablations", description=urepa.__doc__,
    )  # fmt: skip
    u.add_argument("--imagenet_root", default=None,
                   help="ImageNet root holding ILSVRC/Data/CLS-LOC/{train,val} (default datasets/imagenet)")  # fmt: skip
    u.add_argument("--settings", nargs="+", default=list(urepa.CONFIGS), metavar="SETTING",
                   help=f"settings to run (default: all): {', '.join(urepa.CONFIGS)}")  # fmt: skip
    p.epilog += (
        "\n\nEvery option, per plan (run.py PLAN --help explains each):\n"
        + d.format_usage()
        + u.format_usage()
    )
    return p


def _abs(path: str | Path) -> Path:
    p = Path(path)
    return p.resolve() if p.is_absolute() else (Path.cwd() / p).resolve()


def plan_args(args: argparse.Namespace) -> list[str]:
    """The options that define the plan (what --unit, --report_only and the SLURM tasks repeat)."""
    out = [args.plan, "--out", str(args.out), "--profile", args.profile]
    if args.plan == "dualanodiff":
        out += ["--mvtec_root", str(args.mvtec_root), "--variants", *args.variants]
        if args.classes:
            out += ["--classes", *args.classes]
    else:
        out += ["--imagenet_root", str(args.imagenet_root), "--settings", *args.settings]
    if args.overrides:
        out += ["--set", *args.overrides]
    return out


def make_plan(args: argparse.Namespace, counts: dict[str, float] | None) -> Plan:
    tiny = args.profile == "tiny"
    if tiny:
        from preprocessing.make_tiny_assets import ensure_tiny_assets

        ensure_tiny_assets(REPO_ROOT / ".cache" / "tiny")
    module = dualanodiff if args.plan == "dualanodiff" else urepa
    s = module.settings()
    if tiny:
        s.apply(module.TINY, "--profile tiny")
    s.apply_overrides(args.overrides)
    if args.plan == "dualanodiff" and s.v("random_metric_networks") and not s.v("inception_path"):
        # one seeded random TorchScript Inception for every IS unit (compute_is.py --random_weights would build
        # the full 27M-parameter network per unit: tens of seconds each on a CPU); same role, same meaninglessness
        path = args.out / STATE_DIR / "random_inception.pt"
        if not path.is_file() and not args.dry_run:
            from models.inception import write_random_torchscript_inception

            with atomic_write(path) as tmp:
                write_random_torchscript_inception(tmp)
        s["inception_path"].value = str(path)
    report = Unit(
        name=f"{args.plan}/report", entry="script/reproduce/run.py", args=[*plan_args(args), "--report_only"],
        outputs=[args.out / "tables" / "README.md"], always_run=True, estimate_note="CPU only", precision="fp32",
    )  # fmt: skip
    if args.plan == "dualanodiff":
        return dualanodiff.build_plan(s, args.mvtec_root, args.out, args.classes, list(args.variants), counts,
                                      args.profile, report)  # fmt: skip
    return urepa.build_plan(
        s, args.imagenet_root, args.out, list(args.settings), counts, args.profile, report
    )


def write_report(plan: Plan) -> list[Path]:
    from script.reproduce.tables import write_index

    written = plan.report(plan)
    written.append(write_index(plan, written))
    return written


def unit_kind(name: str) -> str:
    parts = name.split("/")
    return parts[2] if parts[0] == "dualanodiff" and len(parts) > 2 and parts[1] != "fg_masks" else parts[1]


def print_dry_run(plan: Plan, counts: dict[str, float] | None) -> None:
    markers = Markers(plan.out)
    print(f"plan {plan.name}, profile {plan.profile}: {len(plan.units)} units, outputs under {plan.out}")
    if plan.name == "dualanodiff":
        classes = plan.info["classes"]
        print(f"variants: {' '.join(plan.info['variants'])}")
        print(f"classes ({len(classes)}, {sum(map(len, classes.values()))} defect types): "
              + "; ".join(f"{c}: {' '.join(d)}" for c, d in classes.items()))  # fmt: skip
    else:
        print(f"settings: {' '.join(plan.info['settings'])}")
    for note in plan.notes:
        print(f"note: {note}")
    print("\nsettings (value / paper's value):")
    for name, s in plan.settings.items():
        flag = "  DEVIATION" if s.deviates else ""
        print(f"  {name} = {s.value}  (paper: {s.paper}){flag}  - {s.help}")
    legend = plan.deviation_legend()
    print("\ndeviations from the paper's protocol (carried by the table rows they affect):")
    for k, text in legend.items():
        print(f"  {k}: {text}")
    if not legend:
        print("  none")
    print("\nestimate: " + (HOW if counts is not None else "not made: the counts are for the paper's SD-1.5-size "
                            "models, the tiny profile runs stand-ins (minutes on a CPU)"))  # fmt: skip
    print()
    totals: dict[str, float] = defaultdict(float)
    todo_hours = all_hours = 0.0
    n_todo = 0
    for unit in plan.units:
        status, detail = markers.status(unit)
        hours = gpu_hours(unit.flops, unit.precision)
        h = f"{hours:9.2f}" if hours is not None else "        -"
        print(
            f"[{status}] {unit.name}  GPU-h {h.strip()} ({unit.precision})"
            + (f"  ({detail})" if detail else "")
        )
        print(f"    {unit.shell()}")
        if unit.deps and not unit.always_run:
            print(f"    after: {', '.join(unit.deps)}")
        if unit.estimate_note:
            print(f"    estimate: {unit.estimate_note}")
        if hours is not None:
            all_hours += hours
            totals[unit_kind(unit.name)] += hours
        if status != "complete":
            n_todo += 1
            todo_hours += hours or 0.0
    print(f"\n{len(plan.units)} units, {len(plan.units) - n_todo} complete, {n_todo} to run")
    if counts is not None:
        print(f"estimate: {todo_hours:,.1f} GPU-hours to run ({all_hours:,.1f} for the whole plan); by kind: "
              + ", ".join(f"{k} {v:,.1f}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])))  # fmt: skip
        print(
            f"  on 8 GPUs at least {todo_hours / 8:,.1f} h wall-clock (more where dependencies serialise units)"
        )


def record_run(plan: Plan, outcome: Outcome, seconds: float) -> None:
    """Append what this invocation did to <out>/.reproduce/runs.jsonl (and the tests read it)."""
    path = plan.out / STATE_DIR / "runs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1), "ran": outcome.ran,
           "skipped": outcome.skipped, "failed": outcome.failed, "blocked": outcome.blocked,
           "preempted": outcome.preempted}  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def resolve_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed options with the profile's defaults filled in and every path absolute."""
    args = build_parser().parse_args(argv)
    tiny = args.profile == "tiny"
    if args.plan == "dualanodiff":
        args.mvtec_root = _abs(
            args.mvtec_root or (REPO_ROOT / dualanodiff.TINY_MVTEC if tiny else "datasets/mvtec_ad")
        )
    else:
        args.imagenet_root = _abs(
            args.imagenet_root or (REPO_ROOT / urepa.TINY_IMAGENET if tiny else "datasets/imagenet")
        )
    args.out = _abs(args.out or f"outputs/reproduce/{args.plan}{'-tiny' if tiny else ''}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    tiny = args.profile == "tiny"
    modes = [m for m in ("dry_run", "emit_slurm", "report_only", "unit") if getattr(args, m)]
    if len(modes) > 1:
        raise UserError(f"--{' and --'.join(modes)}: choose one")
    estimating = (args.dry_run or args.emit_slurm) and not tiny
    counts = load_counts(args.flop_counts) if estimating else None
    plan = make_plan(args, counts)
    if args.report_only:
        for path in write_report(plan):
            print(f"wrote {path}")
        return 0
    by_name = plan.by_name()
    if args.unit:
        if args.unit not in by_name:
            raise UserError(f"--unit {args.unit}: not in the plan (--dry_run lists the units)")
        return run_single(by_name[args.unit], by_name, Markers(plan.out))
    if args.dry_run:
        print_dry_run(plan, counts)
        return 0
    markers = Markers(plan.out)
    units = plan.units
    if args.only:
        units = [u for u in units if u.always_run or any(fnmatch.fnmatch(u.name, p) for p in args.only)]
        if len(units) <= 1:
            raise UserError(f"--only {' '.join(args.only)}: matches no unit (--dry_run lists them)")
    if args.emit_slurm:
        from script.reproduce.slurm import emit

        todo = [u for u in units if not markers.is_complete(u)]
        written = emit(plan, todo, plan_args(args), _abs(args.emit_slurm), args.slurm_time)
        print(f"{len(todo)} incomplete units of {len(units)}; wrote:")
        for path in written:
            print(f"  {path}")
        print(f"submit from the repository root: bash {written[-2]}")
        return 0
    gpus = [None] if args.in_process else visible_gpus(args.gpus)
    start = time.perf_counter()
    outcome = Runner(markers, gpus, in_process=args.in_process).run(units)
    record_run(plan, outcome, time.perf_counter() - start)
    print(f"\n{len(outcome.ran)} units ran, {len(outcome.skipped)} were complete, {len(outcome.failed)} failed, "
          f"{len(outcome.blocked)} blocked, {len(outcome.preempted)} preempted; tables: {plan.out / 'tables'}")  # fmt: skip
    for name, why in {**outcome.failed, **{k: f"needs {v}" for k, v in outcome.blocked.items()}}.items():
        print(f"  {name}: {why}")
    return outcome.exit_code()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
