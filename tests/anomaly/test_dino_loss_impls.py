"""The three DINOv2-term implementations (--dinov2_loss_impl crop | fast | reference) and the crop geometry.

* ``reference`` equals the seed trainer's formula, re-implemented here from the seed's code (x0, clamp +-10,
  VAE decode of prediction and target latent, bilinear resize, ImageNet normalisation, an official-layout
  DINOv2 forward written out from the ``.pth`` weights, per-token L2 normalisation, batch-mean distance, layers
  summed) on the tiny VAE and tiny DINOv2;
* ``crop`` cuts the same region out of x0 and out of the training image, flips included, draws its tiles from
  the step generator and covers every tile; a crop as large as the image is ``fast``.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from losses.dinov2_perceptual import DINOv2PerceptualLoss, DINOv2TargetCache, decode_latents, predicted_x0
from losses.latent_crops import crop_boxes, crop_tiles, sample_crop_boxes, tile_offsets
from train.anomaly.perceptual import PerceptualTerm, build_perceptual_term

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


# --- the seed trainer's term, written out -------------------------------------------------------------------


def _official_block_outputs(sd: dict, pixels: torch.Tensor, heads: int) -> list[torch.Tensor]:
    """Official DinoVisionTransformer: prepare_tokens_with_masks (native grid: no pos-embed interpolation), then
    x = x + ls1 * attn(norm1(x)); x = x + ls2 * mlp(norm2(x)) per block; returns every block's output."""
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    outs = []
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        dim = x.shape[-1]
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(x.shape[0], x.shape[1], 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // heads) ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        h = (a @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], dim)
        x = x + sd[p + "ls1.gamma"] * F.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), *_fc2(sd, p))
        x = x + sd[p + "ls2.gamma"] * h
        outs.append(x)
    return outs


def _fc2(sd, p):
    return sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]


def _seed_features(sd, images, layers, resolution, heads):
    x = (images + 1.0) / 2.0
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    blocks = _official_block_outputs(sd, x, heads)
    feats = []
    for i in layers:
        f = blocks[i][:, 1:, :]
        b, n, d = f.shape
        side = int(n**0.5)
        f = f.reshape(b, side, side, d).permute(0, 3, 1, 2)
        feats.append(F.normalize(f, p=2, dim=1))
    return feats


def _seed_term(vae, sd, sched, model_pred, noisy, timesteps, target_latents, layers, kind, resolution, heads):
    alpha_t = sched.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    if sched.config.prediction_type == "epsilon":
        pred0 = (noisy - torch.sqrt(1 - alpha_t) * model_pred) / torch.sqrt(alpha_t)
    else:
        pred0 = torch.sqrt(alpha_t) * noisy - torch.sqrt(1 - alpha_t) * model_pred
    pred0 = torch.clamp(pred0 / vae.config.scaling_factor, -10, 10)
    target0 = torch.clamp(target_latents / vae.config.scaling_factor, -10, 10)
    pred_pixels = vae.decode(pred0).sample
    with torch.no_grad():
        target_pixels = vae.decode(target0).sample
        target_feats = _seed_features(sd, target_pixels, layers, resolution, heads)
    pred_feats = _seed_features(sd, pred_pixels, layers, resolution, heads)
    fn = {"l1": F.l1_loss, "l2": F.mse_loss, "smooth_l1": F.smooth_l1_loss}[kind]
    loss = 0.0
    for p, t in zip(pred_feats, target_feats):
        loss = loss + 1.0 * fn(p, t)
    return loss


