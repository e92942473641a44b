"""DINOv2 adapter: official <-> HF conversion, an independent reference forward, truncation, grids, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import models.dinov2_encoder as dino
from models.dinov2_encoder import (
    DINOv2Encoder,
    VariantSpec,
    export_official_state_dict,
    grid_size,
    hf_config,
    official_checkpoint_name,
    save_official_checkpoint,
)
from utils.weights import MissingWeightsError

TINY = ["tiny14", "tiny14_reg"]


def _randomize(encoder: DINOv2Encoder, seed: int = 0) -> DINOv2Encoder:
    """Every parameter random (incl. norms, layer scales, mask/register tokens) so any swapped key shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in encoder.model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            is_norm_weight = name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight"))
            param.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.2 * noise)
    return encoder


def _random_encoder(variant: str, resolution: int = 28, seed: int = 0) -> DINOv2Encoder:
    torch.manual_seed(seed)
    return _randomize(DINOv2Encoder(variant=variant, resolution=resolution, input_range="0_1"), seed)


def _reference_forward(sd: dict, pixels: torch.Tensor, spec: VariantSpec) -> dict:
    """DINOv2 written from the official vision_transformer.py / layers on the official-layout state dict."""
    dim, heads, regs = spec.embed_dim, spec.num_heads, spec.num_register_tokens
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    batch, _, gh, gw = x.shape
    x = torch.cat([sd["cls_token"].expand(batch, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["pos_embed"]
    m = math.isqrt(pos.shape[1] - 1)
    if not (gh * gw == m * m and gh == gw):
        grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        if spec.interpolate_offset:
            kw = {"scale_factor": ((gh + spec.interpolate_offset) / m, (gw + spec.interpolate_offset) / m)}
        else:
            kw = {"size": (gh, gw)}
        grid = F.interpolate(grid, mode="bicubic", antialias=spec.interpolate_antialias, **kw)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    x = x + pos
    if regs:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(batch, -1, -1), x[:, 1:]], dim=1)
    blocks = []
    for i in range(spec.depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        n = h.shape[1]
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        h = F.linear(
            (attn @ v).transpose(1, 2).reshape(batch, n, dim),
            sd[p + "attn.proj.weight"],
            sd[p + "attn.proj.bias"],
        )
        x = x + h * sd[p + "ls1.gamma"]
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        if spec.swiglu:
            x1, x2 = F.linear(h, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"]).chunk(2, dim=-1)
            h = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        else:
            h = F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
            h = F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + h * sd[p + "ls2.gamma"]
        blocks.append(x[:, 1 + regs :])
    x = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return {"cls": x[:, 0], "patch": x[:, 1 + regs :], "blocks": blocks}


def _assert_same_outputs(a, b, atol=1e-5):
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens, atol=atol, rtol=0)
    torch.testing.assert_close(a.cls, b.cls, atol=atol, rtol=0)
    assert a.intermediate.keys() == b.intermediate.keys()
    for key in a.intermediate:
        torch.testing.assert_close(a.intermediate[key], b.intermediate[key], atol=atol, rtol=0)


@pytest.mark.parametrize("variant", TINY)
def test_official_file_and_hf_dir_give_same_outputs_as_reference(variant, tmp_path):
    enc = _random_encoder(variant)
    pth = save_official_checkpoint(enc, tmp_path / official_checkpoint_name(variant))
    hf_dir = enc.save_pretrained(tmp_path / "hf")
    official_sd = torch.load(pth, weights_only=True)
    # the HF dir is written with the hub's key names, as in facebook/dinov2-* downloads
    assert any("attention.attention.query" in k for k in load_file(hf_dir / "model.safetensors"))
    assert "blocks.0.attn.qkv.weight" in official_sd and "blocks.0.ls1.gamma" in official_sd
    assert ("register_tokens" in official_sd) == variant.endswith("_reg")

    from_pth = DINOv2Encoder.from_pretrained(pth, variant=variant, resolution=28, input_range="0_1")
    from_hf = DINOv2Encoder.from_pretrained(hf_dir, variant=variant, resolution=28, input_range="0_1")
    for loaded in (from_pth, from_hf):
        assert all(not p.requires_grad and not p.is_meta for p in loaded.parameters())
        assert not loaded.training
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_pth = from_pth(images, layers=[0, 2], return_cls=True)
        out_hf = from_hf(images, layers=[0, 2], return_cls=True)
        out_orig = enc(images, layers=[0, 2], return_cls=True)
    _assert_same_outputs(out_pth, out_orig, atol=0)
    _assert_same_outputs(out_hf, out_orig, atol=1e-6)

    # 28 px on a 56 px position table: the interpolation branch of the official code is exercised
    mean = torch.tensor(dino.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dino.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = _reference_forward(official_sd, (images - mean) / std, dino.VARIANTS[variant])
    torch.testing.assert_close(out_pth.patch_tokens, ref["patch"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_pth.cls, ref["cls"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_pth.intermediate[2], ref["blocks"][2], atol=1e-5, rtol=1e-5)
    assert out_pth.patch_tokens.shape == (2, 4, 64) and out_pth.grid == (2, 2)


@pytest.mark.parametrize("variant", TINY)
def test_native_resolution_matches_transformers_forward(variant):
    enc = _random_encoder(variant, resolution=56)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ours = enc(pixels, return_cls=True, preprocess=False)
        theirs = enc.model(pixel_values=pixels).last_hidden_state
    first = 1 + enc.num_register_tokens
    torch.testing.assert_close(ours.patch_tokens, theirs[:, first:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.cls, theirs[:, 0], atol=1e-5, rtol=1e-5)


def test_swiglu_conversion_matches_reference(tmp_path, monkeypatch):
    # vitg14's fused SwiGLU (mlp.w12 / mlp.w3) at toy size
    spec = VariantSpec(2, 64, 4, swiglu=True, image_size=56)
    monkeypatch.setitem(dino.VARIANTS, "tiny14_swiglu", spec)
    enc = _random_encoder("tiny14_swiglu")
    sd = export_official_state_dict(enc)
    assert sd["blocks.0.mlp.w12.weight"].shape == (2 * 176, 64)  # (int(256 * 2/3) + 7) // 8 * 8 = 176
    assert sd["blocks.0.mlp.w3.weight"].shape == (64, 176)
    path = save_official_checkpoint(enc, tmp_path / "swiglu.pth")
    hf_dir = enc.save_pretrained(tmp_path / "hf")
    assert any(
        "mlp.weights_in" in k for k in load_file(hf_dir / "model.safetensors")
    )  # hub's fused SwiGLU name
    pixels = torch.randn(1, 3, 42, 42)
    ref = _reference_forward(sd, pixels, spec)
    for source in (path, hf_dir):
        loaded = DINOv2Encoder.from_pretrained(
            source, variant="tiny14_swiglu", resolution=42, input_range="0_1"
        )
        with torch.no_grad():
            out = loaded(pixels, return_cls=True, preprocess=False)
        torch.testing.assert_close(out.patch_tokens, ref["patch"], atol=1e-5, rtol=1e-5)


def test_truncated_runs_equal_full_run_and_skip_blocks():
    enc = _random_encoder("tiny14_reg")
    images = torch.rand(2, 3, 28, 28)
    calls = []
    hooks = [
        blk.register_forward_hook(lambda *_, i=i: calls.append(i))
        for i, blk in enumerate(enc.model.encoder.layer)
    ]
    with torch.no_grad():
        full = enc(images, layers=[0, 1, 2, 3], return_cls=True)
        assert calls == [0, 1, 2, 3]
        calls.clear()
        part = enc(images, layers=[1, 0], return_patch_tokens=False)
        assert calls == [0, 1]  # blocks 2 and 3 never ran
        calls.clear()
        single = enc(images, layers=2, return_patch_tokens=False)
        assert calls == [0, 1, 2]
    for hook in hooks:
        hook.remove()
    assert part.patch_tokens is None and part.cls is None and list(part.intermediate) == [0, 1]
    torch.testing.assert_close(part.intermediate[0], full.intermediate[0], atol=0, rtol=0)
    torch.testing.assert_close(part.intermediate[1], full.intermediate[1], atol=0, rtol=0)
    torch.testing.assert_close(single.intermediate[2], full.intermediate[2], atol=0, rtol=0)
    # patch tokens exclude CLS and the 4 registers; intermediate tokens are un-normalised
    assert full.intermediate[3].shape == full.patch_tokens.shape == (2, 4, 64)
    normed = enc.model.layernorm(full.intermediate[3])
    torch.testing.assert_close(normed, full.patch_tokens, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "variant,depth,dim,heads,regs,swiglu",
    [
        ("vits14", 12, 384, 6, 0, False),
        ("vitb14", 12, 768, 12, 0, False),
        ("vitl14", 24, 1024, 16, 0, False),
        ("vitg14", 40, 1536, 24, 0, True),
        ("vits14_reg", 12, 384, 6, 4, False),
        ("vitb14_reg", 12, 768, 12, 4, False),
        ("vitl14_reg", 24, 1024, 16, 4, False),
        ("vitg14_reg", 40, 1536, 24, 4, True),
        ("tiny14", 4, 64, 4, 0, False),
        ("tiny14_reg", 4, 64, 4, 4, False),
    ],
)
def test_variant_configs_and_parameter_counts(variant, depth, dim, heads, regs, swiglu):
    config = hf_config(variant)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (depth, dim, heads)
    assert getattr(config, "num_register_tokens", 0) == regs and config.use_swiglu_ffn == swiglu
    assert config.patch_size == 14
    # closed-form parameter count of the official model (pos_embed for 518 px = 37*37 + 1 positions)
    hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8 if swiglu else 4 * dim
    ffn = (
        dim * 2 * hidden + 2 * hidden + hidden * dim + dim
        if swiglu
        else dim * hidden + hidden + hidden * dim + dim
    )
    block = (
        4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + ffn + 2 * dim
    )  # norms, qkv, proj, ffn, ls
    positions = (config.image_size // 14) ** 2 + 1
    expected = (dim * 3 * 14 * 14 + dim) + dim + positions * dim + dim + regs * dim + depth * block + 2 * dim
    with torch.device("meta"):  # shapes only, no memory: vitg14 is never materialised
        model = dino._model_class(dino.VARIANTS[variant])(config)
    assert sum(p.numel() for p in model.parameters()) == expected
    if variant == "vitb14":
        assert expected == 86_580_480  # ViT-B/14 DINOv2: 86.58M (timm) + the 768-d mask token


def test_grid_math():
    assert grid_size(224) == (16, 16) and grid_size(518) == (37, 37) and grid_size(448) == (32, 32)
    enc = DINOv2Encoder(variant="tiny14", resolution=224, input_range="-1_1")
    assert enc.patch_size == 14 and enc.grid_size() == (16, 16) and enc.num_patches() == 256
    assert enc.num_patches(56) == 16 and enc.grid_size(28) == (2, 2)
    out = enc(torch.zeros(1, 3, 32, 48), return_patch_tokens=True)  # any input size is resized to 224
    assert out.patch_tokens.shape == (1, 256, 64) and out.grid == (16, 16)


def test_interpolation_settings_follow_official_hub_constructors():
    # dinov2/hub/backbones.py: plain models offset 0.1 without antialias; *_reg models offset 0 with antialias
    for name, spec in dino.VARIANTS.items():
        expected = (0.0, True) if name.endswith("_reg") else (0.1, False)
        assert (spec.interpolate_offset, spec.interpolate_antialias) == expected, name


def test_official_checkpoint_names():
    assert official_checkpoint_name("vitb14") == "dinov2_vitb14_pretrain.pth"
    assert official_checkpoint_name("vitg14_reg") == "dinov2_vitg14_reg4_pretrain.pth"


def test_preprocessing_matches_hand_computation():
    enc = DINOv2Encoder(variant="tiny14", resolution=28, input_range="-1_1")
    images = torch.rand(2, 3, 28, 28) * 2 - 1
    by_hand = ((images + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(enc.preprocess(images), by_hand, atol=1e-6, rtol=0)
    enc01 = DINOv2Encoder(variant="tiny14", resolution=28, input_range="0_1")
    enc01.load_state_dict(enc.state_dict())
    with torch.no_grad():
        _assert_same_outputs(
            enc(images, return_cls=True), enc01((images + 1) / 2, return_cls=True), atol=1e-6
        )


def test_frozen_eval_and_gradient_reaches_input():
    enc = _random_encoder("tiny14")
    wrapper = torch.nn.Sequential(enc)
    wrapper.train()
    assert not enc.training and not enc.model.training
    assert all(not p.requires_grad for p in enc.parameters())
    images = torch.rand(1, 3, 28, 28, requires_grad=True)
    out = enc(images, layers=[1], return_cls=True)
    (out.patch_tokens.square().sum() + out.intermediate[1].sum()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown DINOv2 variant 'vitx14'.*vits14, vits14_reg, vitb14"):
        DINOv2Encoder(variant="vitx14")
    with pytest.raises(ValueError, match="not a multiple of the patch size 14; use e.g. 224 or 238"):
        DINOv2Encoder(variant="tiny14", resolution=230, input_range="0_1")
    with pytest.raises(ValueError, match="input_range must be one of"):
        DINOv2Encoder(variant="tiny14", resolution=28, input_range="0_255")
    enc = DINOv2Encoder(variant="tiny14", resolution=28, input_range="0_1")
    images = torch.rand(1, 3, 28, 28)
    with pytest.raises(ValueError, match=r"layer index 4 is out of range for DINOv2 tiny14: .* 0\.\.3"):
        enc(images, layers=[1, 4])
    with pytest.raises(ValueError, match=r"layer index -1 is out of range .* 0\.\.3"):
        enc(images, layers=[-1])
    with pytest.raises(ValueError, match="expects 3 RGB channels, got 4"):
        enc(torch.rand(1, 4, 28, 28))
    with pytest.raises(ValueError, match=r"shape \[B, 3, H, W\], got \(3, 28, 28\)"):
        enc(torch.rand(3, 28, 28))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        enc(torch.rand(1, 3, 30, 28), preprocess=False)
    with pytest.raises(ValueError, match=r"values in \[0, 255\].*input_range '0_1'"):
        enc(torch.linspace(0, 255, 3 * 28 * 28).view(1, 3, 28, 28))
    with pytest.raises(ValueError, match="float images"):
        enc(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="nothing requested"):
        enc(images, return_patch_tokens=False)


def test_strict_loading_and_variant_mismatch(tmp_path):
    enc = _random_encoder("tiny14")
    sd = export_official_state_dict(enc)
    missing = dict(sd)
    del missing["blocks.1.ls2.gamma"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): blocks\.1\.ls2\.gamma"):
        DINOv2Encoder.from_pretrained(
            tmp_path / "missing.pth", variant="tiny14", resolution=28, input_range="0_1"
        )
    extra = dict(sd, **{"head.weight": torch.zeros(2, 64)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): head\.weight"):
        DINOv2Encoder.from_pretrained(
            tmp_path / "extra.pth", variant="tiny14", resolution=28, input_range="0_1"
        )
    path = save_official_checkpoint(enc, tmp_path / "tiny.pth")
    with pytest.raises(
        ValueError, match=r"(?s)looks like variant 'tiny14'.*missing keys \(1\): register_tokens"
    ):
        DINOv2Encoder.from_pretrained(path, variant="tiny14_reg", resolution=28, input_range="0_1")
    hf_dir = enc.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="needs 'dinov2_with_registers'"):
        DINOv2Encoder.from_pretrained(hf_dir, variant="tiny14_reg", resolution=28, input_range="0_1")


def test_missing_weights_name_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "dinov2_vitb14_pretrain.pth"
    with pytest.raises(MissingWeightsError, match=str(missing)) as err:
        DINOv2Encoder.from_pretrained(missing, variant="vitb14")
    assert "dinov2_vitb14_pretrain.pth" in str(err.value) and "hf download facebook/dinov2-base" in str(
        err.value
    )
    with pytest.raises(MissingWeightsError, match="weights/dinov2_vitb14_pretrain.pth is neither a file"):
        DINOv2Encoder.from_pretrained("weights/dinov2_vitb14_pretrain.pth", variant="vitb14")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "dinov2_vitl14_reg4_pretrain.pth"
    with pytest.raises(MissingWeightsError, match=str(expected)) as err:
        DINOv2Encoder.from_pretrained(None, variant="vitl14_reg")
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth" in str(
        err.value
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError, match="not-a-real-org/dinov2-nothing"):
        DINOv2Encoder.from_pretrained("not-a-real-org/dinov2-nothing", variant="vitb14")


def test_legacy_transformers_names_round_trip():
    """transformers releases before the q_proj refactor (4.x, 5.x up to 5.17) name block tensors
    attention.attention.query / attention.output.dense / mlp.weights_in (fused) / mlp.weights_out."""
    from models.dinov2_keys import _legacy_to_modern, _modern_to_legacy

    g = torch.Generator().manual_seed(0)
    p = "encoder.layer.3."
    modern = {
        p + "attention.q_proj.weight": torch.randn(4, 4, generator=g),
        p + "attention.o_proj.bias": torch.randn(4, generator=g),
        p + "mlp.gate_proj.weight": torch.randn(6, 4, generator=g),
        p + "mlp.up_proj.weight": torch.randn(6, 4, generator=g),
        p + "mlp.down_proj.weight": torch.randn(4, 6, generator=g),
        p + "layer_scale1.lambda1": torch.randn(4, generator=g),
        "embeddings.cls_token": torch.randn(1, 1, 4, generator=g),
    }
    legacy = _modern_to_legacy(modern)
    assert sorted(legacy) == sorted(
        [
            p + "attention.attention.query.weight",
            p + "attention.output.dense.bias",
            p + "mlp.weights_in.weight",
            p + "mlp.weights_out.weight",
            p + "layer_scale1.lambda1",
            "embeddings.cls_token",
        ]
    )
    # fused as SwiGLU computes it: x1, x2 = weights_in(x).chunk(2); silu(x1) * x2 -> gate first
    assert torch.equal(legacy[p + "mlp.weights_in.weight"][:6], modern[p + "mlp.gate_proj.weight"])
    back = _legacy_to_modern(legacy)
    assert back.keys() == modern.keys() and all(torch.equal(back[k], modern[k]) for k in modern)
