"""Latent-space DINOv2: same output contract as the adapter; distillation loss decreases on tiny assets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from models.dinov2_encoder import DINOv2Encoder
from models.latent_dino_head import LatentDINOv2, LatentPatchHead

REPO = Path(__file__).resolve().parents[2]


def test_output_contract_and_head_roundtrip(tmp_path):
    torch.manual_seed(0)
    enc = DINOv2Encoder(variant="tiny14", resolution=56, input_range="-1_1")
    model = LatentDINOv2(enc, LatentPatchHead(enc.embed_dim, hidden=16, depth=2))
    lat = torch.randn(2, 4, 8, 8)
    out = model(lat, layers=[1, 2], return_cls=True)
    ref = enc(torch.rand(2, 3, 56, 56) * 2 - 1, layers=[1, 2], return_cls=True)
    assert out.patch_tokens.shape == ref.patch_tokens.shape and out.grid == ref.grid == (4, 4)
    assert out.cls.shape == ref.cls.shape and set(out.intermediate) == {1, 2}
    # if the head reproduces the adapter's patch embedding, the whole forward equals the adapter's
    img = torch.rand(1, 3, 56, 56) * 2 - 1
    emb = enc.model.embeddings.patch_embeddings(enc.preprocess(img))  # [1, 16, D]

    class Exact(LatentPatchHead):
        def forward(self, latents, grid):
            return emb

    exact = LatentDINOv2(enc, Exact(enc.embed_dim, hidden=4, depth=1))
    torch.testing.assert_close(exact(lat[:1]).patch_tokens, enc(img).patch_tokens)
    path = model.save_head(tmp_path / "head.safetensors")
    loaded = LatentDINOv2.from_head_file(enc, path)
    torch.testing.assert_close(loaded(lat).patch_tokens, model(lat).patch_tokens)
    other = DINOv2Encoder(variant="tiny14", resolution=28, input_range="-1_1")
    with pytest.raises(ValueError, match="trained for"):
        LatentDINOv2.from_head_file(other, path)
    # gradients reach the head only
    model(lat).patch_tokens.sum().backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None for p in enc.parameters())


def test_distillation_loss_decreases(tiny_assets, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "latent_head_train", REPO / "train/latent_dino_head/train.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    history = mod.main(
        [
            "--sd_path",
            str(tiny_assets["sd15"]),
            "--dino_source",
            str(tiny_assets["dinov2_official"]),
            "--dino_variant",
            "tiny14",
            "--resolution",
            "56",
            "--image_size",
            "64",
            "--data_dir",
            str(tiny_assets["imagenet"]),
            "--output_dir",
            str(tmp_path / "head"),
            "--layers",
            "1",
            "--hidden",
            "32",
            "--depth",
            "2",
            "--batch_size",
            "4",
            "--lr",
            "3e-3",
            "--max_train_steps",
            "12",
            "--log_every",
            "1",
            "--num_workers",
            "0",
            "--report_to",
            "none",
        ]
    )
    assert len(history) == 12
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "head" / "latent_dino_head.safetensors").is_file()
