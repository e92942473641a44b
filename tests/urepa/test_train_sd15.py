"""train_sd15.py end to end on the tiny U-Net + synthetic data: resume, NaN skip, baseline, 2 processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(Path(__file__).with_name("tiny_test.yaml"))


def _run(tmp_path: Path, name: str, tiny_assets, *overrides: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    import train_sd15

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path / name
    argv = [
        "--config",
        CONFIG,
        "--set",
        f"output_dir={out}",
        f"model.pretrained={tiny_assets['sd15']}",
        *overrides,
    ]
    logs = train_sd15.main(argv)
    return {"out": out, "logs": logs}


def _state(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f: load_file(str(ckpt / f)) for f in ("trainable_state.safetensors", "ema_state.safetensors")}


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_assets):
    # 8 samples, batch 2: 4 steps per epoch, so step 5 also checks the epoch reshuffle after a resume.
    common = ("train.max_steps=5", "train.checkpointing_steps=5")
    full = _run(tmp_path, "full", tiny_assets, *common)
    part = _run(tmp_path, "part", tiny_assets, *common, "train.stop_at_step=3")
    assert (part["out"] / "checkpoint-3").is_dir() and not (part["out"] / "checkpoint-5").exists()
    _run(tmp_path, "part", tiny_assets, *common)
    a, b = _state(full["out"] / "checkpoint-5"), _state(part["out"] / "checkpoint-5")
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=0, atol=0, msg=f"{f}:{k}")
    assert any(k.startswith("heads.mid.") for k in a["trainable_state.safetensors"])
    assert any("lora_A" in k for k in a["trainable_state.safetensors"])


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, tiny_assets):
    import train_sd15

    with pytest.raises(train_sd15.NonFiniteLossError, match="3 consecutive non-finite"):
        _run(
            tmp_path,
            "nan",
            tiny_assets,
            "train.max_steps=6",
            "train.checkpointing_steps=0",
            "data.factory_kwargs={n: 8, nan_indices: [0, 1, 2, 3, 4, 5, 6, 7]}",
        )


def test_two_processes_through_accelerate(tmp_path, tiny_assets):
    out = tmp_path / "ddp"
    cmd = [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "train_sd15.py"),
        "--config",
        CONFIG,
        "--set",
        f"output_dir={out}",
        f"model.pretrained={tiny_assets['sd15']}",
        "train.max_steps=2",
        "train.checkpointing_steps=2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoint-2"
    # one RNG file per rank proves two ranks took part
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
