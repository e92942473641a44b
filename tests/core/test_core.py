"""The training core's pieces, each against a hand-checkable expectation (fast; no trainer involved)."""

from __future__ import annotations

import json

import pytest
import torch

from train.core import CoreConfig, make_lr_scheduler, step_generator
from train.core.checkpoint import NonFiniteWeightsError, TrainerState, save_checkpoint
from train.core.loop import _log_line_filter
from train.core.setup import check_output_dir, check_precision
from utils.checkpoint import list_checkpoints, prune_checkpoints


def _ckpts(root, steps):
    for s in steps:
        (root / f"checkpoint-{s}").mkdir(parents=True)


def test_limit_means_keep_at_most_n(tmp_path):
    _ckpts(tmp_path, [1, 2, 10, 3])
    prune_checkpoints(tmp_path, 1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10"]
    _ckpts(tmp_path, [11, 12])
    prune_checkpoints(tmp_path, None)  # None keeps all
    assert len(list_checkpoints(tmp_path)) == 3
    with pytest.raises(ValueError, match=">= 1"):
        prune_checkpoints(tmp_path, 0)
    with pytest.raises(ValueError, match="checkpoints_total_limit"):
        CoreConfig(output_dir=str(tmp_path), max_steps=1, checkpoints_total_limit=0)


def test_used_output_dir_is_refused_unless_resumed_or_overwritten(tmp_path):
    from train.core.setup import UserError

    out = tmp_path / "run"
    _ckpts(out, [2])
    (out / "losses.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="--resume_from_checkpoint latest"):
        check_output_dir(CoreConfig(output_dir=str(out), max_steps=3), is_main=True)
    check_output_dir(CoreConfig(output_dir=str(out), max_steps=3, resume_from_checkpoint="latest"), True)
    assert (out / "checkpoint-2").is_dir()
    check_output_dir(CoreConfig(output_dir=str(out), max_steps=3, overwrite_output_dir=True), True)
    assert not (out / "checkpoint-2").exists() and not (out / "losses.jsonl").exists()
    check_output_dir(CoreConfig(output_dir=str(tmp_path / "new"), max_steps=3), True)  # fresh dir: fine


def test_fp16_without_gpu_is_a_clear_error():
    from train.core.setup import UserError

    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        check_precision("fp16", cuda=False)
    check_precision("bf16", cuda=False)
    check_precision("fp16", cuda=True)


def test_resumed_log_keeps_lines_up_to_the_step(tmp_path):
    log = tmp_path / "losses.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 7)))
    _log_line_filter(log, 4)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup"])
def test_lr_schedule_scaled_for_processes_equals_one_process(name):
    """accelerate steps a prepared scheduler num_processes times per optimizer step."""

    def lrs(num_processes):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_lr_scheduler(name, opt, warmup_steps=3, max_steps=10, num_processes=num_processes)
        out = []
        for _ in range(10):
            for _ in range(num_processes):
                sched.step()
            out.append(sched.get_last_lr()[0])
        return out

    one, two = lrs(1), lrs(2)
    assert two == pytest.approx(one, rel=1e-12)
    assert one[0] == pytest.approx(1 / 3)  # warm-up: step/warmup


def test_checkpoint_with_nonfinite_weights_is_not_written(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    p = torch.nn.Parameter(torch.tensor([1.0, float("nan")]))
    with pytest.raises(NonFiniteWeightsError, match="not written"):
        save_checkpoint(acc, tmp_path, TrainerState(step=5), [p], total_limit=None)
    assert not list(tmp_path.iterdir())
    with torch.no_grad():
        p[1] = 2.0
    path = save_checkpoint(acc, tmp_path, TrainerState(step=5, skipped_steps=1, extra={"k": 1}), [p], None)
    loaded = TrainerState.load(path)
    assert (loaded.step, loaded.skipped_steps, loaded.extra) == (5, 1, {"k": 1})
    assert "random_states_0.pkl" in loaded.files  # checksums of the checkpoint's files


def test_step_generator_depends_on_seed_step_and_rank_only():
    draw = lambda *a: torch.rand(3, generator=step_generator(*a)).tolist()  # noqa: E731
    assert draw(0, 5, 0) == draw(0, 5, 0)
    assert len({tuple(draw(*a)) for a in [(0, 5, 0), (1, 5, 0), (0, 6, 0), (0, 5, 1)]}) == 4


def test_user_errors_exit_2_without_traceback(tmp_path):
    """A used output_dir (issue 17: no silent restart) and a missing data folder: exit code 2, one message."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    base = [sys.executable, str(repo / "train/stage1-full/train.py"), "--mvtec_name", "hazelnut",
            "--pretrained_model_name_or_path", str(tmp_path / "no_sd"), "--max_train_steps", "2"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRACEBACK", None)
    for extra, expected in (
        (["--instance_data_dir", str(tmp_path), "--output_dir", str(out)], "--resume_from_checkpoint latest"),
        (
            ["--instance_data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "new")],
            "missing",
        ),
    ):
        proc = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
