"""Preemption: SIGTERM / SIGUSR1 / SIGINT end a training run with a checkpoint of the step being trained.

SLURM sends SIGTERM before killing a job (and, with ``#SBATCH --signal=B:USR1@300``, SIGUSR1 a chosen time
before the limit: script/slurm/train_multinode.sbatch); a user presses Ctrl-C. Killed at once, a run would lose
everything since its last checkpoint (up to 5,000 steps in config A). While :func:`train.core.run_training`
runs, :class:`PreemptionHandler` only records the signal; the loop finishes the optimizer step it is in, every
rank agrees to stop (the flag rides on the non-finite guard's all-reduce, so no extra sync), the core writes an
ordinary atomic checkpoint of that step and raises :class:`Preempted`: the process exits with
``PREEMPTED_EXIT_CODE`` (75, ``EX_TEMPFAIL`` of sysexits.h: "try again later"). Resubmitting the same command
with ``--resume_from_checkpoint latest`` continues exactly (tested: bit-identical to an uninterrupted run).

A second Ctrl-C while the step is finishing interrupts at once (KeyboardInterrupt, exit 130), as usual.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

PREEMPTED_EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a checkpoint was written, resubmit to continue
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(SystemExit):
    """Raised by the core after the preemption checkpoint; as a SystemExit it ends the process with code 75."""

    def __init__(self, step: int, signame: str) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.signame = step, signame

    def __str__(self) -> str:
        return f"preempted by {self.signame}: checkpoint-{self.step} written; resume with latest"


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1/SIGINT while active (a context manager); the previous handlers come back on exit.

    Installed only in the main thread (Python allows signal handlers nowhere else); elsewhere it is inert.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT.name:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
