"""Every trainer on the shared training core (train/core/), on the tiny offline assets:

* two fresh runs with the same seed give bit-identical weights, and ``checkpoints_total_limit 1`` keeps one;
* a crafted pickle in a checkpoint is never executed on resume;
* non-finite gradients are skipped, counted, and stop the run after K in a row; the checkpoint stays finite;
* ``accelerate launch --multi_gpu --num_processes 2`` on CPU: one process group, each step logged once, the LR
  at every step equal to the 1-process schedule, and a checkpoint that a 1-process run resumes from (every
  trainer one after another in one launch: tests/core/two_process_driver.py).
"""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.core.trainers import HEAVY, REPO, TRAINERS
from tests.workers import ACCELERATE_2, worker_env

NAMES = sorted(TRAINERS)
LIGHT = sorted(set(TRAINERS) - HEAVY)
STEPS = 3


def run(name: str, tiny, out: Path, steps: int = STEPS, resume: str | None = None, extra=()):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    t = TRAINERS[name]
    return t.main()(t.argv(tiny, out, steps, resume, extra))


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


def weights(out: Path, name: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoint-{step}" / TRAINERS[name].weights_file))


@pytest.fixture(scope="module")
def one_process_run(tiny_assets, tmp_path_factory):
    """``one_process_run(name)``: the output of a fresh in-process run of ``STEPS`` steps, made once per module
    (first_run and the 2-process test's 1-process schedule read the same run)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name) / "a"
            run(name, tiny_assets, made[name])
        return made[name]

    return get


@pytest.fixture(scope="module", params=LIGHT)
def first_run(request, one_process_run):
    """One fresh run per trainer, shared by the tests below."""
    return request.param, one_process_run(request.param)


def test_fresh_runs_are_identical_and_limit_one_keeps_one(first_run, tiny_assets, tmp_path):
    name, a = first_run
    b = tmp_path / "b"
    run(name, tiny_assets, b)
    for out in (a, b):  # checkpointing every step with checkpoints_total_limit 1
        assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]
        assert not list(out.glob(".checkpoint-*"))  # no partial folder left behind
    wa, wb = weights(a, name, STEPS), weights(b, name, STEPS)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows = log_rows(a)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert not list((a / f"checkpoint-{STEPS}").glob("custom_checkpoint_*.pkl"))  # state is JSON
    assert json.loads((a / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["step"] == STEPS


class _Payload:
    """Unpickling this object creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_crafted_pickles_are_not_executed_on_resume(first_run, tiny_assets, tmp_path):
    name, a = first_run
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(a, out)
    ckpt = out / f"checkpoint-{STEPS}"
    marker = tmp_path / "pwned"
    crafted = ckpt / "custom_checkpoint_0.pkl"  # what accelerate would unpickle with weights_only=False
    crafted.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(RuntimeError, match="custom_checkpoint_0.pkl is a pickled custom state"):
        run(name, tiny_assets, out, steps=STEPS + 1, resume="latest")
    assert not marker.exists()
    crafted.unlink()
    run(name, tiny_assets, out, steps=STEPS + 1, resume="latest")  # resumes and trains one more step
    assert [r["step"] for r in log_rows(out)] == list(range(1, STEPS + 2))  # resumed lines not duplicated
    # accelerate's own RNG file is read with weights_only=True; a crafted one is refused with a clear error
    ckpt = out / f"checkpoint-{STEPS + 1}"
    torch.save(_Payload(str(marker)), ckpt / "random_states_0.pkl")
    with pytest.raises(RuntimeError, match="random_states_0.pkl is not a plain-data"):
        run(name, tiny_assets, out, steps=STEPS + 2, resume="latest")
    assert not marker.exists()


def test_nonfinite_steps_are_skipped_then_stop(first_run, tiny_assets, tmp_path, monkeypatch):
    from train.core import NonFiniteLossError, StepContext

    name, _ = first_run
    original = StepContext.backward

    def nan_from_step_2(self, loss):  # gradients become NaN from the third step on
        original(self, loss * float("nan") if self.step >= 2 else loss)

    monkeypatch.setattr(StepContext, "backward", nan_from_step_2)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite"):
        run(name, tiny_assets, out, steps=6)
    rows = log_rows(out)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2]
    ckpts = sorted(out.glob("checkpoint-*"))
    assert [p.name for p in ckpts] == ["checkpoint-3"]  # a skipped step is saved; the aborting one is not
    assert all(torch.isfinite(v).all() for v in weights(out, name, 3).values())
    assert json.loads((ckpts[0] / "trainer_state.json").read_text())["skipped_steps"] == 1


