"""Preemption (train/core/preempt.py): SIGTERM / SIGUSR1 / SIGINT during training -> the step finishes, an
atomic checkpoint of that step is written, the process exits with status 75, and a resumed run ends
bit-identical to an uninterrupted one.

* every trainer on the core: a signal at a known step (sent from inside the loop, so the step is exact) saves
  ``checkpoint-<step>`` and raises ``SystemExit(75)``; U-REPA (trainable + EMA state, LMDB caches) also resumes
  to the end and is compared weight by weight with an uninterrupted run;
* a real SIGTERM from outside to a running ``python train.py`` process (exit status 75), and SIGUSR1 sent to one
  rank only of a 2-process ``accelerate launch`` on CPU: both ranks stop at the same step and save it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.core.test_trainers_on_core import log_rows, run, weights
from tests.core.trainers import HEAVY, REPO, TRAINERS
from train.core.preempt import PREEMPTED_EXIT_CODE, Preempted, PreemptionHandler

# checkpoint rarely: the only checkpoint of a preempted run is then the one the signal caused
RARE_CHECKPOINTS = {
    name: (
        ["train.checkpointing_steps=100"] if name in ("sd15", "dinovq") else ["--checkpointing_steps", "100"]
    )
    for name in TRAINERS
}


def signal_at_step(monkeypatch, at: int, signum: int = signal.SIGUSR1) -> None:
    """Send ``signum`` to this process while step ``at`` (0-based: steps done before it) is being trained."""
    import train.core.loop as loop

    original = loop.step_generator

    def generator_then_signal(seed, step, rank, device):
        if step == at:
            os.kill(os.getpid(), signum)
        return original(seed, step, rank, device)

    monkeypatch.setattr(loop, "step_generator", generator_then_signal)


def test_handler_records_then_restores():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # the first signal is the one reported
        assert handler.received == "SIGTERM"
    assert signal.getsignal(signal.SIGUSR1) is before
    with PreemptionHandler(), pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: stop at once
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    err = Preempted(7, "SIGUSR1")
    assert isinstance(err, SystemExit) and err.code == PREEMPTED_EXIT_CODE and "checkpoint-7" in str(err)


@pytest.mark.parametrize("name", sorted(set(TRAINERS) - HEAVY - {"sd15"}))
def test_every_trainer_saves_the_signalled_step_and_exits_75(name, tiny_assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    signal_at_step(monkeypatch, at=1, signum=signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        run(name, tiny_assets, out, steps=4, extra=RARE_CHECKPOINTS[name])
    assert exc.value.code == PREEMPTED_EXIT_CODE
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]  # the step in flight finished
    assert not list(out.glob(".checkpoint-*"))
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    assert [r["step"] for r in log_rows(out)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run


def test_signal_then_resume_is_bit_identical(tiny_assets, tmp_path, monkeypatch):
    name, steps = "sd15", 5
    extra = RARE_CHECKPOINTS[name]
    whole = tmp_path / "whole"
    run(name, tiny_assets, whole, steps=steps, extra=extra)
    out = tmp_path / "preempted"
    with monkeypatch.context() as m:
        signal_at_step(m, at=2)
        with pytest.raises(SystemExit) as exc:
            run(name, tiny_assets, out, steps=steps, extra=extra)
    assert exc.value.code == PREEMPTED_EXIT_CODE
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    run(name, tiny_assets, out, steps=steps, resume="latest", extra=extra)
    a, b = weights(whole, name, steps), weights(out, name, steps)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in log_rows(out)] == [r["loss"] for r in log_rows(whole)]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int = 1, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = out / "losses.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not reach its first logged step")


def _preempted_checkpoint(out: Path) -> int:
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1, ckpts
    step = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert ckpts[0].name == f"checkpoint-{step}" and 1 <= step < 10_000
    return step


def test_sigterm_from_outside_exits_75(tiny_assets, tmp_path):
    name, out = "latent_head", tmp_path / "run"
    t = TRAINERS[name]
    argv = t.argv(tiny_assets, out, 10_000, None, RARE_CHECKPOINTS[name] + ["--checkpoints_total_limit", "2"])
    proc = subprocess.Popen(
        [sys.executable, str(REPO / t.script), *argv], cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(out, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    step = _preempted_checkpoint(out)
    assert f"preempted by SIGTERM: checkpoint-{step} written" in stderr


def test_two_processes_stop_together_when_one_rank_is_signalled(tiny_assets, tmp_path):
    name, out = "latent_head", tmp_path / "ddp"
    t = TRAINERS[name]
    cmd = [
        str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(REPO / t.script), *t.argv(tiny_assets, out, 10_000, None, RARE_CHECKPOINTS[name]),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "python" in p.name().lower()]
    ranks = {int(p.environ().get("RANK", -1)): p for p in workers if "RANK" in p.environ()}
    assert sorted(ranks) == [0, 1], [p.cmdline() for p in workers]
    ranks[1].send_signal(signal.SIGUSR1)  # as if only one node got the signal
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun reports the workers' status 75 as a failure of the launch
    # The signalled rank exits 75; torchrun then SIGTERMs the workers still running, so on a loaded machine rank 0
    # may be killed by the launcher after it stopped and saved, instead of reaching its own exit 75 first.
    assert "exitcode  : 75" in stderr, stderr[-3000:]
    step = _preempted_checkpoint(out)
    # rank 0 was not signalled: it stopped because rank 1 was, at the same step, and wrote the checkpoint
    assert f"preempted by a signal on another rank: checkpoint-{step} written" in stderr, stderr[-3000:]
    ckpt = out / f"checkpoint-{step}"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()


def _fake_slurm(bin_dir: Path, log: Path) -> dict[str, str]:
    """``srun`` that runs its command here (signals reach it as they would reach srun's tasks) and ``scontrol``
    that records what it was asked."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        ACCELERATE=str(Path(sys.executable).with_name("accelerate")),
        SLURM_JOB_ID="4242",
        CONFIG="configs/accelerate/cpu_2proc.yaml",
        PROCS_PER_NODE="2",
        MAIN_PROCESS_IP="127.0.0.1",
        MAIN_PROCESS_PORT=str(_free_port()),
    )
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sbatch_passes_usr1_on_requeues_and_the_next_start_resumes(tiny_assets, tmp_path):
    sbatch = REPO / "script" / "slurm" / "train_multinode.sbatch"
    header = [line for line in sbatch.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header
    name, out, log = "latent_head", tmp_path / "run", tmp_path / "scontrol.log"
    t = TRAINERS[name]
    argv = [t.script, *t.argv(tiny_assets, out, 10_000, "latest", RARE_CHECKPOINTS[name])]
    env = _fake_slurm(tmp_path / "bin", log)
    steps = []
    for start in range(2):  # the submitted job, then its requeued start (same command)
        proc = subprocess.Popen(
            ["bash", str(sbatch), *argv], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
        )
        _wait_for_step(out, proc, step=(steps[-1] if steps else 0) + 1)
        proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` does 5 minutes before the limit
        _, stderr = proc.communicate(timeout=300)
        assert "exitcode  : 75" in stderr, stderr[-3000:]
        assert log.read_text().splitlines() == ["requeue 4242"] * (start + 1)
        steps.append(_preempted_checkpoint(out))  # checkpoints_total_limit 1: the newest only
    assert steps[1] > steps[0]  # the requeued start resumed from checkpoint-<steps[0]> and went on
    assert [r["step"] for r in log_rows(out)] == list(range(1, steps[1] + 1))  # each step logged once
