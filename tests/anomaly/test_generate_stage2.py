"""Generation on the tiny SD-1.5: stage-2 triplets with the dual model, stage-1 images, resumability."""

from __future__ import annotations

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def dual_weights(tiny_assets, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from models.dual_lora import DualLoRAUNet, save_dual_weights

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    dual = DualLoRAUNet(unet, rank=2)
    with torch.no_grad():  # non-zero LoRA B / interaction so that the weights matter
        for p in dual.trainable_state_dict().values():
            p.normal_(0, 0.02)
    out = tmp_path_factory.mktemp("stage2")
    save_dual_weights(dual, None, out)
    return out


def test_stage2_triplets_and_resume(tiny_assets, dual_weights, tmp_path):
    from eval.generate import main

    common = [
        "stage2",
        "--pretrained_model_name_or_path",
        str(tiny_assets["sd15"]),
        "--weights_dir",
        str(dual_weights),
        "--mvtec_name",
        "hazelnut",
        "--mvtec_anamaly_name",
        "hole",
        "--output_root",
        str(tmp_path),
        "--num_inference_steps",
        "2",
        "--device",
        "cpu",
        "--batch_size",
        "2",
    ]
    out = main([*common, "--num_images", "2", "--scheduler", "dpmsolver++"])
    files = {k: sorted((out / k).glob("*.png")) for k in ("image", "fg", "mask")}
    assert [p.name for p in files["mask"]] == ["0000.png", "0001.png"] and len(files["image"]) == 2
    with Image.open(files["image"][0]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    with Image.open(files["mask"][0]) as im:
        assert im.mode == "L" and set(im.getdata()) <= {0, 255}
    before = {p: p.stat().st_mtime_ns for p in files["image"]}
    (out / "mask" / "0001.png").unlink()  # an incomplete triplet is redone
    main([*common, "--num_images", "3", "--scheduler", "dpmsolver++"])
    assert sorted(p.name for p in (out / "mask").glob("*.png")) == ["0000.png", "0001.png", "0002.png"]
    assert files["image"][0].stat().st_mtime_ns == before[files["image"][0]]  # skipped
    assert files["image"][1].stat().st_mtime_ns != before[files["image"][1]]  # regenerated


def test_stage2_sampling_is_per_sample_deterministic(tiny_assets, dual_weights):
    from eval.generate import sample_pairs
    from models.dual_lora import load_dual_unet

    comps = load_dual_unet(tiny_assets["sd15"], dual_weights)
    a_blend, a_fg = sample_pairs(comps, "a vfx with sks", "sks", [5, 6], num_inference_steps=2)
    b_blend, b_fg = sample_pairs(comps, "a vfx with sks", "sks", [6], num_inference_steps=2)
    assert torch.allclose(a_blend[1], b_blend[0], atol=1e-4) and torch.allclose(a_fg[1], b_fg[0], atol=1e-4)
    assert not torch.allclose(a_blend[0], a_fg[0])


def test_stage1_with_lora_and_missing_weights(tiny_assets, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from eval.generate import main
    from utils.cli import UserError

    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_dir = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(lora_dir, unet_lora_layers=get_peft_model_state_dict(unet))
    common = [
        "stage1",
        "--pretrained_model_name_or_path",
        str(tiny_assets["sd15"]),
        "--lora_dir",
        str(lora_dir),
        "--mvtec_name",
        "hazelnut",
        "--output_root",
        str(tmp_path / "gen"),
        "--num_inference_steps",
        "2",
        "--device",
        "cpu",
        "--num_images",
        "2",
    ]
    out = main(common)
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png"]
    stamp = (out / "0000.png").stat().st_mtime_ns
    main(common)  # nothing left to do: the pipeline is not even loaded
    assert (out / "0000.png").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="stage-1 LoRA"):
        main([*common[:3], "--lora_dir", str(tmp_path / "missing"), *common[5:-1], "3"])
