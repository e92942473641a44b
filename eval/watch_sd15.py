"""Evaluate every new U-REPA checkpoint while training runs: FID/sFID per checkpoint, one FID-vs-step plot.

    python eval/watch_sd15.py --run_dir outputs/sd15_repa_A --baseline_dir outputs/sd15_repa_ablation_lambda0 \
        --out_dir outputs/eval_A --every 5000 --until_step 400000 -- \
        --ref_dir /data/ILSVRC/Data/CLS-LOC/val --num_samples 10000 --sampler ddpm --num_steps 250 \
        --inception_path ~/weights/inception-2015-12-05.pt

Polls the run folders every ``--interval`` seconds. Each complete checkpoint (``checkpoint-<step>``; a half-written
``.checkpoint-*.partial`` is never picked) whose step is a multiple of ``--every`` and that has no result yet
(``<out_dir>/<run>/checkpoint-<step>.json``) is evaluated by ``eval/evaluate_sd15.py`` with the flags after
``--``, oldest first; each evaluation rewrites ``<out_dir>/fid_vs_step.png`` from every result there, so the
aligned and the baseline curves grow in one plot. ``--launcher`` runs the evaluation on several GPUs (e.g.
``"accelerate launch --config_file configs/accelerate/8gpu_ddp.yaml"``); a killed evaluation is continued by the
next poll (its samples are resumable). ``--once`` evaluates what is there and exits (a cron or SLURM job chained
after each training allocation); without it the watcher exits once ``--until_step`` is evaluated.

Keep the checkpoints until they are evaluated: with ``checkpoints_total_limit`` the trainer prunes old ones, and a
checkpoint pruned before its turn is reported and skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import shlex
import subprocess
import time

from utils.checkpoint import checkpoint_step, list_checkpoints
from utils.cli import UserError, run_cli
from utils.logging import get_logger

logger = get_logger("watch_sd15")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to eval/evaluate_sd15.py unchanged, e.g. --ref_dir --num_ref --num_samples "
        "--sampler --num_steps --cfg_scale --guidance_low --guidance_high --batch_size --seed --mixed_precision "
        "--allow_tf32 --inception_path --fid_mode --stats_cache --grid_classes (see its --help).",
    )
    p.add_argument("--run_dir", nargs="+", required=True, help="train_sd15.py output_dir(s) of aligned runs.")
    p.add_argument("--baseline_dir", nargs="*", default=[], help="output_dir(s) of baseline (lambda 0) runs.")
    p.add_argument(
        "--out_dir", required=True, help="evaluate_sd15.py --out_dir: results and fid_vs_step.png."
    )
    p.add_argument(
        "--every", type=int, default=5000, help="Evaluate checkpoints whose step is a multiple of this."
    )
    p.add_argument("--interval", type=float, default=300.0, help="Seconds between polls.")
    p.add_argument(
        "--until_step", type=int, default=None, help="Exit once this step is evaluated in every run."
    )
    p.add_argument("--once", action="store_true", help="Evaluate what is there now, then exit.")
    p.add_argument(
        "--launcher",
        default=sys.executable,
        help="How evaluate_sd15.py is started (default: this Python); e.g. 'accelerate launch --config_file "
        "configs/accelerate/8gpu_ddp.yaml' to share the sampling over 8 GPUs.",
    )
    args = p.parse_args(own)
    args.evaluate_args = passthrough
    if args.every < 1:
        p.error("--every must be >= 1")
    if not args.once and args.until_step is None:
        p.error("give --until_step (the run's last step) or --once, so that the watcher knows when to stop")
    if any(flag in passthrough for flag in ("--checkpoints", "--baseline", "--out_dir")):
        p.error(
            "--checkpoints/--baseline/--out_dir are set by the watcher; pass --run_dir/--baseline_dir/--out_dir"
        )
    return args


def pending(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(kind, checkpoint) not evaluated yet, oldest step first."""
    todo = []
    for kind, dirs in (("aligned", args.run_dir), ("baseline", args.baseline_dir)):
        for run_dir in map(Path, dirs):
            for ckpt in list_checkpoints(run_dir):
                step = checkpoint_step(ckpt)
                done = Path(args.out_dir) / run_dir.name / f"checkpoint-{step}.json"
                if step % args.every == 0 and not done.is_file():
                    todo.append((kind, ckpt))
    return sorted(todo, key=lambda kc: (checkpoint_step(kc[1]), kc[0]))


def finished(args: argparse.Namespace) -> bool:
    return all(
        (Path(args.out_dir) / Path(d).name / f"checkpoint-{args.until_step}.json").is_file()
        for d in [*args.run_dir, *args.baseline_dir]
    )


def evaluate(args: argparse.Namespace, kind: str, ckpt: Path) -> bool:
    flag = "--checkpoints" if kind == "aligned" else "--baseline"
    cmd = [*shlex.split(args.launcher), str(REPO / "eval" / "evaluate_sd15.py"), flag, str(ckpt)]
    cmd += ["--out_dir", str(args.out_dir), *args.evaluate_args]
    logger.info("evaluating %s (%s): %s", ckpt, kind, shlex.join(cmd))
    if not ckpt.is_dir():
        logger.warning("%s was pruned before its evaluation: skipped (raise checkpoints_total_limit)", ckpt)
        return False
    status = subprocess.run(cmd, cwd=REPO).returncode
    if status != 0:
        logger.warning("evaluation of %s failed (exit %d); it is retried at the next poll", ckpt, status)
    return status == 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [d for d in [*args.run_dir, *args.baseline_dir] if not Path(d).is_dir() and args.once]
    if missing:
        raise UserError(f"no such run folder: {', '.join(missing)}")
    evaluated = 0
    while True:
        for kind, ckpt in pending(args):
            evaluated += evaluate(args, kind, ckpt)
        if args.once or (args.until_step is not None and finished(args)):
            logger.info(
                "%d checkpoints evaluated; curve: %s", evaluated, Path(args.out_dir) / "fid_vs_step.png"
            )
            return evaluated
        time.sleep(args.interval)


if __name__ == "__main__":
    run_cli(main)
