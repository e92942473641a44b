"""Stage-1 and stage-2 trainers end to end on the tiny assets (CPU, a few steps).

* resuming stage 1 from a mid-run checkpoint repeats the uninterrupted run's losses;
* the final stage-1 LoRA loads into a stock StableDiffusionPipeline (load_lora_weights) and gives the same
  U-Net as an independent implementation of LoRA (DualLoRAUNet, shared mode) fed the same file;
* stage 2 started from a stage-1 checkpoint copies the LoRA into both branch sets and continues the step count.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _load_main(rel: str):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_").replace("-", "_"), REPO / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _common(tiny, out: Path, steps: int) -> list[str]:
    return [
        "--mixed_precision",
        "no",
        "--mvtec_name",
        "hazelnut",
        "--pretrained_model_name_or_path",
        str(tiny["sd15"]),
        "--instance_data_dir",
        str(tiny["mvtec"]),
        "--output_dir",
        str(out),
        "--resolution",
        "64",
        "--train_batch_size",
        "1",
        "--learning_rate",
        "1e-3",
        "--max_train_steps",
        str(steps),
        "--rank",
        "2",
        "--train_text_encoder",
        "--use_dinov2_loss",
        "--dinov2_loss_weight",
        "0.1",
        "--dinov2_model_name",
        "tiny14",
        "--dinov2_loss_type",
        "l2",
        "--dinov2_feature_layers",
        "1",
        "3",
        "--dinov2_weights",
        str(tiny["dinov2_official"]),
        "--dinov2_resolution",
        "28",
        "--checkpointing_steps",
        "2",
        "--report_to",
        "none",
        "--seed",
        "3",
    ]


def _losses(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def stage1_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1") / "run"
    assert (
        _load_main("train/stage1-full/train.py")(
            _common(tiny_assets, out, 4) + ["--instance_prompt", "a vfx"]
        )
        == 0
    )
    return out


def test_stage1_resume_reproduces_losses(stage1_run, tiny_assets, tmp_path):
    full = _losses(stage1_run)
    assert sorted(full) == [1, 2, 3, 4]
    assert (stage1_run / "checkpoint-2").is_dir() and (stage1_run / "checkpoint-4").is_dir()
    assert all(abs(r["loss"] - r["loss_mse"] - 0.1 * r["loss_dinov2"]) < 1e-5 for r in full.values())
    # the default term (fast, --dinov2_sample_fraction 0.5) runs on a random half of the samples, weighted 2
    assert all((r["loss_dinov2"] > 0) == (r["dinov2_fraction"] == 1.0) for r in full.values())
    assert {r["dinov2_fraction"] for r in full.values()} == {0.0, 1.0}
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(stage1_run / "checkpoint-2", resumed / "checkpoint-2")
    main = _load_main("train/stage1-full/train.py")
    assert (
        main(
            _common(tiny_assets, resumed, 4)
            + ["--instance_prompt", "a vfx", "--resume_from_checkpoint", "latest"]
        )
        == 0
    )
    again = _losses(resumed)
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "loss_mse", "loss_dinov2", "dinov2_fraction"):
            assert again[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)


@torch.no_grad()
def test_stage1_lora_loads_into_stock_pipeline(stage1_run, tiny_assets):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from models.dual_lora import DualLoRAUNet
    from train.anomaly.components import read_stage1_lora

    pipe = StableDiffusionPipeline.from_pretrained(tiny_assets["sd15"], safety_checker=None)
    pipe.load_lora_weights(stage1_run)
    unet_sd, te_sd = read_stage1_lora(stage1_run)
    assert te_sd, "the text-encoder LoRA was trained and must be saved"
    ref = DualLoRAUNet(
        UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet"),
        rank=2,
        dual_mode="shared",
    )
    ref.load_single_lora(unet_sd)
    g = torch.Generator().manual_seed(0)
    x, e, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g), torch.tensor([400])
    out_pipe = pipe.unet(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(out_pipe, ref.forward_branch(x, t, e, "blend"), atol=1e-5, rtol=1e-4)
    base = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    assert (out_pipe - base(x, t, encoder_hidden_states=e).sample).abs().max() > 1e-4  # LoRA was trained
    # the Hugging Face model card next to the LoRA
    from huggingface_hub import ModelCard

    card = ModelCard.load(stage1_run / "README.md")
    assert card.data.base_model == str(tiny_assets["sd15"]) and card.data.instance_prompt == "a vfx"
    assert "lora" in card.data.tags and 'weight_name="pytorch_lora_weights.safetensors"' in card.text


def test_stage2_starts_from_stage1_checkpoint(stage1_run, tiny_assets, tmp_path):
    from safetensors.torch import load_file

    from train.anomaly.components import read_stage1_lora

    out = tmp_path / "stage2"
    args = _common(tiny_assets, out, 5) + [
        "--mvtec_anamaly_name",
        "hole",
        "--instance_prompt_blend",
        "a vfx with sks",
        "--instance_prompt_fg",
        "sks",
        "--resume_from_checkpoint",
        str(stage1_run / "checkpoint-4"),
        "--learning_rate",
        "1e-12",
    ]
    assert _load_main("train/stage2-dual/train.py")(args) == 0
    assert sorted(_losses(out)) == [5], "the step count continues from the stage-1 checkpoint (4)"
    assert (out / "checkpoint-5" / "dual_config.json").is_file()
    # per-branch diffusers LoRA files for stock pipelines (loading them: tests/anomaly/test_dual_export.py)
    assert (out / "pytorch_lora_weights_blend.safetensors").is_file()
    assert (out / "pytorch_lora_weights_fg.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "pytorch_lora_weights_blend.safetensors" in card and "pytorch_lora_weights_fg.safetensors" in card
    assert "instance_prompt: a vfx with sks" in card and "| defect type | hole |" in card
    config = json.loads((out / "dual_config.json").read_text())
    assert config["stage_start_step"] == 4 and config["dual_mode"] == "interrelated"
    unet_sd, te_sd = read_stage1_lora(stage1_run / "checkpoint-4")
    dual = load_file(str(out / "dual_unet.safetensors"))
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    for i in (0, 1):  # lr 1e-12: one step leaves the copied weights unchanged
        torch.testing.assert_close(dual[f"unet.{name}.lora_A.{i}.weight"], unet_sd[f"{name}.lora_A.weight"])
        torch.testing.assert_close(dual[f"unet.{name}.lora_B.{i}.weight"], unet_sd[f"{name}.lora_B.weight"])
    te = load_file(str(out / "text_encoder_lora.safetensors"))
    assert set(te) == set(te_sd)
    for k in te:
        torch.testing.assert_close(te[k], te_sd[k])
    # interaction modules start as the identity (zero output projection)
    proj = [v for k, v in dual.items() if k.endswith("proj_out.weight")]
    assert proj and all(v.abs().max() < 1e-9 for v in proj)


def test_sample_pair_noise_one_draw_in_shared_mode():
    from train.anomaly.diffusion import sample_noise, sample_pair_noise

    lat = torch.zeros(2, 4, 8, 8)
    shared = sample_pair_noise(lat, lat + 1, torch.Generator().manual_seed(0), shared=True)
    independent = sample_pair_noise(lat, lat + 1, torch.Generator().manual_seed(0), shared=False)
    assert torch.equal(shared[0], shared[1])
    assert not torch.allclose(independent[0], independent[1])
    # the blend draw comes first either way (interrelated runs draw what they drew before)
    assert torch.equal(independent[0], shared[0])
    g = torch.Generator().manual_seed(0)
    first, second = sample_noise(lat, g), sample_noise(lat, g)
    assert torch.equal(independent[0], first) and torch.equal(independent[1], second)


def test_stage2_shared_mode_uses_one_noise_for_both_branches(stage1_run, tiny_assets, tmp_path, monkeypatch):
    """--dual_mode shared is the seed's stage 2: the trainer's step draws ONE noise tensor for the pair."""
    import train.anomaly.diffusion as diffusion

    seen = []
    original = diffusion.sample_pair_noise

    def recording(lat_b, lat_f, gen, shared):
        noise = original(lat_b, lat_f, gen, shared)
        seen.append((shared, noise))
        return noise

    monkeypatch.setattr(diffusion, "sample_pair_noise", recording)
    out = tmp_path / "stage2-shared"
    args = _common(tiny_assets, out, 5) + [
        "--mvtec_anamaly_name",
        "hole",
        "--resume_from_checkpoint",
        str(stage1_run / "checkpoint-4"),
        "--dual_mode",
        "shared",
    ]
    args.remove("--use_dinov2_loss")  # no DINOv2 term: only the noise matters here
    assert _load_main("train/stage2-dual/train.py")(args) == 0
    assert seen and all(shared for shared, _ in seen)
    assert all(torch.equal(noise[0], noise[1]) for _, noise in seen)
    assert json.loads((out / "dual_config.json").read_text())["dual_mode"] == "shared"