@pytest.fixture(scope="module")
def tiny_models(tiny_assets):
    from diffusers import AutoencoderKL

    from models.dinov2_encoder import DINOv2Encoder

    vae = AutoencoderKL.from_pretrained(tiny_assets["sd15"], subfolder="vae").requires_grad_(False).eval()
    # 56 px = the tiny model's native grid (like 518 for the real ones): no positional interpolation.
    encoder = DINOv2Encoder.from_pretrained(
        tiny_assets["dinov2_official"], variant="tiny14", resolution=56, input_range="-1_1"
    )
    official = torch.load(tiny_assets["dinov2_official"], map_location="cpu", weights_only=True)
    return vae, encoder, official


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["l1", "l2", "smooth_l1"])
def test_reference_impl_equals_the_seed_formula(tiny_models, kind, prediction_type):
    vae, encoder, official = tiny_models
    sched = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    target_latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([30, 950])  # t=950: x0 leaves +-10 and the clamp matters
    noisy = sched.add_noise(target_latents, noise, t)
    pred = (noise + 0.3 * torch.randn(2, 4, 8, 8, generator=g)).requires_grad_(True)
    layers = [0, 2, 3]

    loss = DINOv2PerceptualLoss(encoder, layers=layers, loss_type=kind, resize="bilinear")
    term = PerceptualTerm(loss, vae, sched.alphas_cumprod, prediction_type, impl="reference")
    images = torch.zeros(2, 3, 64, 64)  # the training images are not used by the reference term
    ours, _ = term(pred, noisy, t, images, [0, 1], [0, 0], target_latents=target_latents)
    (grad_ours,) = torch.autograd.grad(ours, pred)

    x0 = predicted_x0(pred, noisy, t, sched.alphas_cumprod, prediction_type)
    assert (x0.detach().abs() / vae.config.scaling_factor).max() > 10  # the clamp is exercised
    seed = _seed_term(
        vae, official, sched, pred, noisy, t, target_latents, layers, kind, 56, encoder.num_heads
    )
    (grad_seed,) = torch.autograd.grad(seed, pred)
    assert ours.item() > 0
    assert abs(ours.item() - seed.item()) / abs(seed.item()) <= 1e-5
    torch.testing.assert_close(grad_ours, grad_seed, rtol=1e-4, atol=1e-7)


def test_reference_impl_needs_target_latents_and_the_bilinear_loss(tiny_models):
    vae, encoder, _ = tiny_models
    sched = _scheduler("epsilon")
    with pytest.raises(ValueError, match="bilinear"):
        PerceptualTerm(
            DINOv2PerceptualLoss(encoder, layers=[1]), vae, sched.alphas_cumprod, "epsilon", impl="reference"
        )
    term = PerceptualTerm(
        DINOv2PerceptualLoss(encoder, layers=[1], resize="bilinear"),
        vae,
        sched.alphas_cumprod,
        "epsilon",
        impl="reference",
    )
    with pytest.raises(ValueError, match="target_latents"):
        term(
            torch.zeros(1, 4, 8, 8),
            torch.zeros(1, 4, 8, 8),
            torch.tensor([5]),
            torch.zeros(1, 3, 64, 64),
            [0],
            [0],
        )


# --- crop geometry ------------------------------------------------------------------------------------------


def test_tile_offsets_and_tiles():
    assert tile_offsets(64, 32) == [0, 32]
    assert tile_offsets(64, 48) == [0, 16]
    assert tile_offsets(8, 3) == [0, 3, 5]
    assert tile_offsets(8, 8) == [0] and tile_offsets(8, 20) == [0]
    assert crop_tiles(8, 8, 4) == [(0, 0, 4, 4), (0, 4, 4, 4), (4, 0, 4, 4), (4, 4, 4, 4)]
    assert crop_tiles(8, 4, 6) == [(0, 0, 6, 4), (2, 0, 6, 4)]
    # tiles of a divisible size cover every position exactly once
    cover = torch.zeros(64, 64)
    for top, left, h, w in crop_tiles(64, 64, 32):
        cover[top : top + h, left : left + w] += 1
    assert cover.eq(1).all()


def test_crop_boxes_cut_the_same_region_at_both_scales():
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    images = (
        latents[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2)
    )  # image px (y, x) <- latent (y//8, x//8)
    boxes = [(0, 4, 4, 4), (4, 0, 4, 4), (4, 4, 4, 4)]
    lat_c, img_c = crop_boxes(latents, boxes), crop_boxes(images, boxes, scale=8)
    assert lat_c.shape == (3, 4, 4, 4) and img_c.shape == (3, 3, 32, 32)
    torch.testing.assert_close(img_c, lat_c[:, :3].repeat_interleave(8, -1).repeat_interleave(8, -2))
    torch.testing.assert_close(lat_c[1], latents[1, :, 4:8, 0:4])
    with pytest.raises(ValueError, match="outside"):
        crop_boxes(latents[:1], [(6, 0, 4, 4)])
    with pytest.raises(ValueError, match="different sizes"):
        crop_boxes(latents[:2], [(0, 0, 4, 4), (0, 0, 2, 2)])


