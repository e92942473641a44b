"""The training core's guarantees (issue 21): paths stay inside the run folder, resume refuses settings it
would ignore, one writer per run folder, checkpoint saves that fail cleanly, checksummed checkpoints, eval
logs cut back on resume. A toy linear model on the real core (seconds per test)."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from train.core import CoreConfig, Optim, Task, make_accelerator, make_lr_scheduler, run_training
from train.core.checkpoint import STATE_FILE, CheckpointError
from train.core.config import CoreConfigError
from train.core.lock import LOCK_NAME, RunLock, RunLockedError
from train.core.run_config import ConfigChangedError
from train.core.setup import check_output_dir
from utils.cli import UserError


def toy_run(
    out: Path, *, lr: float = 0.1, steps: int = 4, stop: int | None = None, resume=None, **core
) -> dict:
    """Train ``Linear(3, 1)`` with AdamW on the core; returns what the test inspects."""
    cfg = CoreConfig(
        output_dir=str(out),
        max_steps=steps,
        stop_at_step=stop,
        checkpointing_steps=1,
        report_to=None,
        resume_from_checkpoint=resume,
        **core,
    )
    acc = make_accelerator(cfg)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = make_lr_scheduler("cosine", opt, warmup_steps=1, max_steps=steps, num_processes=1)
    model, opt, sched = acc.prepare(model, opt, sched)
    x = torch.arange(6.0).reshape(2, 3)

    def step_fn(micro, ctx):
        loss = model(micro[0]).square().mean()
        ctx.backward(loss)
        return {"loss": loss.detach()}

    def on_step_end(step: int) -> None:
        with open(out / "eval_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "metric": 1.0}) + "\n")

    task = Task(
        step_fn=step_fn,
        batches=lambda start: itertools.repeat(x),
        optims=[Optim("model", opt, sched, list(model.parameters()))],
        train_modules=[model],
        on_step_end=on_step_end,
        tracker_config={"optim": {"lr": lr}, "output_dir": str(out), "resume_from_checkpoint": resume},
        step_logs=("eval_log.jsonl",),
    )
    run_training(acc, cfg, task)
    return {"opt": opt, "sched": sched, "model": model}


# ------------------------------------------------------------------------------------------ R9: paths inside
@pytest.mark.parametrize("bad", ["/tmp/elsewhere", "../sibling", "logs/../../x"])
def test_logging_dir_outside_the_output_dir_is_refused(bad, tmp_path):
    with pytest.raises(CoreConfigError, match="inside output_dir"):
        CoreConfig(output_dir=str(tmp_path), max_steps=1, logging_dir=bad)


def test_overwrite_never_deletes_outside_the_output_dir(tmp_path):
    """A logging_dir that is a symlink out of the run (the check on the resolved path) is not deleted."""
    victim = tmp_path / "unrelated"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)
    (out / "logs").symlink_to(victim)
    cfg = CoreConfig(output_dir=str(out), max_steps=2, overwrite_output_dir=True)
    with pytest.raises(UserError, match="outside"):
        check_output_dir(cfg, is_main=True)
    assert (victim / "precious.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------ R6: config on resume
def test_resume_refuses_a_changed_learning_rate_unless_allowed(tmp_path):
    out = tmp_path / "run"
    toy_run(out, lr=0.1, stop=2)
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.1
    with pytest.raises(ConfigChangedError, match=r"optim\.lr: 0\.1 -> 0\.5") as err:
        toy_run(out, lr=0.5, resume="latest")
    assert "--allow_config_change" in str(err.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # no training

    # same settings (only free keys differ): resumes; the schedule continues from the checkpoint
    ref = toy_run(tmp_path / "ref", lr=0.1, steps=4)
    same = toy_run(tmp_path / "copy", lr=0.1, stop=2)
    same = toy_run(tmp_path / "copy", lr=0.1, resume="latest")
    assert same["sched"].get_last_lr() == pytest.approx(ref["sched"].get_last_lr())

    # allowed: the new LR is applied (base LR and the current LR of the schedule), recorded in config.yaml
    run = toy_run(out, lr=0.5, stop=3, resume="latest", allow_config_change=True)
    fresh = toy_run(tmp_path / "fresh", lr=0.5, stop=3)
    assert run["sched"].scheduler.base_lrs == [0.5]
    assert run["opt"].param_groups[0]["lr"] == pytest.approx(fresh["opt"].param_groups[0]["lr"])
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.5


# ------------------------------------------------------------------------------------------ R7: one writer
def test_lock_refuses_a_second_writer_and_names_a_stale_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": host}))  # a live process that is not us
    with pytest.raises(RunLockedError, match="in use by another run"):
        toy_run(out, stop=1)
    assert not (out / "checkpoint-1").exists() and not (out / "losses.jsonl").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": host}))
    with pytest.raises(RunLockedError, match=rf"stale lock.*rm {lock}"):
        RunLock(out).acquire()

    lock.write_text(json.dumps({"pid": 1, "host": "other-node"}))
    with pytest.raises(RunLockedError, match="other-node"):
        RunLock(out).acquire()

    lock.unlink()
    toy_run(out, stop=1)
    assert not lock.exists()  # released when the run ended


def test_lock_is_released_by_a_process_that_fails(tmp_path):
    """A run ending with an exception removes its lock (atexit), so the next start is not refused."""
    out = tmp_path / "run"
    code = (  # the lock module alone (train/core/__init__ would import torch and accelerate: slow)
        "import importlib.util, sys; sys.path.insert(0, sys.argv[2]);"
        "spec = importlib.util.spec_from_file_location('lock', sys.argv[2] + '/train/core/lock.py');"
        "lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock);"
        "lock.RunLock(sys.argv[1]).acquire(); raise SystemExit(3)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(Path(__file__).parents[2])], timeout=300)
    assert proc.returncode == 3
    assert out.is_dir() and not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ R4: disk full
def test_save_refused_when_the_disk_is_too_full(tmp_path, monkeypatch):
    import train.core.checkpoint as ckpt

    out = tmp_path / "run"
    toy_run(out, stop=1)

    class Usage:
        free = 1000

    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(CheckpointError, match=rf"not enough free disk space for checkpoint-2 in {out}"):
        toy_run(out, stop=2, resume="latest")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", real)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("basic_ios::clear: iostream error"),  # torch.save on a full disk
        "safetensors",  # safetensors' own error type
    ],
)
def test_write_error_during_save_is_one_message_and_leaves_no_partial_folder(error, tmp_path, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "run"
    toy_run(out, stop=1)
    real = Accelerator.save_state

    def failing_save_state(self, output_dir=None, **kw):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, str(Path(output_dir) / "optimizer.bin"))
        if error == "safetensors":
            from safetensors import SafetensorError

            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                'device" })'
            )
        raise error

    monkeypatch.setattr(Accelerator, "save_state", failing_save_state)
    with pytest.raises(CheckpointError, match="could not write checkpoint-2") as err:
        toy_run(out, stop=2, resume="latest")
    monkeypatch.setattr(Accelerator, "save_state", real)
    msg = str(err.value)
    assert ".checkpoint-2.partial" in msg and ("No space left" in msg or "disk full" in msg), msg
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]


# ------------------------------------------------------------------------------------------ R5/R12: checksums
def _break(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-1] ^= 0x01  # a tensor byte
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[:40]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_checkpoint_file_is_named_on_resume(how, tmp_path):
    out = tmp_path / "run"
    toy_run(out, stop=2)
    ckpt = out / "checkpoint-2"
    files = json.loads((ckpt / STATE_FILE).read_text())["files"]
    assert "model.safetensors" in files and "optimizer.bin" in files
    _break(ckpt / "model.safetensors", how)
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'model.safetensors'} is damaged"):
        toy_run(out, resume="latest")


def test_truncated_safetensors_without_recorded_checksums_is_named(tmp_path):
    out = tmp_path / "run"
    toy_run(out, stop=2)
    ckpt = out / "checkpoint-2"
    state = json.loads((ckpt / STATE_FILE).read_text())
    state.pop("files")  # a checkpoint written before checksums
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    _break(ckpt / "model.safetensors", "truncate")
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'model.safetensors'} is not a readable safetensors"):
        toy_run(out, resume="latest")


# ------------------------------------------------------------------------------------------ R3: eval log
def test_eval_log_is_cut_back_on_resume(tmp_path):
    out = tmp_path / "run"
    toy_run(out, stop=3)
    shutil.rmtree(out / "checkpoint-3")  # resume from checkpoint-2: the step-3 lines are written again
    toy_run(out, resume="latest")
    steps = [json.loads(line)["step"] for line in (out / "eval_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    losses = [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert losses == [1, 2, 3, 4]
