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
