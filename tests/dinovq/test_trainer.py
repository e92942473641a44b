"""DinoVQ trainer: runs end to end on synthetic data, resume reproduces an uninterrupted run, LMDB targets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("dinovq_train_entry", REPO / "train" / "dinovq" / "train.py")
train_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_mod)

TINY_OVERRIDES = [
    "model.img_size=[28,28]",
    "model.patch_size=7",
    "model.encoder_embed_dim=32",
    "model.encoder_depth=1",
    "model.decoder_depth=1",
    "model.num_heads=2",
    "model.codebook_size=16",
    "model.disc_dim=8",
    "model.disc_start=2",
    "dino.resolution=28",
    "data.val_size=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.eval_every=3",
    "train.checkpointing_steps=3",
    "train.gradient_accumulation_steps=2",
    "eval.lpips=false",
    "eval.rfid=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from models.dinov2_encoder import DINOv2Encoder, save_official_checkpoint

    root = tmp_path_factory.mktemp("dinovq_data")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            arr = (rng.random((36, 40, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "imgs" / c / f"{i}.png")
    (root / "imgs" / "a" / "broken.png").write_bytes(b"not a png")
    torch.manual_seed(0)
    enc = DINOv2Encoder(variant="tiny14", resolution=28, input_range="-1_1")
    save_official_checkpoint(enc, root / "dino_tiny.pth")
    return root


def run(data, out, *extra, sets=()):
    argv = [
        "--config",
        str(REPO / "configs" / "dinovq_tiny_demo.yaml"),
        "--output_dir",
        str(out),
        *extra,
        "--set",
        *TINY_OVERRIDES,
        f"data.train_dir={data / 'imgs'}",
        f"dino.source={data / 'dino_tiny.pth'}",
        *sets,
    ]
    return train_mod.main(argv)


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "losses.jsonl").read_text().splitlines()]


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    metrics = run(data, full, "--max_steps", "4")
    assert {"psnr", "ssim", "codebook_usage", "codebook_perplexity"} <= set(metrics)
    run(data, part, "--max_steps", "4", "--stop_at_step", "2")
    assert (part / "checkpoint-2").is_dir()  # mid-epoch: resume must skip 4 micro-batches
    run(data, part, "--max_steps", "4", "--resume_from_checkpoint", "latest")
    a, b = read_log(full), read_log(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert "disc_loss" in a[-1] and "gen_adv_loss" in a[-1]  # GAN active from disc_start=2
    for ra, rb in zip(a, b):
        for key in ("total_loss", "dino_loss", "recon_loss", "vq_loss", "gen_adv_loss"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    assert list((full / "samples").glob("recon-*.png"))
    assert list((full / "logs").rglob("events.out.tfevents*"))


def test_lmdb_dino_cache(data, tmp_path):
    from datasets.lmdb_cache import LMDBCacheWriter
    from train.dinovq.data import find_images

    items = find_images(data / "imgs")
    cache = tmp_path / "cache"
    g = torch.Generator().manual_seed(0)
    meta = {
        "shape": [4, 64],
        "dtype": "float16",
        "encoder": "dinov2_tiny14",
        "D": 64,
        "grid": [2, 2],
        "patch": 14,
        "resolution": 28,
        "normalized": False,
    }
    with LMDBCacheWriter(cache, meta) as w:
        for key, _ in items:
            w.put(key, torch.randn(4, 64, generator=g).half())
    out = tmp_path / "cached"
    run(data, out, "--max_steps", "2", "--dino_cache", str(cache), sets=["dino.source=/nonexistent"])
    log = read_log(out)
    assert len(log) == 2 and np.isfinite(log[-1]["dino_loss"])


def test_bad_config_values(data, tmp_path):
    with pytest.raises(KeyError, match="unknown key"):
        run(data, tmp_path / "x", sets=["train.no_such_key=1"])
    with pytest.raises(FileNotFoundError):
        run(data, tmp_path / "y", sets=["data.train_dir=/nonexistent/dir"])


def ckpt_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_ema_formula_final_export_and_checkpoint_export(data, tmp_path):
    """EMA: ema_2 = d * ema_1 + (1 - d) * live_2 (LlamaGen's update_ema) over the generator's parameters only;
    the run ends with OUTPUT_DIR/dinovq (EMA weights), export.py exports any checkpoint (ema or live)."""
    from models.dinovq import DinoVQModel
    from train.dinovq.export import main as export_main

    out = tmp_path / "ema"
    run(
        data,
        out,
        "--max_steps",
        "2",
        "--ema",
        sets=["train.ema_decay=0.5", "train.checkpointing_steps=1", "train.gradient_accumulation_steps=1"],
    )
    ema1 = ckpt_tensors(out / "checkpoint-1" / "ema_state.safetensors")
    ema2 = ckpt_tensors(out / "checkpoint-2" / "ema_state.safetensors")
    live2 = ckpt_tensors(out / "checkpoint-2" / "model.safetensors")
    assert ema1 and not any(k.startswith("loss_fn.") for k in ema1)  # no discriminator EMA
    params = {n for n, _ in DinoVQModel.from_pretrained(out / "dinovq").named_parameters()}
    assert set(ema1) == params
    for k in ema2:
        torch.testing.assert_close(ema2[k], 0.5 * ema1[k] + 0.5 * live2[k], rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(ema2[k], live2[k]) for k in ema2)

    final = DinoVQModel.from_pretrained(out / "dinovq")
    cfg = json.loads((out / "dinovq" / "config.json").read_text())
    assert cfg["export"]["weights"] == "ema" and cfg["export"]["step"] == 2
    state = final.state_dict()
    for k, v in ema2.items():
        assert torch.equal(state[k], v), k
    for k, v in live2.items():  # buffers (the EMA codebook) are the live model's
        if k not in ema2 and not k.startswith("loss_fn."):
            assert torch.equal(state[k], v), k

    export_main([str(out / "checkpoint-1"), "--output", str(tmp_path / "live1"), "--weights", "live"])
    live1 = ckpt_tensors(out / "checkpoint-1" / "model.safetensors")
    exported = DinoVQModel.from_pretrained(tmp_path / "live1").state_dict()
    assert set(exported) == {k for k in live1 if not k.startswith("loss_fn.")}
    for k, v in exported.items():
        assert torch.equal(v, live1[k]), k


def test_ema_resume_reproduces_uninterrupted_run(data, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run(data, full, "--max_steps", "3", "--ema", sets=["train.ema_decay=0.9"])
    run(data, part, "--max_steps", "3", "--stop_at_step", "1", "--ema", sets=["train.ema_decay=0.9"])
    run(
        data,
        part,
        "--max_steps",
        "3",
        "--ema",
        "--resume_from_checkpoint",
        "latest",
        sets=["train.ema_decay=0.9"],
    )
    a = ckpt_tensors(full / "checkpoint-3" / "ema_state.safetensors")
    b = ckpt_tensors(part / "checkpoint-3" / "ema_state.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    state = json.loads((part / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["extra"]["ema_num_updates"] == 3


def test_init_from_exported_tokenizer(data, tmp_path):
    """--init_from: step 0, the export's weights (lr 0 keeps them), a fresh discriminator; wrong shapes fail."""
    from models.dinovq import DinoVQModel
    from utils.cli import UserError

    first = tmp_path / "first"
    run(data, first, "--max_steps", "1")
    tuned = tmp_path / "tuned"
    run(data, tuned, "--max_steps", "1", "--init_from", str(first / "dinovq"), sets=["train.lr=0"])
    assert [r["step"] for r in read_log(tuned)] == [1]  # counts from 0, not from the source run's step
    src = dict(DinoVQModel.from_pretrained(first / "dinovq").named_parameters())
    got = dict(DinoVQModel.from_pretrained(tuned / "dinovq").named_parameters())
    for k, v in src.items():
        assert torch.equal(got[k], v), k
    with pytest.raises(UserError, match="encoder_embed_dim"):
        run(data, tmp_path / "bad", "--init_from", str(first / "dinovq"), sets=["model.encoder_embed_dim=16"])
    with pytest.raises(FileNotFoundError):
        run(data, tmp_path / "bad2", "--init_from", str(tmp_path / "missing"))
