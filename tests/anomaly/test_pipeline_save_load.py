"""DualAnoDiffPipeline.save_pretrained -> from_pretrained (this class, and diffusers' DiffusionPipeline with the
folder's own code) gives the same triplets; a BCM model with a text-encoder LoRA, on the tiny SD-1.5."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def bcm_weights(tiny_assets, tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from models.bcm_reference_attention import BCMDualLoRAUNet
    from models.dual_lora import add_text_encoder_lora, save_dual_weights

    torch.manual_seed(0)
    dual = BCMDualLoRAUNet(
        UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet"), rank=2
    )
    te = add_text_encoder_lora(
        CLIPTextModel.from_pretrained(tiny_assets["sd15"], subfolder="text_encoder"), 2
    )
    with torch.no_grad():  # every tensor non-trivial, so that a dropped one shows
        for p in dual.trainable_state_dict().values():
            p.normal_(0, 0.05)
        for name, p in te.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("bcm_weights")
    save_dual_weights(dual, te, out, extra={"fg_background": "grey"})
    return out


def _background(tiny_assets) -> Image.Image:
    path = sorted((tiny_assets["mvtec"] / "hazelnut" / "train" / "good").glob("*.png"))[0]
    img = Image.open(path).convert("RGB")
    return Image.eval(img, lambda p: p // 2)  # any cut-out image will do for the round trip


def _run(pipe, background):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        num_images=2, num_inference_steps=2, seed=3, batch_size=2, backgrounds=[background], output_type="pt"
    )


@torch.no_grad()
def test_save_pretrained_round_trip(tiny_assets, bcm_weights, tmp_path, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dyn
    from diffusers import DiffusionPipeline

    from models.dual_anodiff_pipeline import DualAnoDiffPipeline

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    background = _background(tiny_assets)
    pipe = DualAnoDiffPipeline.from_pretrained(tiny_assets["sd15"], bcm_weights)
    ref = _run(pipe, background)
    with pytest.raises(ValueError, match="backgrounds="):
        pipe(num_images=1, num_inference_steps=1)

    saved = tmp_path / "saved"
    pipe.save_pretrained(saved)
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["dual_anodiff_pipeline", "DualAnoDiffPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (saved / "unet" / "dual_config.json").is_file()

    for loaded in (
        DualAnoDiffPipeline.from_pretrained(saved),
        DiffusionPipeline.from_pretrained(saved, trust_remote_code=True),
    ):
        assert type(loaded).__name__ == "DualAnoDiffPipeline"
        assert loaded.weights_config["fg_background"] == "grey"
        out = _run(loaded, background)
        torch.testing.assert_close(out.images, ref.images, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.fg_images, ref.fg_images, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        DualAnoDiffPipeline.from_pretrained(tiny_assets["sd15"])