class _PoolVAE(torch.nn.Module):
    """Encode = 8x8 average pooling (+ a zero 4th channel), decode = nearest upsampling: pooling the decoded
    crop gives back exactly the pooled target crop when (and only when) both are the same region."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.config = argparse.Namespace(scaling_factor=1.0, shift_factor=None)

    def encode(self, images):
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, torch.zeros_like(pooled[:, :1])], 1)

    def decode(self, z):
        return argparse.Namespace(
            sample=(z[:, :3] * self.w).repeat_interleave(8, -1).repeat_interleave(8, -2)
        )


class _SpyLoss(torch.nn.Module):
    """Records what the term compares; the distance is the L2 between 8x8-pooled images."""

    layers = [0]
    weights = {0: 1.0}
    resize = "bicubic_antialias"

    def __init__(self):
        super().__init__()
        self.seen = []

    def target_features(self, images):
        return {0: images}

    def forward(self, images, target):
        self.seen.append((images.detach().clone(), target[0].clone()))
        d = (F.avg_pool2d(images, 8) - F.avg_pool2d(target[0], 8)).square().flatten(1).mean(1)
        return d, {0: d}


@pytest.mark.parametrize("flip", ["none", "h", "v", "hv"])
def test_crop_prediction_and_target_are_the_same_region_flips_included(flip):
    """The trainer encodes the flipped image; the term crops x0 and that flipped image at the same place."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    dims = {"none": [], "h": [-1], "v": [-2], "hv": [-2, -1]}[flip]
    pixels = image.flip(dims) if dims else image  # what the dataset hands to the trainer
    vae = _PoolVAE()
    latents = vae.encode(pixels)
    spy = _SpyLoss()
    term = PerceptualTerm(spy, vae, torch.ones(1000), "sample", impl="crop", crop_size=32)
    gen = torch.Generator().manual_seed(5)
    boxes_seen = set()
    for _ in range(12):
        pred = latents.clone().requires_grad_(True)  # a perfect x0 prediction
        value, _ = term(
            pred, torch.zeros_like(latents), torch.tensor([1, 2]), pixels, [0, 1], [3, 3], generator=gen
        )
        assert value.item() == pytest.approx(0.0, abs=1e-12)  # same region -> identical pooled crops
        decoded, target = spy.seen[-1]
        assert decoded.shape == target.shape == (2, 3, 32, 32)
        # the target crop is a crop of the flipped image handed to the trainer
        for i in range(2):
            matches = [
                (y, x)
                for y in (0, 32)
                for x in (0, 32)
                if torch.equal(target[i], pixels[i, :, y : y + 32, x : x + 32])
            ]
            assert len(matches) == 1
            boxes_seen.add(matches[0])
            # and the decoded crop is the same region of x0 (upsampled latents of that region)
            y, x = matches[0]
            torch.testing.assert_close(
                decoded[i],
                vae.decode(latents[i : i + 1, :, y // 8 : y // 8 + 4, x // 8 : x // 8 + 4]).sample[0],
            )
    assert boxes_seen == {(0, 0), (0, 32), (32, 0), (32, 32)}  # every tile is drawn


def test_crop_loss_sees_a_mismatched_region():
    """Control for the test above: comparing x0 with a wrong region of the target is not zero."""
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    vae, spy = _PoolVAE(), _SpyLoss()
    shifted = vae.encode(pixels.roll(32, dims=-1))
    term = PerceptualTerm(spy, vae, torch.ones(1000), "sample", impl="crop", crop_size=32)
    value, _ = term(shifted, torch.zeros_like(shifted), torch.tensor([1]), pixels, [0], [0])
    assert value.item() > 1e-3


def test_crop_draws_come_from_the_generator():
    a = sample_crop_boxes(6, 64, 64, 32, torch.Generator().manual_seed(3))
    b = sample_crop_boxes(6, 64, 64, 32, torch.Generator().manual_seed(3))
    assert a == b and all(box in crop_tiles(64, 64, 32) for box in a)
    assert sample_crop_boxes(2, 8, 8, 8) == [(0, 0, 8, 8)] * 2


# --- sample fraction ----------------------------------------------------------------------------------------


class _MeanLoss(torch.nn.Module):
    """Per-sample loss = the mean of the decoded image, so a sample's value names it."""

    layers = [0]
    weights = {0: 1.0}
    resize = "bicubic_antialias"

    def target_features(self, images):
        return {0: images}

    def forward(self, images, target):
        d = images.flatten(1).mean(1)
        return d, {0: d}


def test_sample_fraction_keeps_each_sample_with_probability_p_weighted_1_over_p():
    values = (
        torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0]) / 32
    )  # sample i decodes to a constant image v_i (sums name subsets)
    x0 = values.view(5, 1, 1, 1).expand(5, 4, 2, 2).contiguous()
    pixels = torch.zeros(5, 3, 16, 16)
    term = PerceptualTerm(
        _MeanLoss(), _PoolVAE(), torch.ones(1000), "sample", impl="fast", sample_fraction=0.5
    )
    gen = torch.Generator().manual_seed(0)
    draws, counts, total = 2000, torch.zeros(5), 0.0
    for _ in range(draws):
        value, logs = term(
            x0,
            torch.zeros_like(x0),
            torch.ones(5, dtype=torch.long),
            pixels,
            list(range(5)),
            [0] * 5,
            generator=gen,
        )
        k = round(logs["dinov2_fraction"] * 5)
        assert k in (2, 3)  # floor / ceil of 5 x 0.5
        # which samples: the value is sum_{i in S} v_i / (b p); recover S from the value and k
        picked = [
            s
            for s in __import__("itertools").combinations(range(5), k)
            if abs(values[list(s)].sum().item() / 2.5 - value.item()) < 1e-6
        ]
        assert picked, value
        counts[list(picked[0])] += 1
        total += value.item()
    # every sample is in with probability 0.5 (binomial, 2000 draws: sd 0.011) and the estimate is unbiased
    assert torch.allclose(counts / draws, torch.full((5,), 0.5), atol=0.05)
    assert total / draws == pytest.approx(values.mean().item(), rel=0.05)
    # p = 1: every sample, every time
    full = PerceptualTerm(_MeanLoss(), _PoolVAE(), torch.ones(1000), "sample", impl="fast")
    value, logs = full(
        x0, torch.zeros_like(x0), torch.ones(5, dtype=torch.long), pixels, list(range(5)), [0] * 5
    )
    assert logs["dinov2_fraction"] == 1.0 and value.item() == pytest.approx(values.mean().item())


