"""DINOv2 perceptual loss: x0 reconstruction (closed form), feature distance (hand computation), cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from losses.dinov2_perceptual import DINOv2PerceptualLoss, DINOv2TargetCache, decode_latents, predicted_x0
from models.dinov2_encoder import DINOv2Encoder


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_reconstruction_matches_closed_form(prediction_type):
    sched = _scheduler(prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64).float()
    eps = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.add_noise(x0, eps, t)
    # the exact model output the scheduler asks for
    out = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
    rec = predicted_x0(out, xt, t, sched.alphas_cumprod, prediction_type)
    torch.testing.assert_close(rec, x0, atol=2e-4, rtol=1e-4)
    # and against the formula written out with numpy, for an arbitrary (wrong) prediction
    wrong = torch.randn(4, 4, 8, 8, generator=g)
    rec = predicted_x0(wrong, xt, t, sched.alphas_cumprod, prediction_type).double().numpy()
    a = sched.alphas_cumprod.double().numpy()[t.numpy()].reshape(-1, 1, 1, 1)
    xt_, w = xt.double().numpy(), wrong.double().numpy()
    expected = (
        (xt_ - np.sqrt(1 - a) * w) / np.sqrt(a)
        if prediction_type == "epsilon"
        else (np.sqrt(a) * xt_ - np.sqrt(1 - a) * w)
    )
    np.testing.assert_allclose(rec, expected, rtol=1e-4, atol=1e-4)


def test_x0_rejects_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type"):
        predicted_x0(
            torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]), torch.ones(1000), "flow"
        )


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return DINOv2Encoder(variant="tiny14", resolution=28, input_range="-1_1")


def _hand_loss(enc, a, b, layers, kind, reduction="sum"):
    fa = enc(a, layers=layers, return_patch_tokens=False).intermediate
    fb = enc(b, layers=layers, return_patch_tokens=False).intermediate
    total = np.zeros(a.shape[0])
    for layer in layers:
        x, y = fa[layer].double().numpy(), fb[layer].double().numpy()
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        y = y / np.linalg.norm(y, axis=-1, keepdims=True)
        d = x - y
        if kind == "l1":
            v = np.abs(d)
        elif kind == "l2":
            v = d**2
        else:
            v = np.where(np.abs(d) < 1, 0.5 * d**2, np.abs(d) - 0.5)
        total += v.reshape(a.shape[0], -1).mean(1) * (1.0 if reduction == "sum" else 1.0 / len(layers))
    return total


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kind", ["l1", "l2", "smooth_l1"])
def test_dino_loss_matches_hand_computation(encoder, kind, reduction):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 40, 40, generator=g) * 2 - 1
    b = torch.rand(2, 3, 40, 40, generator=g) * 2 - 1
    loss = DINOv2PerceptualLoss(encoder, layers=[1, 3], loss_type=kind, layer_reduction=reduction)
    per_sample, per_layer = loss(a, b)
    np.testing.assert_allclose(
        per_sample.double().numpy(), _hand_loss(encoder, a, b, [1, 3], kind, reduction), rtol=1e-4
    )
    assert set(per_layer) == {1, 3}
    same, _ = loss(a, a)
    assert same.abs().max() < 1e-6
    # gradients reach the input image (the decoded prediction)
    x = a.clone().requires_grad_(True)
    loss(x, b)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dino_loss_checks_layers_against_depth(encoder):
    with pytest.raises(ValueError, match=r"0\.\.3"):
        DINOv2PerceptualLoss(encoder, layers=[3, 6, 9, 11])
    with pytest.raises(ValueError, match="loss type"):
        DINOv2PerceptualLoss(encoder, layers=[1], loss_type="cosine")
    with pytest.raises(ValueError, match="layer_reduction"):
        DINOv2PerceptualLoss(encoder, layers=[1], layer_reduction="max")


def test_layer_reduction_default_is_the_seeds_sum(encoder):
    """The seed adds the layers with weight 1 each: sum = #layers x mean, and sum is the default."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 3, 28, 28, generator=g) * 2 - 1, torch.rand(2, 3, 28, 28, generator=g) * 2 - 1
    default, _ = DINOv2PerceptualLoss(encoder, layers=[0, 1, 3])(a, b)
    mean, _ = DINOv2PerceptualLoss(encoder, layers=[0, 1, 3], layer_reduction="mean")(a, b)
    torch.testing.assert_close(default, 3 * mean)