@pytest.fixture(scope="module")
def two_process_runs(tiny_assets, tmp_path_factory) -> Path:
    """Every trainer for ``STEPS`` steps under ``accelerate launch --multi_gpu --num_processes 2`` on CPU, one
    after another in ONE launch (tests/core/two_process_driver.py): the launcher, the two interpreters and the
    process group once instead of once per trainer. ``<name>/`` holds each run, ``<name>.error`` a failure."""
    root = tmp_path_factory.mktemp("ddp")
    jobs = [
        {"name": n, "script": str(REPO / t.script), "argv": t.argv(tiny_assets, root / n, STEPS, None, ())}
        for n, t in sorted(TRAINERS.items())
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    cmd = [*ACCELERATE_2, str(REPO / "tests" / "core" / "two_process_driver.py"), str(root / "jobs.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=1500)
    (root / "launch.stderr").write_text(proc.stderr)
    return root


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_on_cpu(name, two_process_runs, one_process_run, tiny_assets):
    out = two_process_runs / name
    error = two_process_runs / f"{name}.error"
    assert not error.exists(), error.read_text()[-4000:]
    assert (out / "losses.jsonl").is_file(), (two_process_runs / "launch.stderr").read_text()[-4000:]
    rows = log_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one writer: each step once
    ckpt = out / f"checkpoint-{STEPS}"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert all(torch.isfinite(v).all() for v in weights(out, name, STEPS).values())
    # the LR at each step is the 1-process schedule's (cosine with warm-up), not advanced twice as fast
    lr1 = [r["lr"] for r in log_rows(one_process_run(name))]
    assert [r["lr"] for r in rows] == pytest.approx(lr1, rel=1e-9)
    assert len(set(lr1)) == STEPS  # warm-up then cosine: a different LR at every step
    # a 1-process run resumes the 2-process checkpoint
    run(name, tiny_assets, out, steps=STEPS + 1, resume="latest")
    assert [r["step"] for r in log_rows(out)] == list(range(1, STEPS + 2))


CHANGED_LR = {  # a flag each trainer's resumed run would silently ignore (the optimizer state keeps the old LR)
    "stage1": (["--learning_rate", "5e-3"], "learning_rate"),
    "stage2": (["--learning_rate", "5e-3"], "learning_rate"),
    "dinovq": (["--set", "train.lr=5e-3"], "train.lr"),
    "latent_head": (["--lr", "5e-3"], "lr"),
    "sd15": (["--set", "optim.lr=5e-3"], "optim.lr"),
    "downstream_localization": (["--learning_rate", "5e-3"], "learning_rate"),
}


def test_resume_with_a_changed_learning_rate_is_refused(first_run, tiny_assets):
    """Issue 21 R6: every trainer records config.yaml; a resume that changes what the checkpoint would override
    is refused naming the key (exit 2 through run_cli), and nothing is trained."""
    from train.core.run_config import ConfigChangedError

    name, a = first_run
    assert (a / "config.yaml").is_file()
    extra, key = CHANGED_LR[name]
    with pytest.raises(ConfigChangedError, match=rf"(?m)^  - {key}: .* -> 0\.005$"):
        run(name, tiny_assets, a, steps=STEPS + 1, resume="latest", extra=extra)
    assert sorted(p.name for p in a.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]