def test_sample_fraction_draws_come_from_the_generator_and_respect_max_timestep():
    term = PerceptualTerm(
        _MeanLoss(),
        _PoolVAE(),
        torch.ones(1000),
        "sample",
        impl="fast",
        sample_fraction=0.5,
        max_timestep=500,
    )
    sel = [0, 2, 3, 5]
    a = term.subsample(sel, torch.Generator().manual_seed(7))
    assert a == term.subsample(sel, torch.Generator().manual_seed(7)) and len(a) == 2 and set(a) <= set(sel)
    x0 = torch.ones(4, 4, 2, 2)
    t = torch.tensor([900, 10, 900, 900])  # one qualifying sample: decoded with probability 0.5
    seen = set()
    for seed in range(20):
        _, logs = term(
            x0,
            x0,
            t,
            torch.zeros(4, 3, 16, 16),
            [0, 1, 2, 3],
            [0] * 4,
            generator=torch.Generator().manual_seed(seed),
        )
        seen.add(logs["dinov2_fraction"])
    assert seen == {0.0, 0.25}
    with pytest.raises(ValueError, match="sample_fraction"):
        PerceptualTerm(_MeanLoss(), _PoolVAE(), torch.ones(1000), "sample", impl="fast", sample_fraction=0.0)


# --- the selectable variants on the tiny models --------------------------------------------------------------


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    pred = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    return images, latents, noisy, pred


