"""Run a plan's units on this machine: one unit per visible GPU at a time (on a machine without a GPU: one at a
time), each as its own process (default: a crash stays in its process) or, with ``in_process``, one after the
other inside the driver's process (``main(argv)`` of the entry point: no interpreter and library start-up per
unit).

Complete units are skipped; a unit runs when every unit it depends on is complete; a unit whose dependency
failed is reported as blocked and the others go on. After a unit exits 0 its outputs are checked, then its
completion marker is written (units.Markers). SIGTERM / SIGUSR1 / SIGINT to the driver are passed on to the
running units (the trainers checkpoint and exit 75, docs/scaling.md) and the driver then exits 75 as well, so a
SLURM requeue or a plain rerun continues. Nothing here deletes a file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from script.reproduce.units import REPO_ROOT, Markers, Unit

PREEMPTED_EXIT = 75  # the training core's exit status after a checkpoint on SIGTERM/SIGUSR1


@dataclass
class Outcome:
    """What one run of the driver did, unit by unit."""

    ran: list[str] = field(default_factory=list)  # completed during this run (marker written)
    skipped: list[str] = field(default_factory=list)  # complete before this run
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    blocked: dict[str, str] = field(default_factory=dict)  # name -> the dependency that is not complete
    preempted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.failed or self.blocked or self.preempted)

    def exit_code(self) -> int:
        if self.preempted:
            return PREEMPTED_EXIT
        return 0 if self.ok else 1


def visible_gpus(spec: str | None = None) -> list[str | None]:
    """GPU ids to run units on: ``--gpus 0,1``, else CUDA_VISIBLE_DEVICES, else what torch sees; [None] = CPU."""
    if spec is None:
        spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        try:
            import torch

            spec = ",".join(str(i) for i in range(torch.cuda.device_count()))
        except ImportError:  # pragma: no cover - torch is a requirement
            spec = ""
    gpus = [g.strip() for g in spec.split(",") if g.strip() and g.strip() != "-1"]
    return gpus or [None]


def unit_env(gpu: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # a unit never downloads; missing weights are an error naming them
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


class Runner:
    """Schedules units over GPU slots; see the module docstring."""

    def __init__(
        self,
        markers: Markers,
        gpus: Sequence[str | None],
        in_process: bool = False,
        python: str = sys.executable,
        log: Callable[[str], None] = print,
    ):
        self.markers = markers
        self.gpus = list(gpus)
        self.in_process = in_process
        self.python = python
        self.log = log
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._signalled: int | None = None
        self._planned: set[str] = set()

    # --- one unit ---------------------------------------------------------------------------------------

    def _run_subprocess(self, unit: Unit, gpu: str | None) -> int:
        log_path = self.markers.log_path(unit)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {unit.shell(self.python)}\n")
            f.flush()
            with self._lock:
                if self._signalled is not None:
                    return PREEMPTED_EXIT
                proc = subprocess.Popen(
                    unit.command(self.python),
                    cwd=REPO_ROOT,
                    env=unit_env(gpu),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
                self._procs[unit.name] = proc
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(unit.name, None)

    def _run_in_process(self, unit: Unit) -> int:
        from script.replicas.summary import load_main

        try:
            load_main(unit.entry)(list(unit.args))
        except SystemExit as err:
            code = err.code
            return 0 if code in (None, 0) else (code if isinstance(code, int) else 1)
        except KeyboardInterrupt:
            raise
        except Exception:  # a failing unit must not end the driver: report it, go on with the others
            traceback.print_exc()
            return 1
        return 0

    def run_one(self, unit: Unit, gpu: str | None) -> tuple[int, float]:
        self.markers.mark_running(unit)
        start = time.perf_counter()
        code = self._run_in_process(unit) if self.in_process else self._run_subprocess(unit, gpu)
        return code, time.perf_counter() - start

    def finish(self, unit: Unit, code: int, seconds: float, outcome: Outcome) -> bool:
        """Record the result; the marker only after exit 0 and complete outputs."""
        if code == PREEMPTED_EXIT:
            outcome.preempted.append(unit.name)
            self.log(f"  preempted  {unit.name} (checkpointed; run again to continue)")
            return False
        if code != 0:
            outcome.failed[unit.name] = f"exit {code}"
            self.log(f"  FAILED     {unit.name}: exit {code} after {seconds:.1f} s{self._log_tail(unit)}")
            return False
        problems = unit.problems()
        if problems:
            outcome.failed[unit.name] = "outputs incomplete: " + "; ".join(problems[:3])
            self.log(f"  FAILED     {unit.name}: exited 0 but {outcome.failed[unit.name]}")
            return False
        self.markers.mark_done(unit, seconds, python=self.python)
        outcome.ran.append(unit.name)
        self.log(f"  done       {unit.name} ({seconds:.1f} s)")
        return True

    def _log_tail(self, unit: Unit, lines: int = 15) -> str:
        path = self.markers.log_path(unit)
        if self.in_process or not path.is_file():
            return ""
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        return f"; log {path}:\n" + "\n".join("      " + line for line in tail)

    # --- signals ----------------------------------------------------------------------------------------

    def _forward(self, signum, frame) -> None:
        with self._lock:
            self._signalled = signum
            procs = list(self._procs.values())
        self.log(f"signal {signal.Signals(signum).name}: passed on to {len(procs)} running unit(s)")
        for proc in procs:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass
        if self.in_process and signum == signal.SIGINT:
            raise KeyboardInterrupt

    @staticmethod
    def _install(handler) -> dict:
        old = {}
        if threading.current_thread() is not threading.main_thread():
            return old
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
        return old

    # --- the plan ---------------------------------------------------------------------------------------

    def run(self, units: Sequence[Unit]) -> Outcome:
        outcome = Outcome()
        state: dict[str, str] = {}
        todo: list[Unit] = []
        for unit in units:
            status, detail = self.markers.status(unit)
            if status == "complete":
                state[unit.name] = "complete"
                outcome.skipped.append(unit.name)
            else:
                if status in ("half-finished", "stale"):
                    self.log(f"  rerun      {unit.name}: {status}" + (f" ({detail})" if detail else ""))
                todo.append(unit)
        self.log(
            f"{len(outcome.skipped)} of {len(units)} units complete (skipped), {len(todo)} to run on "
            + (
                "this process"
                if self.in_process
                else ", ".join(f"GPU {g}" if g else "CPU" for g in self.gpus)
            )
        )
        old = self._install(self._forward)
        try:
            if self.in_process:
                self._loop_sequential(todo, state, outcome)
            else:
                self._loop_parallel(todo, state, outcome)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return outcome

    def _dep_state(self, unit: Unit, state: dict[str, str]) -> tuple[str, str]:
        """('ready' | 'wait' | 'blocked', the dependency that decides). The report (``always_run``) waits until
        every unit it lists has finished, failed or not: its tables show what is missing."""
        if unit.always_run:
            waiting = [d for d in unit.deps if d in self._planned and state.get(d) is None]
            return ("wait", waiting[0]) if waiting else ("ready", "")
        for dep in unit.deps:
            s = state.get(dep)
            if s == "complete":
                continue
            if s in ("failed", "blocked"):
                return "blocked", dep
            if s is None and dep not in self._planned:
                return "blocked", dep  # not selected in this run and not complete
            return "wait", dep
        return "ready", ""

    def _loop_sequential(self, todo: list[Unit], state: dict[str, str], outcome: Outcome) -> None:
        self._planned = {u.name for u in todo}
        for unit in todo:
            if self._signalled is not None:
                outcome.preempted.append(unit.name)
                continue
            ready, dep = self._dep_state(unit, state)
            if ready != "ready":
                outcome.blocked[unit.name] = dep
                state[unit.name] = "blocked"
                self.log(f"  blocked    {unit.name}: {dep} is not complete")
                continue
            self.log(f"  start      {unit.name}")
            code, seconds = self.run_one(unit, None)
            state[unit.name] = "complete" if self.finish(unit, code, seconds, outcome) else "failed"

    def _loop_parallel(self, todo: list[Unit], state: dict[str, str], outcome: Outcome) -> None:
        self._planned = {u.name for u in todo}
        pending = list(todo)
        free = list(self.gpus)
        running: dict[Future, tuple[Unit, str | None]] = {}
        with ThreadPoolExecutor(max_workers=len(self.gpus)) as pool:
            while pending or running:
                launched = True
                while launched and free and self._signalled is None:
                    launched = False
                    for unit in list(pending):
                        ready, dep = self._dep_state(unit, state)
                        if ready == "blocked":
                            pending.remove(unit)
                            state[unit.name] = "blocked"
                            outcome.blocked[unit.name] = dep
                            self.log(f"  blocked    {unit.name}: {dep} is not complete")
                        elif ready == "ready":
                            pending.remove(unit)
                            gpu = free.pop(0)
                            where = f"GPU {gpu}" if gpu is not None else "CPU"
                            self.log(
                                f"  start      {unit.name} on {where} (log {self.markers.log_path(unit)})"
                            )
                            running[pool.submit(self.run_one, unit, gpu)] = (unit, gpu)
                            launched = True
                            break
                if not running:
                    for unit in pending:  # nothing runs and nothing can start: stopped by a signal
                        outcome.preempted.append(unit.name)
                    break
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    unit, gpu = running.pop(fut)
                    free.append(gpu)
                    code, seconds = fut.result()
                    state[unit.name] = "complete" if self.finish(unit, code, seconds, outcome) else "failed"
        if self._signalled is not None:
            outcome.preempted.extend(u.name for u in pending if u.name not in outcome.preempted)


def run_single(
    unit: Unit, units_by_name: dict[str, Unit], markers: Markers, python: str = sys.executable
) -> int:
    """Run one unit by name (a SLURM array task): its dependencies must be complete (except for the report, which
    shows what is missing). Exit status of the unit."""
    missing = [] if unit.always_run else [d for d in unit.deps if not markers.is_complete(units_by_name[d])]
    if missing:
        print(f"{unit.name}: not run, dependencies not complete: {', '.join(missing)}", file=sys.stderr)
        return 1
    if markers.is_complete(unit):
        print(f"{unit.name}: complete, skipped")
        return 0
    runner = Runner(markers, [os.environ.get("CUDA_VISIBLE_DEVICES")], python=python)
    outcome = runner.run([unit])
    return outcome.exit_code()
