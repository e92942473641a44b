"""Stage-2 weights outside the repo: per-branch diffusers LoRA files and DualAnoDiffPipeline (tiny SD-1.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    """A 'trained' interrelated dual model (alpha != rank) with a text-encoder LoRA, saved as stage 2 does."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from models.dual_lora import DualLoRAUNet, add_text_encoder_lora, save_dual_weights

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    dual = DualLoRAUNet(unet, rank=2, alpha=4.0)
    te = add_text_encoder_lora(
        CLIPTextModel.from_pretrained(tiny_assets["sd15"], subfolder="text_encoder"), 2
    )
    with torch.no_grad():  # lora_B starts at zero: give every tensor a value so a dropped one shows
        for p in dual.trainable_state_dict().values():
            p.normal_(0, 0.05)
        for name, p in te.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("stage2_export")
    save_dual_weights(dual, te, out)
    return dual.eval(), te.eval(), out


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 32, generator=g)


@torch.no_grad()
def test_branch_lora_files_load_into_stock_pipeline(tiny_assets, trained, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from models.dual_lora import BRANCH_LORA_NAMES, export_branch_loras

    dual, te, _ = trained
    paths = export_branch_loras(dual, te, tmp_path)
    assert {b: p.name for b, p in paths.items()} == {
        "blend": "pytorch_lora_weights_blend.safetensors",
        "fg": "pytorch_lora_weights_fg.safetensors",
    }
    n_unet = 2 * len(dual.lora_layers())
    x, t, e = _inputs()
    ids = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(1))
    outs = {}
    for branch, name in BRANCH_LORA_NAMES.items():
        keys = list(load_file(str(tmp_path / name)))
        assert sum(k.startswith("unet.") for k in keys) == n_unet
        assert all(".lora_A." in k or ".lora_B." in k for k in keys)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_assets["sd15"], safety_checker=None)
        pipe.load_lora_weights(str(tmp_path), weight_name=name)
        assert sum(".lora_" in n for n, _ in pipe.unet.named_parameters()) == n_unet  # nothing dropped
        outs[branch] = pipe.unet(x, t, encoder_hidden_states=e).sample
        ref = dual.forward_branch(x, t, e, branch)  # the branch alone: its LoRA set, no interaction
        assert (outs[branch] - ref).abs().max().item() <= 1e-5
        te_out = pipe.text_encoder(ids)[0]
        assert (te_out - te(ids)[0]).abs().max().item() <= 1e-5
    assert (outs["blend"] - outs["fg"]).abs().max().item() > 1e-3  # two different LoRA sets


