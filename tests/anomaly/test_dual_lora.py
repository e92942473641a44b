"""Dual-interrelated LoRA U-Net: starts as stage 1, branches interact (shared mode does not), weights I/O."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models.dual_lora import (
    DualLoRAUNet,
    _attention_modules,
    load_dual_unet,
    normalize_lora_keys,
    save_dual_weights,
)
from preprocessing.convert_official_dualanodiff import official_to_our_key

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
    dual = DualLoRAUNet(unet, rank=2, interaction_preset="light", interaction_reduction=2)
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
    # weights saved before the presets existed (no interaction_preset key) were the light module
    import json

    cfg_path = tmp_path / "w" / "dual_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["interaction_preset"] == "light"
    del cfg["interaction_preset"], cfg["interaction_init"]
    cfg_path.write_text(json.dumps(cfg))
    legacy = load_dual_unet(tiny_assets["sd15"], tmp_path / "w")
    torch.testing.assert_close(legacy["dual_unet"](xb, xf, t, eb, ef)[0], a[0])


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


# ---------------------------------------------------------------------------------------------------------
# The official (DualAnoDiff) interaction processor, written from its maths: per branch i of the "(b f)"
# batch (f = 2: blend, fg), attention with LoRA set i on q/k/v/out; then on the stacked outputs
#   x = temporal_o(attn_1head(temporal_q/k/v(temporal_i(LayerNorm_eps1e-6(h)))))  over the 2 branch tokens
# of every position, and h + x.

# The official-name mapping (official_to_our_key) lives in the converter, preprocessing/convert_official_dualanodiff.py.


def official_processor_params(dim: int, ctx_dim: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the official processor's parameter names and shapes."""
    g = torch.Generator().manual_seed(seed)
    p = {}
    for branch in range(2):
        for proj, fan_in in (("q", dim), ("k", ctx_dim), ("v", ctx_dim), ("out", dim)):
            p[f"to_{proj}_lora.{branch}.down.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
            p[f"to_{proj}_lora.{branch}.up.weight"] = torch.randn(dim, rank, generator=g) * 0.3
    p["temporal_n.weight"] = 1 + 0.2 * torch.randn(dim, generator=g)
    p["temporal_n.bias"] = 0.2 * torch.randn(dim, generator=g)
    for k in "iqkvo":
        p[f"temporal_{k}.weight"] = torch.randn(dim, dim, generator=g) / dim**0.5
        p[f"temporal_{k}.bias"] = 0.2 * torch.randn(dim, generator=g)
    return p


def _softmax_attention(q, k, v, heads):
    """Multi-head softmax attention, [B, N, H*d] x [B, L, H*d] -> [B, N, H*d], scale 1/sqrt(d)."""
    b, n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return (w @ v).transpose(1, 2).reshape(b, n, c)


def official_reference_forward(attn, p, hidden, context, heads):
    """The official processor on "(b f)"-ordered inputs (hidden [(b f), N, C]; context [(b f), L, D] or None)."""
    base = {n: getattr(attn, n).base for n in ("to_q", "to_k", "to_v")}
    base["to_out"] = attn.to_out[0].base
    bf, n, c = hidden.shape
    outs = []
    for i in range(2):
        x = hidden[i::2]
        ctx = x if context is None else context[i::2]

        def proj(name, t, i=i):
            lin = base[name]
            lora = t @ p[f"{name}_lora.{i}.down.weight"].T @ p[f"{name}_lora.{i}.up.weight"].T
            return t @ lin.weight.T + (lin.bias if lin.bias is not None else 0) + lora

        o = _softmax_attention(proj("to_q", x), proj("to_k", ctx), proj("to_v", ctx), heads)
        outs.append(proj("to_out", o))
    h = torch.stack(outs, dim=1).reshape(bf, n, c)  # f b -> (b f)
    x = F.layer_norm(h, (c,), p["temporal_n.weight"], p["temporal_n.bias"], eps=1e-6)
    x = x @ p["temporal_i.weight"].T + p["temporal_i.bias"]
    x = x.reshape(bf // 2, 2, n, c).transpose(1, 2).reshape(-1, 2, c)  # (b f) d c -> (b d) f c
    q, k, v = (x @ p[f"temporal_{s}.weight"].T + p[f"temporal_{s}.bias"] for s in "qkv")
    x = _softmax_attention(q, k, v, heads=1)
    x = x @ p["temporal_o.weight"].T + p["temporal_o.bias"]
    x = x.reshape(bf // 2, n, 2, c).transpose(1, 2).reshape(bf, n, c)  # (b d) f c -> (b f) d c
    return h + x


class _OneAttention(torch.nn.Module):
    """A U-Net stand-in holding one diffusers Attention layer (SD-1.5's: no q/k/v bias, out bias)."""

    def __init__(self, dim: int, heads: int, cross_dim: int | None):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.cross = cross_dim is not None
        self.attn = Attention(
            dim, cross_attention_dim=cross_dim, heads=heads, dim_head=dim // heads, out_bias=True
        )

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=False):
        return (self.attn(sample, encoder_hidden_states if self.cross else None),)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("guidance_batch", [False, True])
@torch.no_grad()
def test_official_preset_equals_the_official_processor(cross, guidance_batch):
    dim, heads, ctx_dim, rank, b, n, tokens = 16, 2, 12, 3, 2, 5, 4
    torch.manual_seed(0)
    model = _OneAttention(dim, heads, ctx_dim if cross else None)
    dual = DualLoRAUNet(model, rank=rank, interaction_preset="official")
    official = official_processor_params(dim, ctx_dim if cross else dim, rank, seed=1)
    ours = dual.trainable_state_dict()
    mapped = {official_to_our_key(k, "attn"): v for k, v in official.items()}
    assert set(mapped) == set(ours), "every official parameter maps onto exactly one of ours"
    dual.load_trainable_state_dict(mapped)

    g = torch.Generator().manual_seed(2)
    xb, xf = torch.randn(b, n, dim, generator=g), torch.randn(b, n, dim, generator=g)
    eb, ef, null = (torch.randn(b, tokens, ctx_dim, generator=g) for _ in range(3))
    if guidance_batch:  # the pipelines' classifier-free guidance batch: [uncond pairs; cond pairs]
        xb, xf = torch.cat([xb, xb]), torch.cat([xf, xf])
        eb, ef = torch.cat([null, eb]), torch.cat([null, ef])
    pred_b, pred_f = dual(xb, xf, torch.tensor(0), eb, ef)
    # official layout "(b f)": blend and fg of a sample side by side
    hidden = torch.stack([xb, xf], dim=1).flatten(0, 1)
    context = torch.stack([eb, ef], dim=1).flatten(0, 1) if cross else None
    ref = official_reference_forward(model.attn, official, hidden, context, heads)
    torch.testing.assert_close(pred_b, ref[0::2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred_f, ref[1::2], atol=1e-5, rtol=1e-5)
    assert (ref[0::2] - ref[1::2]).abs().max() > 1e-2  # the two branches really differ


def _interaction_param_count(dim: int, preset: str, reduction: int = 4) -> int:
    """Closed form per attention layer: LayerNorm 2C, proj_in, q/k/v (bias only in official), proj_out."""
    if preset == "official":
        return 2 * dim + (dim * dim + dim) + 3 * (dim * dim + dim) + (dim * dim + dim)  # 5C^2 + 7C
    h = dim // reduction
    return 2 * dim + (dim * h + h) + 3 * h * h + (h * dim + dim)


def test_interaction_presets_and_init():
    unet = _unet()
    dims = [attn.to_out[0].out_features for _, attn in _attention_modules(unet)]
    for preset in ("official", "light"):
        dual = DualLoRAUNet(_unet(), rank=2, interaction_preset=preset, interaction_init="default")
        got = sum(p.numel() for p in dual.interactions.parameters())
        assert got == sum(_interaction_param_count(d, preset) for d in dims), preset
        module = next(iter(dual.interactions.values()))
        assert module.proj_out.weight.abs().max() > 0  # default init: not zero
        assert (module.to_q.bias is not None) == (preset == "official")
        assert module.norm.eps == (1e-6 if preset == "official" else 1e-5)
        assert module.heads == (
            1 if preset == "official" else dual.unet.get_submodule(dual.attention_names[0]).heads
        )
    zero = DualLoRAUNet(_unet(), rank=2)  # official + zero init: the defaults
    assert zero.config_dict()["interaction_preset"] == "official"
    assert all(m.proj_out.weight.abs().max() == 0 for m in zero.interactions.values())
    with pytest.raises(ValueError, match="light preset only"):
        DualLoRAUNet(_unet(), rank=2, interaction_reduction=4)
    with pytest.raises(ValueError, match="interaction_preset"):
        DualLoRAUNet(_unet(), rank=2, interaction_preset="heavy")


def test_lora_init_is_the_references():
    """LoRA sets start as the reference's LoRALinearLayer: down ~ N(0, 1/rank), up = 0."""
    rank = 4
    dual = DualLoRAUNet(_unet(), rank=rank)
    a = torch.cat([w.flatten() for n, w in dual.trainable_state_dict().items() if ".lora_A." in n])
    b = torch.cat([w.flatten() for n, w in dual.trainable_state_dict().items() if ".lora_B." in n])
    assert a.numel() > 1000 and abs(a.std().item() - 1 / rank) < 0.02 and abs(a.mean().item()) < 0.01
    assert (b == 0).all()