def test_crop_as_large_as_the_image_is_fast(tiny_models):
    vae, encoder, _ = tiny_models
    sched = _scheduler("epsilon")
    loss = DINOv2PerceptualLoss(encoder, layers=[1, 3])
    images, latents, noisy, pred = _inputs()
    t = torch.tensor([10, 400])
    fast = PerceptualTerm(loss, vae, sched.alphas_cumprod, "epsilon", impl="fast")
    crop = PerceptualTerm(loss, vae, sched.alphas_cumprod, "epsilon", impl="crop", crop_size=64)
    v_fast, _ = fast(pred, noisy, t, images, [0, 1], [0, 0])
    v_crop, _ = crop(pred, noisy, t, images, [0, 1], [0, 0], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(v_crop, v_fast)
    # fast = the loss of the decoded whole x0 against the whole training image
    x0 = predicted_x0(pred, noisy, t, sched.alphas_cumprod, "epsilon")
    ref, _ = loss(decode_latents(vae, x0).clamp(-1, 1), images)
    torch.testing.assert_close(v_fast, ref.mean())


def test_crop_term_equals_the_loss_of_the_cropped_decode_and_image(tiny_models):
    vae, encoder, _ = tiny_models
    sched = _scheduler("epsilon")
    loss = DINOv2PerceptualLoss(encoder, layers=[1, 3])
    images, latents, noisy, pred = _inputs(1)
    t = torch.tensor([10, 400])
    cache = DINOv2TargetCache(loss, dtype=torch.float32)
    term = PerceptualTerm(loss, vae, sched.alphas_cumprod, "epsilon", impl="crop", crop_size=32, cache=cache)
    value, _ = term(pred, noisy, t, images, [0, 1], [0, 1], generator=torch.Generator().manual_seed(4))
    boxes = sample_crop_boxes(2, 8, 8, 4, torch.Generator().manual_seed(4))
    x0 = predicted_x0(pred, noisy, t, sched.alphas_cumprod, "epsilon")
    decoded = decode_latents(vae, crop_boxes(x0, boxes)).clamp(-1, 1)
    ref, _ = loss(decoded, crop_boxes(images, boxes, scale=8))
    torch.testing.assert_close(value, ref.mean())
    # targets cached per (image, flip, crop box)
    assert sorted(k[2:] for k in cache._store) == sorted(boxes) and cache.misses == 2
    (grad,) = torch.autograd.grad(value, pred)
    for i, (top, left, h, w) in enumerate(boxes):  # the gradient reaches x0 only inside the crop
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[top : top + h, left : left + w] = True
        assert grad[i][:, inside].abs().sum() > 0 and grad[i][:, ~inside].abs().sum() == 0


def _args(**kw):
    base = dict(
        dinov2_loss_impl="crop",
        dinov2_resolution=None,
        dinov2_weights=None,
        dinov2_model_name="tiny14",
        dinov2_feature_layers=[1, 3],
        dinov2_loss_type="l2",
        dinov2_layer_reduction="sum",
        dinov2_latent_head=None,
        dinov2_tiny_vae=None,
        dinov2_vae_checkpointing=False,
        dinov2_target_cache="memory",
        dinov2_max_timestep=None,
        dinov2_crop_size=32,
        dinov2_sample_fraction=None,
        resolution=64,
    )
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize(
    "impl,resolution,resize,cached,fraction",
    [
        ("crop", 112, "bicubic_antialias", True, 1.0),  # 32 px crops of 64 px: 224 x 32 / 64
        ("fast", 224, "bicubic_antialias", True, 0.5),
        ("reference", 518, "bilinear", False, 1.0),
    ],
)
def test_build_selects_the_variant(tiny_assets, tiny_models, impl, resolution, resize, cached, fraction):
    vae, _, _ = tiny_models
    sched = _scheduler("epsilon")
    term = build_perceptual_term(
        _args(dinov2_loss_impl=impl, dinov2_weights=str(tiny_assets["dinov2_official"])),
        vae,
        sched,
        torch.device("cpu"),
    )
    assert term.impl == impl and term.loss.encoder.resolution == resolution and term.loss.resize == resize
    assert (term.cache is not None) == cached and term.crop_size == 32 and term.sample_fraction == fraction
    assert term.loss.weights == {1: 1.0, 3: 1.0}
    with pytest.raises(ValueError, match="reference"):
        build_perceptual_term(
            _args(dinov2_loss_impl="reference", dinov2_tiny_vae="x"), vae, sched, torch.device("cpu")
        )


def test_flags_default_to_fast_on_half_the_samples_with_the_seeds_layer_sum():
    from train.anomaly.args import parse, stage1_parser

    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--mvtec_name", "hazelnut"]
    base += ["--output_dir", "o", "--max_train_steps", "1", "--use_dinov2_loss"]
    args = parse(stage1_parser(), base)
    assert (args.dinov2_loss_impl, args.dinov2_sample_fraction, args.dinov2_resolution) == ("fast", 0.5, 224)
    assert args.dinov2_layer_reduction == "sum" and args.dinov2_crop_size == 256
    args = parse(stage1_parser(), base + ["--dinov2_loss_impl", "crop"])  # 256 px crops of 512 px images
    assert (args.dinov2_sample_fraction, args.dinov2_resolution) == (1.0, 112)
    args = parse(stage1_parser(), base + ["--dinov2_loss_impl", "crop", "--resolution", "1024"])
    assert args.dinov2_resolution == 56
    args = parse(stage1_parser(), base + ["--dinov2_loss_impl", "crop", "--resolution", "256"])
    assert args.dinov2_resolution == 224  # a crop as large as the image is the full image
    args = parse(stage1_parser(), base + ["--dinov2_loss_impl", "reference"])
    assert (args.dinov2_sample_fraction, args.dinov2_resolution) == (1.0, 518)
    with pytest.raises(SystemExit, match="sample_fraction"):
        parse(stage1_parser(), base + ["--dinov2_loss_impl", "reference", "--dinov2_sample_fraction", "0.5"])
    with pytest.raises(SystemExit, match="crop_size"):
        parse(stage1_parser(), base + ["--dinov2_crop_size", "100"])
    with pytest.raises(SystemExit, match="reference"):
        parse(stage1_parser(), base + ["--dinov2_loss_impl", "reference", "--dinov2_tiny_vae", "t"])