def test_shared_mode_exports_the_single_set(tiny_assets, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from models.dual_lora import DualLoRAUNet, export_branch_loras

    dual = DualLoRAUNet(
        UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet"),
        rank=2,
        dual_mode="shared",
    )
    paths = export_branch_loras(dual, None, tmp_path)
    a, b = load_file(str(paths["blend"])), load_file(str(paths["fg"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("text_encoder.") for k in a)


@torch.no_grad()
def test_pipeline_gives_the_cli_triplets(tiny_assets, trained, tmp_path):
    from PIL import Image

    from eval.generate import LEGACY_FG_BACKGROUND, main
    from eval.mask_extraction import MaskParams, extract_mask
    from models.dual_anodiff_pipeline import DualAnoDiffPipeline

    _, _, weights_dir = trained
    pipe = DualAnoDiffPipeline.from_pretrained(tiny_assets["sd15"], weights_dir)
    assert pipe.weights_config["rank"] == 2
    pipe.set_progress_bar_config(disable=True)
    out = pipe(num_images=2, num_inference_steps=1, seed=7, batch_size=2)
    assert len(out.images) == len(out.fg_images) == len(out.masks) == 2
    assert out.images[0].size == (64, 64) and out.masks[0].mode == "L"
    assert set(np.unique(np.asarray(out.masks[1]))) <= {0, 255}
    # these weights were saved without --fg_background (older files): the black background they imply
    background = pipe.weights_config.get("fg_background", LEGACY_FG_BACKGROUND)
    assert background == "black"
    for fg, mask in zip(out.fg_images, out.masks):
        assert np.array_equal(np.asarray(mask) > 0, extract_mask(fg, MaskParams(background=background)))

    cli = main(
        [
            "stage2",
            "--pretrained_model_name_or_path",
            str(tiny_assets["sd15"]),
            "--weights_dir",
            str(weights_dir),
            "--mvtec_name",
            "hazelnut",
            "--mvtec_anomaly_name",
            "hole",
            "--output_root",
            str(tmp_path),
            "--num_images",
            "2",
            "--num_inference_steps",
            "1",
            "--seed",
            "7",
            "--device",
            "cpu",
            "--batch_size",
            "2",  # the same batches as the pipeline call: batched matmuls round differently per batch size
        ]
    )
    for i in range(2):
        for kind, got in (("image", out.images), ("fg", out.fg_images), ("mask", out.masks)):
            with Image.open(cli / kind / f"{i:04d}.png") as ref:
                assert np.array_equal(np.asarray(ref), np.asarray(got[i])), (kind, i)

    pt = pipe(num_images=1, num_inference_steps=1, seed=8, output_type="pt")
    assert pt.images.shape == (1, 3, 64, 64) and pt.images.min() >= -1 and pt.images.max() <= 1
    # sample 1 above was seed 8 too (in a batch of two: batched matmuls may round one level differently)
    diff = np.asarray(out.images[1]).astype(int) - np.asarray(pipe_image(pt.images[0])).astype(int)
    assert np.abs(diff).max() <= 1


def pipe_image(x):
    from utils.images import to_pil

    return to_pil(x, (-1.0, 1.0))


def test_branch_lora_export_bytes_do_not_depend_on_the_string_hash(tiny_assets, trained, tmp_path):
    """Issue 21 R11: peft's target_modules is a set, written by diffusers as ``list(set)`` -- an order that
    follows PYTHONHASHSEED, so two same-seed runs exported different bytes. Sorted lists are stable."""
    import json

    from safetensors import safe_open

    from models.dual_lora import BRANCH_LORA_NAMES, export_branch_loras

    dual, te, _ = trained
    export_branch_loras(dual, te, tmp_path)
    for name in BRANCH_LORA_NAMES.values():
        with safe_open(str(tmp_path / name), framework="pt") as f:
            meta = json.loads(f.metadata()["lora_adapter_metadata"])
        lists = {k: v for k, v in meta.items() if k.endswith("target_modules")}
        assert set(lists) == {"unet.target_modules", "text_encoder.target_modules"}
        for key, modules in lists.items():
            assert len(modules) > 1 and modules == sorted(modules), (key, modules)


def test_pipeline_presets_match_the_cli(tiny_assets, trained, monkeypatch):
    import eval.generate as generate
    import models.dual_sampling
    from models.dual_anodiff_pipeline import DualAnoDiffPipeline

    calls = []

    def fake_sample_pairs(components, **kw):
        calls.append(kw)
        n = len(kw["seeds"])
        return torch.zeros(n, 3, 8, 8), torch.zeros(n, 3, 8, 8)

    monkeypatch.setattr(models.dual_sampling, "sample_pairs", fake_sample_pairs)
    pipe = DualAnoDiffPipeline.from_pretrained(tiny_assets["sd15"], trained[2])
    pipe.set_progress_bar_config(disable=True)
    pipe(num_images=1, preset="official")
    pipe(num_images=1)
    pipe(num_images=1, preset="official", num_inference_steps=5, sampler="ddim", guidance_scale=1.0)
    got = [(c["scheduler"], c["num_inference_steps"], c["guidance_scale"]) for c in calls]
    assert got[0] == ("pndm", 100, 2.5) == tuple(generate.PRESETS["official"].values())  # DualAnoDiff's
    assert got[1] == ("ddim", 50, 2.5) == tuple(generate.PRESETS["fast"].values())  # the CLI's default
    assert got[2] == ("ddim", 5, 1.0)  # explicit values override the preset
    assert calls[0]["prompt_blend"] == "a vfx with sks" and calls[0]["prompt_fg"] == "sks"
    with pytest.raises(ValueError, match="preset"):
        pipe(num_images=1, preset="slow")
