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


def _cache_overrides(root: Path, workers: int = 0) -> list[str]:
    """--set entries that train on real LMDB caches holding the same samples as the factory data."""
    from tests.urepa.fake_data import write_lmdb_caches

    data = write_lmdb_caches(root, n=8)
    return ["data.factory=null", f"data.num_workers={workers}", *(f"data.{k}={v}" for k, v in data.items())]


def _assert_same_checkpoint(a_dir: Path, b_dir: Path) -> dict:
    a, b = _state(a_dir), _state(b_dir)
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=0, atol=0, msg=f"{f}:{k}")
    return a


def test_cached_data_trains_exactly_like_the_same_samples_in_memory(tmp_path, tiny_assets):
    """The LMDB path (SD15AlignedDataset through make_batched_loader, 2 workers) feeds the same batches in
    the same shuffled order as the default-collate DataLoader over the in-memory dataset."""
    common = ("train.max_steps=5", "train.checkpointing_steps=5")
    mem = _run(tmp_path, "mem", tiny_assets, *common)
    lmdb = _run(tmp_path, "lmdb", tiny_assets, *common, *_cache_overrides(tmp_path / "caches", workers=2))
    import yaml

    saved = yaml.safe_load((lmdb["out"] / "config.yaml").read_text())["data"]
    assert saved["factory"] is None and saved["csv"].endswith("train.csv")  # really the LMDB path
    _assert_same_checkpoint(mem["out"] / "checkpoint-5", lmdb["out"] / "checkpoint-5")
    assert mem["logs"]["loss"] == lmdb["logs"]["loss"]


@pytest.mark.parametrize("data", ["memory", "lmdb", "memory_accum2"])
def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_assets, data):
    # 8 samples, batch 2: 4 steps per epoch, so step 5 also checks the epoch reshuffle after a resume.
    common = ("train.max_steps=5", "train.checkpointing_steps=5")
    if data == "lmdb":
        common += tuple(_cache_overrides(tmp_path / "caches", workers=1))
    threads = torch.get_num_threads()
    if data == "memory_accum2":  # 2 micro-batches of 1 per step: still 4 steps per epoch
        common += ("train.batch_size=1", "train.gradient_accumulation_steps=2")
        # At batch size 1 some multi-threaded CPU backward kernels sum in a varying order (two fresh runs
        # differ by ~1e-5 even without a resume, with or without use_deterministic_algorithms); one thread
        # makes them bit-exact, which is what this test needs to see the resume itself.
        torch.set_num_threads(1)
    try:
        full = _run(tmp_path, "full", tiny_assets, *common)
        part = _run(tmp_path, "part", tiny_assets, *common, "train.stop_at_step=3")
        assert (part["out"] / "checkpoint-3").is_dir() and not (part["out"] / "checkpoint-5").exists()
        _run(tmp_path, "part", tiny_assets, *common)
    finally:
        torch.set_num_threads(threads)
    a = _assert_same_checkpoint(full["out"] / "checkpoint-5", part["out"] / "checkpoint-5")
    assert any(k.startswith("heads.mid.") for k in a["trainable_state.safetensors"])
    assert any("lora_A" in k for k in a["trainable_state.safetensors"])


def test_gradient_accumulation_equals_one_larger_batch(tmp_path, tiny_assets):
    """2 micro-batches of 1 = one batch of 2: same samples, same noise/timestep/dropout draws, gradients summed
    over the micro-batches. (The manifold term compares samples within a micro-batch, so it is switched off.)"""
    # Batch-size-dependent CPU kernels already make the gradients differ at ~3e-5 (relative). optim.eps=1 makes
    # AdamW move each weight by ~lr * grad, so such rounding cannot flip the sign of a whole lr-sized step of a
    # near-zero gradient component (as it can with eps=1e-8).
    common = (
        "train.max_steps=3",
        "train.checkpointing_steps=3",
        "loss.manifold_coeff=0",
        "data.cfg_dropout=0.5",
        "optim.eps=1.0",
    )
    one = _run(tmp_path, "one", tiny_assets, *common, "train.batch_size=2")
    acc = _run(
        tmp_path, "acc", tiny_assets, *common, "train.batch_size=1", "train.gradient_accumulation_steps=2"
    )
    a, b = _state(one["out"] / "checkpoint-3"), _state(acc["out"] / "checkpoint-3")
    for f in a:
        for k in a[f]:
            torch.testing.assert_close(a[f][k], b[f][k], rtol=1e-4, atol=1e-6, msg=f"{f}:{k}")
    trained = a["trainable_state.safetensors"]
    assert any(k.startswith("heads.mid.") for k in trained)
    # and accumulation really changes something vs a single micro-batch of 1 per step
    single = _run(tmp_path, "single", tiny_assets, *common, "train.batch_size=1")
    c = _state(single["out"] / "checkpoint-3")["trainable_state.safetensors"]
    assert any(not torch.allclose(trained[k], c[k], rtol=1e-3, atol=1e-5) for k in trained)
    # the config schema rejects it, naming the key (train/urepa/config_schema.py)
    with pytest.raises(
        ValueError, match=r"train\.gradient_accumulation_steps: Input should be greater than 0"
    ):
        _run(tmp_path, "bad", tiny_assets, "train.gradient_accumulation_steps=0")


def test_bf16_run_keeps_frozen_weights_in_bf16_and_trained_ones_in_fp32(tmp_path, tiny_assets):
    from diffusers import UNet2DConditionModel

    seen = {}
    orig = UNet2DConditionModel.forward

    def spy(self, *args, **kwargs):
        seen["frozen"] = self.conv_in.weight.dtype
        return orig(self, *args, **kwargs)

    UNet2DConditionModel.forward = spy
    try:
        run = _run(
            tmp_path, "bf16", tiny_assets, "train.max_steps=2", "train.checkpointing_steps=2",
            "train.mixed_precision=bf16",
        )  # fmt: skip
    finally:
        UNet2DConditionModel.forward = orig
    assert seen["frozen"] == torch.bfloat16
    assert torch.isfinite(torch.tensor(run["logs"]["loss"]))
    trained = _state(run["out"] / "checkpoint-2")
    assert {t.dtype for f in trained.values() for t in f.values()} == {torch.float32}


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
        *_cache_overrides(tmp_path / "caches"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoint-2"
    # one RNG file per rank proves two ranks took part
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()


def test_csv_ids_missing_from_the_caches_exit_2_with_one_message(tmp_path, tiny_assets, capsys):
    """Issue 21 R1: found before any model is loaded, but a ValueError (exit 1, chained traceback)."""
    from accelerate.state import AcceleratorState, GradientState

    import train_sd15
    from utils.cli import run_cli

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    overrides = _cache_overrides(tmp_path / "data")
    with open(tmp_path / "data" / "train.csv", "a") as f:
        f.write("not_cached_0,/x/not_cached_0.JPEG,0,n00000000\n")
    argv = ["--config", CONFIG, "--set", f"output_dir={tmp_path / 'out'}", "model.pretrained=/nonexistent"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_sd15.main, [*argv, "--set", *overrides])  # two --set flags: both kept (R2)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "1 of 9 ids" in err and "not_cached_0" in err and "Traceback" not in err, err
