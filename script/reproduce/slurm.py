"""``--emit_slurm DIR``: the plan's incomplete units as SLURM job arrays, one array per dependency level, chained
with ``--dependency=afterany``.

Written to DIR: ``level_<k>.txt`` (the units of level k, one per line: every unit of level k depends only on
units of lower levels), ``reproduce_unit.sbatch`` (array task i runs the unit on line i+1 of ``$UNITS_FILE`` as
``run.py <the same plan options> --unit NAME``), ``submit.sh`` (submits the levels in order, each after the
previous one has ended) and ``plan.json`` (every unit: command, dependencies, level, GPU-hour estimate).

``afterany`` rather than ``afterok``: an array job is "ok" only if all its tasks are, so one failed unit would
stop every later level. Instead each task checks its own dependencies' completion markers and refuses to run
(exit 1, naming them) when one is not complete, so the units that do not depend on a failure still run, and the
report (last level) shows what is missing. Resubmitting ``submit.sh`` runs only what is not complete.

The task script follows script/slurm/'s conventions: submit from the repository root, ``--open-mode=append``,
``--signal=B:USR1@300`` passed on to the unit (the trainers checkpoint and exit 75), then ``scontrol requeue``
(``REQUEUE=0`` disables it), ``DRY_RUN=1`` prints the command.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from script.reproduce.estimate import gpu_hours
from script.reproduce.units import Plan, Unit
from utils.checkpoint import atomic_write

TASK_TEMPLATE = r"""#!/usr/bin/env bash
# One unit of the "{plan}" reproduction plan per array task: the unit on line SLURM_ARRAY_TASK_ID+1 of $UNITS_FILE.
# Written by script/reproduce/run.py --emit_slurm; submit everything with: bash {submit}
# (or one level by hand: UNITS_FILE={dir}/level_0.txt sbatch --array=0-N {script})
# A task whose dependencies are not complete exits 1 naming them; a complete unit exits 0 at once.
# SIGUSR1 5 minutes before the time limit (or SIGTERM) is passed on to the unit: trainers write a checkpoint and
# exit 75, and the task is requeued (REQUEUE=0: not); the requeued task resumes from that checkpoint.
#SBATCH --job-name=repro-{plan}
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=16
#SBATCH --time={time}
#SBATCH --output=slurm-%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-.}}"
: "${{UNITS_FILE:?set UNITS_FILE to a level_<k>.txt of {dir}}}"
: "${{SLURM_ARRAY_TASK_ID:?run with sbatch --array=0-(lines of UNITS_FILE - 1)}}"
UNIT=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$UNITS_FILE")
[ -n "$UNIT" ] || {{ echo "no line $((SLURM_ARRAY_TASK_ID + 1)) in $UNITS_FILE" >&2; exit 2; }}
PY=${{PYTHON:-$( [ -x .env/bin/python ] && echo .env/bin/python || command -v python3 )}}
cmd=("$PY" script/reproduce/run.py {driver_args} --unit "$UNIT")
echo "[task ${{SLURM_ARRAY_TASK_ID}}, start ${{SLURM_RESTART_COUNT:-0}}] ${{cmd[*]}}" >&2
if [ "${{DRY_RUN:-0}}" = "1" ]; then
  printf '%q ' "${{cmd[@]}}"
  echo
  exit 0
fi
signalled=""
on_signal() {{
  signalled=$1
  echo "$1 received: passed on to the unit (trainers checkpoint and exit 75)" >&2
  kill "-$1" "$child" 2>/dev/null || true
}}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
"${{cmd[@]}}" &
child=$!
while :; do
  status=0
  wait "$child" || status=$?
  kill -0 "$child" 2>/dev/null || break  # a trapped signal interrupts `wait`: wait again
done
if [ "$signalled" = USR1 ] && [ "${{REQUEUE:-1}}" = "1" ] && [ -n "${{SLURM_JOB_ID:-}}" ]; then
  echo "requeueing ${{SLURM_JOB_ID}}: the unit resumes from its latest checkpoint" >&2
  scontrol requeue "${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit "$status"
