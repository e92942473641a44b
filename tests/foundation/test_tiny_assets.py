"""Embedded default: tiny SD-1.5 pipeline, tiny DINOv2, synthetic MVTec AD / ImageNet; determinism, caching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from preprocessing import make_tiny_assets as mta
from preprocessing.synthetic_mvtec import render_sample
from utils.images import load_rgb

# Written out from stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (not imported from the generator).
SD15_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
SD15_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


def test_sd15_pipeline_loads_back_and_samples(tiny_assets):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_assets["sd15"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.vae.config.latent_channels == 4 and pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer) == 49408
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    sched = pipe.scheduler.config
    assert (sched.beta_schedule, sched.num_train_timesteps, sched.prediction_type) == (
        "scaled_linear",
        1000,
        "epsilon",
    )
    out = pipe(
        "a photo of a hazelnut",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    # The VAE round trip keeps the 8x latent layout of SD-1.5.
    latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_sd15_block_structure_matches_sd15(tiny_assets):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    assert [type(b).__name__ for b in unet.down_blocks] == SD15_DOWN
    assert type(unet.mid_block).__name__ == "UNetMidBlock2DCrossAttn"
    assert [type(b).__name__ for b in unet.up_blocks] == SD15_UP
    # SD-1.5 has 2 resnets per down block and 3 per up block; hooks use resnets[-1].
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2, 2]
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3, 3]
    assert len(unet.mid_block.resnets) == 2
    names = dict(unet.named_modules())
    for path in (
        "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2",
        "down_blocks.1.attentions.0.proj_in",
    ):
        assert path in names, path
    assert unet.config.in_channels == unet.config.out_channels == 4 and unet.config.sample_size == 8


def test_tokenizer_matches_open_clip(tiny_assets):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer.from_pretrained(Path(tiny_assets["sd15"]) / "tokenizer")
    ref = SimpleTokenizer()
    for text in (
        "a photo of a cat",
        "A photo of sks Hazelnut with a CRACK!",
        "two  dogs, 3 cats & naïve café",
    ):
        expected = [ref.sot_token_id, *ref.encode(text), ref.eot_token_id]
        assert hf(text).input_ids == expected, text
    assert hf("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = hf("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == hf.pad_token_id == 49407


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_mvtec_layout_and_exact_masks(tiny_assets):
    root = Path(tiny_assets["mvtec"])
    expected = {"hazelnut": {"hole", "crack"}, "carpet": {"cut", "color"}}
    assert {p.name for p in root.iterdir() if p.is_dir()} == set(expected)
    for cls, defects in expected.items():
        assert len(list((root / cls / "train" / "good").glob("*.png"))) == 8
        assert len(list((root / cls / "test" / "good").glob("*.png"))) == 3
        assert {p.name for p in (root / cls / "test").iterdir()} == defects | {"good"}
        assert {p.name for p in (root / cls / "ground_truth").iterdir()} == defects
        for defect in defects:
            images = sorted((root / cls / "test" / defect).glob("*.png"))
            assert [p.name for p in images] == [f"{i:03d}.png" for i in range(6)]
            for i, img_path in enumerate(images):
                mask_img = Image.open(root / cls / "ground_truth" / defect / f"{img_path.stem}_mask.png")
                assert mask_img.mode == "L" and mask_img.size == (64, 64)
                mask = np.asarray(mask_img)
                assert set(np.unique(mask)) == {0, 255}
                image = _read(img_path)
                assert image.shape == (64, 64, 3)
                good, _, _ = render_sample(cls, "test", defect, i, size=64)
                changed = (image != good).any(-1)
                np.testing.assert_array_equal(changed, mask == 255, err_msg=str(img_path))
                # visible: the defect is not a 1-level nudge
                assert np.abs(image.astype(int) - good.astype(int))[mask == 255].max() > 40


def test_imagenet_layout_corrupt_file_and_classes(tiny_assets):
    root = Path(tiny_assets["imagenet"])
    classes = json.loads(Path(tiny_assets["imagenet_classes"]).read_text())
    assert classes["0"] == ["n01440764", "tench"] and len(classes) == 5
    synsets = [classes[str(i)][0] for i in range(5)]
    cls_loc = root / "ILSVRC" / "Data" / "CLS-LOC"
    corrupt = Path(tiny_assets["imagenet_corrupt"])
    assert corrupt.is_file() and corrupt.parent == cls_loc / "train" / synsets[0]
    assert load_rgb(corrupt) is None
    means = {}
    for split, count in (("train", 12), ("val", 4)):
        assert sorted(p.name for p in (cls_loc / split).iterdir()) == sorted(synsets)
        for k, synset in enumerate(synsets):
            files = sorted(p for p in (cls_loc / split / synset).glob("*.JPEG") if p != corrupt)
            assert len(files) == count
            imgs = [load_rgb(p) for p in files]
            assert all(im is not None and im.size == (64, 64) for im in imgs)
            means[split, k] = np.stack([np.asarray(im, np.float32).mean((0, 1)) for im in imgs])
    # Distinguishable: nearest class-mean colour (from train) classifies every val image.
    centroids = np.stack([means["train", k].mean(0) for k in range(5)])
    for k in range(5):
        pred = np.argmin(((means["val", k][:, None] - centroids[None]) ** 2).sum(-1), 1)
        assert (pred == k).all()


def test_dinov2_assets_load(tiny_assets):
    from models.dinov2_encoder import DINOv2Encoder

    x = torch.rand(1, 3, 28, 28)
    official = DINOv2Encoder.from_pretrained(
        str(tiny_assets["dinov2_official"]), variant="tiny14", resolution=28, input_range="0_1"
    )
    hf = DINOv2Encoder.from_pretrained(
        str(tiny_assets["dinov2_hf"]), variant="tiny14", resolution=28, input_range="0_1"
    )
    a, b = official(x, return_cls=True), hf(x, return_cls=True)
    assert a.patch_tokens.shape == (1, 4, 64)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens)


def test_generation_is_deterministic(tmp_path):
    mta.generate_tiny_assets(tmp_path / "a")
    mta.generate_tiny_assets(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 150
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def _fake_generator(calls: list, fail: bool = False):
    def generate(out_dir, size, seed):
        calls.append(Path(out_dir))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "payload.txt").write_text(f"{len(calls)}")
        if fail:
            raise KeyboardInterrupt  # an interrupted run

    return generate


def test_caching_regeneration_and_atomicity(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(mta, "generate_tiny_assets", _fake_generator(calls))
    root = tmp_path / "tiny"
    paths = mta.ensure_tiny_assets(root)
    assert paths["root"] == root.absolute() and len(calls) == 1
    assert (root / "payload.txt").read_text() == "1"
    mta.ensure_tiny_assets(root)
    assert len(calls) == 1  # cached: stamp current, files present
    (root / "payload.txt").unlink()
    mta.ensure_tiny_assets(root)
    assert len(calls) == 2 and (root / "payload.txt").read_text() == "2"  # missing file -> regenerated
    monkeypatch.setattr(mta, "ASSETS_VERSION", mta.ASSETS_VERSION + 1)
    mta.ensure_tiny_assets(root)
    assert len(calls) == 3  # version bump -> regenerated
    monkeypatch.setattr(mta, "generator_fingerprint", lambda: "edited-generator")
    mta.ensure_tiny_assets(root)
    assert len(calls) == 4  # generator code (or package versions) changed -> regenerated
    mta.ensure_tiny_assets(root, force=True)
    assert len(calls) == 5
    mta.ensure_tiny_assets(root, size=32)
    assert len(calls) == 6  # other options -> regenerated
    # An interrupted run leaves the previous complete tree and no temporary directory.
    monkeypatch.setattr(mta, "generate_tiny_assets", _fake_generator(calls, fail=True))
    with pytest.raises(KeyboardInterrupt):
        mta.ensure_tiny_assets(root, force=True, size=32)
    assert (root / "payload.txt").read_text() == "6" and mta.is_complete(root, size=32)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["tiny"]


def test_refuses_to_replace_foreign_directory(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(mta, "generate_tiny_assets", _fake_generator(calls))
    (tmp_path / "empty").mkdir()
    mta.ensure_tiny_assets(tmp_path / "empty")  # an existing empty directory is fine
    assert len(calls) == 1 and mta.is_complete(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a tiny-assets directory"):
        mta.ensure_tiny_assets(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="multiple of 8"):
        mta.ensure_tiny_assets(tmp_path / "x", size=60)