def test_target_cache_equals_direct_features(encoder):
    loss = DINOv2PerceptualLoss(encoder, layers=[0, 2], loss_type="l2")
    cache = DINOv2TargetCache(loss, dtype=torch.float32)
    imgs = torch.rand(3, 3, 28, 28) * 2 - 1
    first = cache.get(imgs, [0, 1, 2], [0, 1, 0])
    direct = loss.target_features(imgs)
    for layer in (0, 2):
        torch.testing.assert_close(first[layer], direct[layer])
    assert cache.misses == 3 and len(cache) == 3
    # a second lookup is served from the cache even with other pixels under the same key
    again = cache.get(torch.zeros_like(imgs), [0, 1, 2], [0, 1, 0])
    torch.testing.assert_close(again[2], direct[2])
    assert cache.hits == 3
    cache.get(imgs[:1], [0], [3])  # new flip -> new entry
    assert len(cache) == 4


def test_perceptual_term_timestep_threshold_skips_decode(encoder):
    from train.anomaly.perceptual import PerceptualTerm

    class CountingVAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.config = type("C", (), {"scaling_factor": 0.5})()
            self.calls = 0

        def decode(self, z):
            self.calls += 1
            img = torch.tanh(z[:, :3].repeat_interleave(7, -1).repeat_interleave(7, -2) * self.w)
            return type("O", (), {"sample": img})()

    vae = CountingVAE()
    sched = _scheduler("epsilon")
    loss = DINOv2PerceptualLoss(encoder, layers=[1], loss_type="l2")
    term = PerceptualTerm(loss, vae, sched.alphas_cumprod, "epsilon", max_timestep=100, impl="fast")
    pred = torch.randn(2, 4, 4, 4, requires_grad=True)
    noisy = torch.randn(2, 4, 4, 4)
    target = torch.rand(2, 3, 28, 28) * 2 - 1
    value, logs = term(pred, noisy, torch.tensor([500, 900]), target, [0, 1], [0, 0])
    assert vae.calls == 0 and value.item() == 0.0 and logs["dinov2_fraction"] == 0.0
    value, logs = term(pred, noisy, torch.tensor([50, 900]), target, [0, 1], [0, 0])
    assert vae.calls == 1 and logs["dinov2_fraction"] == 0.5
    # only sample 0 counts, divided by the batch size 2
    x0 = predicted_x0(pred[:1], noisy[:1], torch.tensor([50]), sched.alphas_cumprod, "epsilon")
    ref, _ = loss(decode_latents(vae, x0).clamp(-1, 1), target[:1])
    torch.testing.assert_close(value, ref.sum() / 2)
    value.backward()
    assert pred.grad[0].abs().sum() > 0 and pred.grad[1].abs().sum() == 0


def test_perceptual_term_with_latent_head(encoder):
    from models.latent_dino_head import LatentDINOv2, LatentPatchHead
    from train.anomaly.perceptual import PerceptualTerm

    torch.manual_seed(0)
    head = LatentDINOv2(encoder, LatentPatchHead(embed_dim=encoder.embed_dim, hidden=8, depth=1))
    sched = _scheduler("epsilon")
    loss = DINOv2PerceptualLoss(encoder, layers=[0, 2], loss_type="l1")
    term = PerceptualTerm(loss, None, sched.alphas_cumprod, "epsilon", latent_head=head)
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    noisy, lat = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 20])
    value, _ = term(pred, noisy, t, torch.zeros(2, 3, 64, 64), [0, 1], [0, 0], target_latents=lat)
    x0 = predicted_x0(pred, noisy, t, sched.alphas_cumprod, "epsilon")
    f = {
        k: torch.nn.functional.normalize(v, dim=-1)
        for k, v in head(x0, layers=[0, 2], return_patch_tokens=False).intermediate.items()
    }
    g = {
        k: torch.nn.functional.normalize(v, dim=-1)
        for k, v in head(lat, layers=[0, 2], return_patch_tokens=False).intermediate.items()
    }
    ref = sum((f[k] - g[k]).abs().flatten(1).mean(1) for k in (0, 2))  # layers summed (the default)
    torch.testing.assert_close(value, ref.mean())
    value.backward()
    assert pred.grad.abs().sum() > 0