"""

SUBMIT_TEMPLATE = r"""#!/usr/bin/env bash
# Submit the "{plan}" plan's incomplete units ({n_units} units, {n_levels} levels; estimate {hours:.1f} GPU-hours)
# as one job array per level, each level after the previous one ended (afterany; a unit checks its own
# dependencies). Run from the repository root: bash {submit}
set -euo pipefail
{cd_root}
SBATCH_ARGS=${{SBATCH_ARGS:-}}   # e.g. "--partition=gpu --account=me" (word-split)
prev=""
{levels}
echo "submitted; the last job ($prev) writes the tables under {tables}"
"""


def levels(units: Sequence[Unit]) -> dict[str, int]:
    """Level of each unit: 0 without a dependency among ``units``, else 1 + the deepest dependency's level."""
    names = {u.name for u in units}
    by_name = {u.name: u for u in units}
    level: dict[str, int] = {}

    def visit(name: str) -> int:
        if name not in level:
            deps = [d for d in by_name[name].deps if d in names]
            level[name] = 1 + max((visit(d) for d in deps), default=-1)
        return level[name]

    for u in units:
        visit(u.name)
    return level


def emit(
    plan: Plan, units: Sequence[Unit], driver_args: Sequence[str], out_dir: Path, time: str
) -> list[Path]:
    """Write the arrays of ``units`` (the incomplete ones, report last) to ``out_dir``; the paths written."""
    from script.reproduce.units import REPO_ROOT

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    level = levels(units)
    n_levels = 1 + max(level.values(), default=-1)
    written = []
    task = out_dir / "reproduce_unit.sbatch"
    submit = out_dir / "submit.sh"
    if out_dir.is_relative_to(REPO_ROOT):  # the repository may move with the folder: relative
        cd_root = 'cd "$(dirname "$0")/' + "/".join([".."] * len(out_dir.relative_to(REPO_ROOT).parts)) + '"'
    else:
        cd_root = f"cd {shlex.quote(str(REPO_ROOT))}"
    lines = []
    for k in range(n_levels):
        names = [u.name for u in units if level[u.name] == k]
        path = out_dir / f"level_{k}.txt"
        with atomic_write(path) as tmp:
            tmp.write_text("".join(n + "\n" for n in names))
        written.append(path)
        dep = "${prev:+--dependency=afterany:$prev}"
        lines.append(
            f"prev=$(sbatch --parsable $SBATCH_ARGS {dep} --array=0-{len(names) - 1} "
            f"--export=ALL,UNITS_FILE={shlex.quote(str(path))} {shlex.quote(str(task))})  # level {k}: "
            f"{len(names)} units"
        )
    hours = sum(gpu_hours(u.flops, u.precision) or 0.0 for u in units)
    with atomic_write(task) as tmp:
        tmp.write_text(TASK_TEMPLATE.format(
            plan=plan.name, submit=submit, dir=out_dir, script=task, time=time,
            driver_args=" ".join(shlex.quote(a) for a in driver_args),
        ))  # fmt: skip
    task.chmod(0o755)
    with atomic_write(submit) as tmp:
        tmp.write_text(SUBMIT_TEMPLATE.format(
            plan=plan.name, n_units=len(units), n_levels=n_levels, hours=hours, submit=submit, cd_root=cd_root,
            levels="\n".join(lines), tables=plan.out / "tables",
        ))  # fmt: skip
    submit.chmod(0o755)
    record = [
        {"unit": u.name, "level": level[u.name], "deps": list(u.deps), "command": u.shell(),
         "gpu_hours": gpu_hours(u.flops, u.precision), "precision": u.precision}
        for u in units
    ]  # fmt: skip
    with atomic_write(out_dir / "plan.json") as tmp:
        tmp.write_text(
            json.dumps({"plan": plan.name, "driver_args": list(driver_args), "units": record}, indent=1)
        )
    return [*written, task, submit, out_dir / "plan.json"]
