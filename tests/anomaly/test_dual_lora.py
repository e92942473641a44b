"""Dual-interrelated LoRA U-Net: starts as stage 1, branches interact (shared mode does not), weights I/O."""

from __future__ import annotations

import copy

import pytest
import torch

from models.dual_lora import DualLoRAUNet, load_dual_unet, normalize_lora_keys, save_dual_weights

_BASE = {}


def _unet():
    """A fresh copy of one tiny SD-1.5-shaped U-Net (built once: construction dominates these tests)."""
    if "unet" not in _BASE:
        from preprocessing.tiny_sd15 import build_tiny_unet

        _BASE["unet"] = build_tiny_unet(0)
    return copy.deepcopy(_BASE["unet"])


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([300]),
        torch.randn(1, 6, 32, generator=g),
        torch.randn(1, 6, 32, generator=g),
    )


def _peft_unet_with_random_lora(rank=2):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _unet()
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    diffusers_sd = {
        f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()
    }
    return unet, normalize_lora_keys(diffusers_sd, "unet")


@torch.no_grad()
def test_fresh_dual_model_equals_stage1_lora_unet():
    stage1, lora = _peft_unet_with_random_lora()
    dual = DualLoRAUNet(_unet(), rank=2)
    assert dual.load_single_lora(lora) == 32 * 4
    xb, xf, t, eb, ef = _inputs()
    pb, pf = dual(xb, xf, t, eb, ef)
    torch.testing.assert_close(pb, stage1(xb, t, encoder_hidden_states=eb).sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pf, stage1(xf, t, encoder_hidden_states=ef).sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dual.forward_branch(xb, t, eb, "blend"), pb, atol=1e-5, rtol=1e-5)
    # the LoRA really is active (differs from the base U-Net)
    assert (pb - _unet()(xb, t, encoder_hidden_states=eb).sample).abs().max() > 1e-3


def _randomise(dual: DualLoRAUNet):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in dual.trainable_state_dict().values():
            p.normal_(0, 0.1)


@torch.no_grad()
def test_branches_interact_only_in_interrelated_mode():
    xb, xf, t, eb, ef = _inputs()
    dual = DualLoRAUNet(_unet(), rank=2, dual_mode="interrelated")
    _randomise(dual)
    pb1, _ = dual(xb, xf, t, eb, ef)
    pb2, _ = dual(xb, xf + 1.0, t, eb, ef)
    assert (pb1 - pb2).abs().max() > 1e-3, "changing the fg input must change the blend prediction"
    _, pf1 = dual(xb, xf, t, eb, ef)
    _, pf2 = dual(xb, xf, t, eb + 1.0, ef)
    assert (pf1 - pf2).abs().max() > 1e-3, "the blend prompt must reach the fg branch too"

    shared = DualLoRAUNet(_unet(), rank=2, dual_mode="shared")
    _randomise(shared)
    assert len(shared.interactions) == 0
    sb1, sf1 = shared(xb, xf, t, eb, ef)
    sb2, _ = shared(xb, xf + 1.0, t, eb, ef)
    torch.testing.assert_close(sb1, sb2, atol=0, rtol=0)
    # shared: both branches use the same LoRA, i.e. each equals a plain single-branch pass
    torch.testing.assert_close(sf1, shared.forward_branch(xf, t, ef, "fg"), atol=1e-5, rtol=1e-5)


def test_interaction_parameters_get_gradients():
    dual = DualLoRAUNet(_unet(), rank=2)
    xb, xf, t, eb, ef = _inputs()
    pb, pf = dual(xb, xf, t, eb, ef)
    (pb.square().mean() + pf.square().mean()).backward()
    proj_out = next(iter(dual.interactions.values())).proj_out.weight
    assert proj_out.grad is not None and proj_out.grad.abs().sum() > 0
    lora_b = next(iter(dual.lora_layers().values())).lora_B
    assert all(b.weight.grad is not None for b in lora_b)
    base = next(iter(dual.lora_layers().values())).base.weight
    assert not base.requires_grad


def test_mismatched_inputs_are_rejected():
    dual = DualLoRAUNet(_unet(), rank=2)
    xb, xf, t, eb, ef = _inputs()
    with pytest.raises(ValueError, match="tokens"):
        dual(xb, xf, t, eb, ef[:, :4])
    with pytest.raises(ValueError, match="shape"):
        dual(xb, xf[..., :4], t, eb, ef)
    with pytest.raises(ValueError, match="dual_mode"):
        DualLoRAUNet(_unet(), rank=2, dual_mode="twin")


@torch.no_grad()
def test_save_and_load_dual_unet_roundtrip(tiny_assets, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from models.dual_lora import add_text_encoder_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_assets["sd15"], subfolder="unet")
    dual = DualLoRAUNet(unet, rank=2, interaction_reduction=2)
    _randomise(dual)
    te = CLIPTextModel.from_pretrained(tiny_assets["sd15"], subfolder="text_encoder")
    add_text_encoder_lora(te, rank=2)
    save_dual_weights(dual, te, tmp_path / "w", extra={"stage_start_step": 5})
    comps = load_dual_unet(tiny_assets["sd15"], tmp_path / "w")
    assert comps["config"]["stage_start_step"] == 5 and comps["config"]["dual_mode"] == "interrelated"
    xb, xf, t, eb, ef = _inputs()
    a = dual(xb, xf, t, eb, ef)
    b = comps["dual_unet"](xb, xf, t, eb, ef)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    with pytest.raises(FileNotFoundError, match="dual_config.json"):
        load_dual_unet(tiny_assets["sd15"], tmp_path)


def test_gradient_checkpointing_gives_the_same_gradients():
    xb, xf, t, eb, ef = _inputs()
    grads = []
    for ckpt in (False, True):
        dual = DualLoRAUNet(_unet(), rank=2)
        _randomise(dual)
        if ckpt:
            dual.unet.enable_gradient_checkpointing()
        dual.train()
        pb, pf = dual(xb, xf, t, eb, ef)
        (pb.square().mean() + pf.square().mean()).backward()
        grads.append(
            {k: v.grad.clone() for k, v in dual.trainable_state_dict().items() if v.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-4)
