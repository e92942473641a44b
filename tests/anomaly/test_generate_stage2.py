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


@pytest.fixture(scope="module")
def dual_components(tiny_assets, dual_weights):
    from models.dual_lora import load_dual_unet

    return load_dual_unet(tiny_assets["sd15"], dual_weights)


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


def test_stage2_sampling_is_per_sample_deterministic(dual_components):
    from eval.generate import sample_pairs

    comps = dual_components
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


def test_presets_fill_only_what_is_not_given():
    from eval.generate import parse_args

    base = ["stage2", "--weights_dir", "w", "--mvtec_name", "hazelnut", "--mvtec_anomaly_name", "hole"]
    official = parse_args([*base, "--preset", "official"])
    assert (official.scheduler, official.num_inference_steps, official.guidance_scale) == ("pndm", 100, 2.5)
    assert (official.prompt_blend, official.prompt_fg, official.negative_prompt) == (
        "a vfx with sks",
        "sks",
        "",
    )
    fast = parse_args(base)
    assert (fast.preset, fast.scheduler, fast.num_inference_steps, fast.guidance_scale) == (
        "fast",
        "ddim",
        50,
        2.5,
    )
    mixed = parse_args([*base, "--preset", "official", "--num_inference_steps", "7", "--scheduler", "ddim"])
    assert (mixed.scheduler, mixed.num_inference_steps, mixed.guidance_scale) == ("ddim", 7, 2.5)


@torch.no_grad()
def test_pndm_sampler_equals_the_official_pipeline_loop(tiny_assets, dual_components):
    """sample_pairs(scheduler="pndm") against DualAnoDiff's pipeline loop, written here from its code: the
    stock SD-1.5 PNDM scheduler on ONE "(b f)" batch [blend, fg], latents = randn([2, C, h, w]) from the
    generator, embeddings (b f) of cat([uncond, blend]) and cat([uncond, fg]), guidance on the chunked
    prediction, images[0] = blend, images[1] = fg."""
    from diffusers import PNDMScheduler

    from eval.generate import encode_prompts, sample_pairs

    comps = dual_components
    dual, vae = comps["dual_unet"], comps["vae"]
    steps, w, seed = 4, 2.5, 11
    got_b, got_f = sample_pairs(comps, "a vfx with sks", "sks", [seed], "pndm", steps, w, "")

    def unet_bf(x, t, ehs):  # the dual U-Net on the official "(b f)" layout
        pb, pf = dual(x[0::2], x[1::2], t, ehs[0::2], ehs[1::2])
        return torch.stack([pb, pf], dim=1).flatten(0, 1)

    def enc(p):
        return encode_prompts(comps["tokenizer"], comps["text_encoder"], [p], "cpu")

    sched = PNDMScheduler.from_pretrained(tiny_assets["sd15"], subfolder="scheduler")
    sched.set_timesteps(steps)
    blend, fg = torch.cat([enc(""), enc("a vfx with sks")]), torch.cat([enc(""), enc("sks")])
    prompt_embeds = torch.stack([blend, fg], dim=1).flatten(0, 1)
    shape = (2, dual.config.in_channels, dual.config.sample_size, dual.config.sample_size)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    for t in sched.timesteps:
        latent_in = sched.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet_bf(latent_in, t, prompt_embeds)
        uncond, cond = noise_pred.chunk(2)
        latents = sched.step(uncond + w * (cond - uncond), t, latents).prev_sample
    images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(got_b[0], images[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_f[0], images[1], atol=1e-4, rtol=1e-4)


def test_validation_uses_the_generation_sampler_with_the_flags(monkeypatch, tmp_path):
    """Stage-2 validation samples through the generation sampler (models.dual_sampling.sample_pairs, which
    eval/generate.py uses) with the flags' sampler and guidance."""
    import argparse

    import models.dual_sampling
    from train.anomaly.validation import validate_stage2

    calls = []

    def fake_sample_pairs(components, prompt_blend, prompt_fg, seeds, **kw):
        calls.append((prompt_blend, prompt_fg, seeds, kw))
        return torch.zeros(len(seeds), 3, 8, 8), torch.zeros(len(seeds), 3, 8, 8)

    monkeypatch.setattr(models.dual_sampling, "sample_pairs", fake_sample_pairs)
    args = argparse.Namespace(
        output_dir=str(tmp_path),
        instance_prompt_blend="a vfx with sks",
        instance_prompt_fg="sks",
        num_validation_images=3,
        validation_scheduler="pndm",
        validation_inference_steps=9,
        validation_guidance_scale=4.0,
        resolution=64,
        seed=7,
    )
    dual = torch.nn.Linear(1, 1)
    path = validate_stage2(argparse.Namespace(trackers=[]), args, dual, None, None, None, None, step=3)
    assert path.is_file() and dual.training
    (blend, fg, seeds, kw) = calls[0]
    assert (blend, fg, seeds) == ("a vfx with sks", "sks", [7, 8, 9])
    assert kw == {"scheduler": "pndm", "num_inference_steps": 9, "guidance_scale": 4.0, "resolution": 64}
