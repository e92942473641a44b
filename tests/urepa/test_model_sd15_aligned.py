"""AlignHead, hooks, LoRA whitelist and the lambda=0 baseline on the tiny SD-1.5-shaped U-Net."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.sd15_unet_aligned import AlignHead, SD15UNetAligned, capture_features, find_lora_targets


@pytest.fixture(scope="module")
def unet_factory(tiny_assets):
    from diffusers import UNet2DConditionModel

    path = tiny_assets["sd15"]
    return lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet")


def _inputs(b=2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, 4, 8, 8, generator=g),
        torch.tensor([10, 900])[:b],
        torch.randn(b, 77, 32, generator=g),
    )


def test_align_head_shapes_normalisation_and_order():
    torch.manual_seed(0)
    head = AlignHead(in_ch=48, D=64, grid=(4, 6))
    feat = torch.randn(3, 48, 2, 3)
    tok = head(feat)
    assert tok.shape == (3, 24, 64) and tok.dtype == torch.float32
    torch.testing.assert_close(tok.norm(dim=-1), torch.ones(3, 24))

    # project first (at 2x3), upsample after: independent recomputation
    def reference(f):
        y = F.gelu(F.group_norm(F.conv2d(f, head.proj[0].weight), 32, head.proj[1].weight, head.proj[1].bias))
        return F.interpolate(y, size=(4, 6), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)

    torch.testing.assert_close(tok, F.normalize(reference(feat), dim=-1))
    assert head(torch.randn(1, 48, 4, 6)).shape == (1, 24, 64)  # already on the grid: no resize
    # gradients of the matrix-form upsampling equal F.interpolate's
    feat = feat.requires_grad_(True)
    w = torch.randn(3, 24, 64)
    (head(feat) * w).sum().backward()
    grad = feat.grad.clone()
    feat.grad = None
    (F.normalize(reference(feat), dim=-1) * w).sum().backward()
    torch.testing.assert_close(grad, feat.grad)
    with pytest.raises(ValueError, match="divisible"):
        AlignHead(in_ch=8, D=40)
    with pytest.raises(ValueError, match=r"expects \[B,48"):
        head(torch.randn(1, 32, 2, 2))


@pytest.mark.parametrize(
    "src,dst", [((8, 8), (16, 16)), ((7, 5), (16, 12)), ((16, 16), (7, 9)), ((1, 2), (4, 4))]
)
def test_bilinear_matrix_equals_interpolate(src, dst):
    from models.sd15_unet_aligned import bilinear_matrix

    x = torch.randn(2, 3, *src, dtype=torch.float64)
    want = F.interpolate(x, size=dst, mode="bilinear", align_corners=False)
    a_h, a_w = bilinear_matrix(dst[0], src[0]).double(), bilinear_matrix(dst[1], src[1]).double()
    torch.testing.assert_close(a_h @ x @ a_w.T, want, rtol=0, atol=1e-6)
    assert torch.allclose(a_h.sum(1), torch.ones(dst[0], dtype=torch.float64))  # rows are convex weights


def test_lora_whitelist_exact_modules(unet_factory):
    unet = unet_factory()
    resnet = [
        f"{blk}.resnets.{i}.{c}"
        for blk, n in (("down_blocks.3", 2), ("up_blocks.0", 3), ("mid_block", 2))
        for i in range(n)
        for c in ("conv1", "conv2")
    ]
    attn = [
        f"mid_block.attentions.0.transformer_blocks.0.{a}.{p}"
        for a in ("attn1", "attn2")
        for p in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    assert sorted(find_lora_targets(unet)) == sorted(resnet + attn)
    assert sorted(find_lora_targets(unet, attention_only=True)) == sorted(attn)
    model = SD15UNetAligned(unet, D=64, grid=(2, 2), lora_config={"rank": 4}, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_modules = {n.split(".lora_")[0].removeprefix("unet.") for n in trainable if ".lora_" in n}
    assert lora_modules == set(resnet + attn)
    assert all(n.startswith("heads.mid.") or ".lora_" in n for n in trainable)
    assert any(k.startswith("unet.mid_block") for k in model.lora_state_dict_diffusers())


def test_whitelist_and_enc_last_follow_the_unet_depth(unet_factory):
    """A U-Net with SD-1.5's block types but two levels (the U-REPA replica's base): the whitelist and the
    enc_last hook address its lowest-resolution stage (down_blocks.1), not SD-1.5's down_blocks.3."""
    from diffusers import UNet2DConditionModel

    from models.sd15_unet_aligned import LORA_WHITELIST_PREFIXES, align_module, lora_whitelist_prefixes

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    assert lora_whitelist_prefixes(unet) == ("mid_block.", "down_blocks.1.", "up_blocks.0.")
    resnet = [
        f"{blk}.resnets.{i}.{c}"
        for blk, n in (("down_blocks.1", 2), ("up_blocks.0", 3), ("mid_block", 2))
        for i in range(n)
        for c in ("conv1", "conv2")
    ]
    attn = [
        f"mid_block.attentions.0.transformer_blocks.0.{a}.{p}"
        for a in ("attn1", "attn2")
        for p in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    assert sorted(find_lora_targets(unet)) == sorted(resnet + attn)
    assert align_module(unet, "enc_last") is unet.down_blocks[1].resnets[-1]
    model = SD15UNetAligned(
        unet, align_layers=("enc_last", "mid"), D=64, grid=(4, 4), lora_config={"rank": 4}, verbose=False
    )
    with capture_features(unet, ["enc_last", "mid", "dec_first"]) as feats:
        model(*_inputs())
    # the whole stage keeps a spatial grid (dec_first's ResNet runs before up_blocks.0's upsampler)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {k: (2, 64, 4, 4) for k in feats}
    assert LORA_WHITELIST_PREFIXES == lora_whitelist_prefixes(unet_factory())  # SD-1.5's four levels


def test_hooks_capture_the_right_modules_and_clear(unet_factory):
    unet = unet_factory()
    model = SD15UNetAligned(
        unet,
        align_layers=("enc_last", "mid", "dec_first"),
        D=64,
        grid=(2, 2),
        lora_config={"rank": 4},
        verbose=False,
    )
    x, t, c = _inputs()
    with capture_features(unet, ["enc_last", "mid", "dec_first"]) as feats:
        pred, tokens = model(x, t, c)
    assert pred.shape == x.shape
    assert set(tokens) == {"enc_last", "mid", "dec_first"}
    expected_modules = {
        "enc_last": unet.down_blocks[3].resnets[-1],
        "mid": unet.mid_block.resnets[-1],
        "dec_first": unet.up_blocks[0].resnets[-1],
    }
    for layer, module in expected_modules.items():
        own = {}
        h = module.register_forward_hook(lambda m, i, o, own=own: own.setdefault("x", o.detach()))
        model(x, t, c)
        h.remove()
        torch.testing.assert_close(feats[layer], own["x"])
        torch.testing.assert_close(tokens[layer], model.heads[layer](own["x"]))
        assert tokens[layer].shape == (2, 4, 64)
    assert set(model.get_aligned_tokens()) == set(tokens)
    model.clear_hooks()
    assert model.get_aligned_tokens() == {}
    assert all(not m._forward_hooks for m in expected_modules.values())


def test_lambda_zero_runs_no_head(unet_factory):
    from diffusers import DDPMScheduler

    from losses.urepa import URepaLoss

    unet = unet_factory()
    model = SD15UNetAligned(unet, align_layers=(), D=64, grid=(2, 2), lora_config={"rank": 4}, verbose=False)
    assert len(model.heads) == 0 and not unet.mid_block.resnets[-1]._forward_hooks
    aligned = SD15UNetAligned(unet_factory(), D=64, grid=(2, 2), lora_config={"rank": 4}, verbose=False)
    calls = []
    aligned.heads["mid"].register_forward_hook(lambda *a: calls.append(1))
    loss = URepaLoss(DDPMScheduler(), align_coeff=0.0)
    x, _, c = _inputs()
    out = loss(aligned, x, {"mid": torch.randn(2, 4, 64)}, c)
    assert calls == [] and out["loss_align"] == 0 and out["loss"] == out["loss_diff"]
    out = URepaLoss(DDPMScheduler(), align_coeff=0.8)(aligned, x, {"mid": torch.randn(2, 4, 64)}, c)
    assert calls == [1] and out["loss_align"] > 0
