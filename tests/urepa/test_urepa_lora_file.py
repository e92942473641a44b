"""The U-REPA LoRA files load into a stock StableDiffusionPipeline and reproduce the trained U-Net.

Before the fix the checkpoint's ``pytorch_lora_weights.safetensors`` mixed ``lora.down/up`` (attention) and
``lora_A/B`` (conv) keys; ``load_lora_weights`` then dropped every attention tensor without a warning.
"""

from __future__ import annotations

import pytest
import torch

from models.sd15_unet_aligned import SD15UNetAligned


def _trained_model(tiny_assets, rank: int, alpha: int) -> SD15UNetAligned:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    model = SD15UNetAligned(
        unet, D=64, grid=(2, 2), lora_config={"rank": rank, "alpha": alpha}, verbose=False
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: lora_B starts at zero, which would hide a dropped tensor
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 32, generator=g)


@torch.no_grad()
def _stock_unet_output(tiny_assets, lora_dir, weight_name=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_assets["sd15"], safety_checker=None)
    kwargs = {"weight_name": weight_name} if weight_name else {}
    pipe.load_lora_weights(str(lora_dir), **kwargs)
    n_lora = sum(1 for n, _ in pipe.unet.named_parameters() if ".lora_" in n)
    x, t, e = _inputs()
    return pipe.unet(x, t, encoder_hidden_states=e).sample, n_lora


@pytest.mark.parametrize("rank,alpha", [(4, 4), (4, 8)])
def test_checkpoint_lora_files_load_into_stock_pipeline(tiny_assets, tmp_path, rank, alpha):
    from safetensors.torch import load_file

    from train.core.ema import ParamEMA
    from train.urepa.checkpoint import EMA_LORA_DIR, LORA_FILE, save_extra_state

    model = _trained_model(tiny_assets, rank, alpha)
    ema = ParamEMA(model, decay=0.5)
    with torch.no_grad():  # make the EMA differ from the live weights
        for name in ema.shadow:
            if ".lora_B." in name:
                ema.shadow[name] = ema.shadow[name] * 0.5
    save_extra_state(model, ema, {"model": {}}, tmp_path)  # the training loop's writer

    keys = list(load_file(str(tmp_path / LORA_FILE)))
    n_model = sum(1 for n, _ in model.named_parameters() if ".lora_" in n)
    assert len(keys) == n_model  # 44 on the tiny U-Net: 16 mid-block attention + 28 conv tensors
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any("attn1.to_q" in k for k in keys) and any(".conv1." in k for k in keys)

    x, t, e = _inputs()
    with torch.no_grad():
        live = model.unet(x, t, encoder_hidden_states=e).sample
        with ema.average_parameters(model):
            averaged = model.unet(x, t, encoder_hidden_states=e).sample
    out, n_loaded = _stock_unet_output(tiny_assets, tmp_path)
    assert n_loaded == n_model  # nothing dropped
    assert (out - live).abs().max().item() <= 1e-5
    out_ema, _ = _stock_unet_output(tiny_assets, tmp_path / EMA_LORA_DIR)
    assert (out_ema - averaged).abs().max().item() <= 1e-5
    assert (averaged - live).abs().max().item() > 1e-3  # the two files really differ
    # a Hugging Face model card next to each LoRA file
    assert "(EMA weights)" in (tmp_path / EMA_LORA_DIR / "README.md").read_text()
    assert f'weight_name="{LORA_FILE}"' in (tmp_path / "README.md").read_text()


def test_save_lora_weights_through_diffusers(tiny_assets, tmp_path):
    model = _trained_model(tiny_assets, rank=4, alpha=8)
    path = model.save_lora_weights(tmp_path, weight_name="urepa_lora.safetensors")
    assert path.is_file()
    x, t, e = _inputs()
    with torch.no_grad():
        ref = model.unet(x, t, encoder_hidden_states=e).sample
    out, _ = _stock_unet_output(tiny_assets, tmp_path, weight_name="urepa_lora.safetensors")
    assert (out - ref).abs().max().item() <= 1e-5  # alpha != rank is carried by the adapter metadata


def test_lora_metadata_target_modules_are_sorted(tiny_assets):
    """Issue 21 (as R11 for stage 2): peft's target_modules set was written in string-hash order, so two
    same-seed runs' LoRA files differed in bytes; sorted, the metadata is the same in every process."""
    meta = _trained_model(tiny_assets, rank=4, alpha=4).lora_adapter_metadata()
    modules = meta["target_modules"]
    assert isinstance(modules, list) and len(modules) > 1 and modules == sorted(modules)
