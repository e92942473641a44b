"""DinoVQ: returned dict keys, adaptive weight, disc_start, gradient isolation, LPIPS integration."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from losses.patchgan import hinge_d_loss, vanilla_d_loss

sys.path.insert(0, str(Path(__file__).parent))
_spec = importlib.util.spec_from_file_location("dinovq_test_helpers", Path(__file__).parent / "helpers.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
tiny_model, batch = helpers.tiny_model, helpers.batch

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor")

BASE = {"dino_loss", "recon_loss", "vq_loss"}


def expected_gen_keys(extra=()):
    names = BASE | set(extra)
    return {"total_loss"} | names | {f"{n}_weighted" for n in names}


def test_dict_keys_and_total():
    model = tiny_model(dino_loss_weight=2.0, recon_loss_weight=0.5, vq_loss_weight=0.25)
    imgs, gt = batch()
    out = model.compute_loss(imgs, gt)
    assert set(out) == expected_gen_keys()
    assert float(out["dino_loss_weighted"]) == pytest.approx(2.0 * float(out["dino_loss"]))
    assert float(out["vq_loss_weighted"]) == pytest.approx(0.25 * float(out["vq_loss"]))
    total = sum(float(out[f"{n}_weighted"]) for n in BASE)
    assert float(out["total_loss"]) == pytest.approx(total, rel=1e-6)

    gan = tiny_model(use_gan=True, disc_start=0)
    out = gan.compute_loss(imgs, gt, update_type="generator", global_step=3)
    assert set(out) == expected_gen_keys(["gen_adv_loss"])
    d = gan.compute_loss(imgs, gt, update_type="discriminator", global_step=3)
    assert set(d) == {"disc_loss", "disc_weight", "logits_real", "logits_fake"}
    with pytest.raises(ValueError, match="update_type"):
        gan.compute_loss(imgs, gt, update_type="both")
    with pytest.raises(ValueError, match="use_gan"):
        model.compute_loss(imgs, gt, update_type="discriminator")


def test_losses_by_hand():
    model = tiny_model()
    imgs, gt = batch()
    model.eval()  # no EMA update, so encode() below sees the same codebook
    out = model.compute_loss(imgs, gt)
    z_q, _, vq = model.encode(imgs)
    rec = model.decode_pixels(z_q)
    pred = model.decode_dino(z_q)
    dino = (
        sum(
            1 - float(pred[b, n] @ gt[b, n] / (pred[b, n].norm() * gt[b, n].norm()))
            for b in range(2)
            for n in range(16)
        )
        / 32
    )
    assert float(out["dino_loss"]) == pytest.approx(dino, rel=1e-5)
    assert float(out["recon_loss"]) == pytest.approx(float(((rec - imgs) ** 2).mean()), rel=1e-5)
    assert float(out["vq_loss"]) == pytest.approx(float(vq), rel=1e-5)


def test_dino_tokens_on_another_grid_and_bad_shapes():
    model = tiny_model()
    imgs, _ = batch()
    gt = torch.randn(2, 9, 16)  # 3x3 teacher grid vs the 4x4 tokenizer grid
    out = model.compute_loss(imgs, gt)
    assert torch.isfinite(out["dino_loss"])
    with pytest.raises(ValueError, match="aspect ratio"):
        model.compute_loss(imgs, torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match="dino_dim"):
        model.compute_loss(imgs, torch.randn(2, 16, 15))
    with pytest.raises(ValueError, match="expects images"):
        model.compute_loss(torch.rand(2, 3, 32, 32), torch.randn(2, 16, 16))


def test_adaptive_weight_by_hand():
    model = tiny_model(use_gan=True, disc_start=0, disc_weight=0.5)
    imgs, gt = batch()
    torch.manual_seed(5)
    out = model.compute_loss(imgs, gt, update_type="generator", global_step=1)
    got = model.last_adaptive_weight

    # independent recomputation from the same parameters (EMA codebook disabled so the forward is identical)
    model2 = tiny_model(use_gan=True, disc_start=0, disc_weight=0.5)
    model2.load_state_dict(model.state_dict())
    model2.eval()
    z_q, _, _ = model2.encode(imgs)
    rec = model2.decode_pixels(z_q)
    rec_loss = F.mse_loss(rec, imgs)
    g_loss = -model2.loss_fn.discriminator(rec).mean()
    w = model2.to_pixels.weight
    g_rec = torch.autograd.grad(rec_loss, w, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, w)[0]
    expected = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    # eval mode (no autograd graph needed for the adaptive weight) falls back to the plain disc_weight
    model.eval()
    out_eval = model.compute_loss(imgs, gt, update_type="generator", global_step=1)
    assert model.last_adaptive_weight == pytest.approx(0.5)
    assert got > 0
    # the train-mode pass of model2 equals the hand computation
    model2.train()
    model2.quantizer.eval()  # keep the codebook fixed
    out2 = model2.compute_loss(imgs, gt, update_type="generator", global_step=1)
    assert model2.last_adaptive_weight == pytest.approx(float(expected), rel=1e-4)
    assert float(out2["gen_adv_loss_weighted"]) == pytest.approx(float(expected * g_loss), rel=1e-4)
    assert set(out_eval) == set(out)


def test_disc_start_warmup():
    model = tiny_model(use_gan=True, disc_start=10)
    imgs, gt = batch()
    before = model.compute_loss(imgs, gt, update_type="generator", global_step=9)
    assert float(before["gen_adv_loss_weighted"]) == 0.0
    assert not before["gen_adv_loss"].requires_grad
    d_before = model.compute_loss(imgs, gt, update_type="discriminator", global_step=9)
    assert float(d_before["disc_loss"]) == 0.0 and float(d_before["disc_weight"]) == 0.0
    after = model.compute_loss(imgs, gt, update_type="generator", global_step=10)
    assert float(after["gen_adv_loss_weighted"]) != 0.0
    d_after = model.compute_loss(imgs, gt, update_type="discriminator", global_step=10)
    assert float(d_after["disc_weight"]) == 1.0
    assert float(d_after["disc_loss"]) > 0


def test_hinge_and_vanilla_by_hand():
    r, f = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-2.0, 0.0, 0.3])
    hinge = 0.5 * ((0.5 + 0 + 2.0) / 3 + (0 + 1.0 + 1.3) / 3)
    assert float(hinge_d_loss(r, f)) == pytest.approx(hinge)
    sp = torch.nn.functional.softplus
    van = 0.5 * (float(sp(-r).mean()) + float(sp(f).mean()))
    assert float(vanilla_d_loss(r, f)) == pytest.approx(van)


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
@pytest.mark.parametrize("gen_loss", [None, "taming", "non_saturating"])
def test_generator_loss_forms_against_taming(disc_loss, gen_loss):
    from losses.patchgan import generator_adv_loss

    model = tiny_model(use_gan=True, disc_start=0, disc_loss=disc_loss, gen_loss=gen_loss)
    imgs, _ = batch()
    logits = model.loss_fn.discriminator(imgs).float()
    ours = float(model.loss_fn.generator_loss(imgs))
    taming = float(-torch.mean(logits))  # taming VQLPIPSWithDiscriminator: g_loss = -torch.mean(logits_fake)
    non_saturating = float(torch.log1p(torch.exp(-logits)).mean())  # log(1 + e^-x), by hand
    form = gen_loss or ("taming" if disc_loss == "hinge" else "non_saturating")
    assert ours == pytest.approx(taming if form == "taming" else non_saturating, rel=1e-5)
    assert taming != pytest.approx(non_saturating, rel=1e-3)  # the two forms differ on these logits
    r = torch.tensor([0.5, -2.0, 3.0])
    assert float(generator_adv_loss(r, disc_loss, "taming")) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="generator loss"):
        tiny_model(use_gan=True, gen_loss="wgan")


def test_gradient_isolation():
    model = tiny_model(use_gan=True, disc_start=0)
    imgs, gt = batch()
    disc = list(model.loss_fn.discriminator.parameters())
    gen = model.generator_parameters()
    assert len(gen) + len(disc) == len(list(model.parameters()))

    out = model.compute_loss(imgs, gt, update_type="generator", global_step=1)
    out["total_loss"].backward()
    assert all(p.grad is None for p in disc), "generator update leaked into the discriminator"
    assert sum(float(p.grad.abs().sum()) for p in gen if p.grad is not None) > 0

    model.zero_grad(set_to_none=True)
    d = model.compute_loss(imgs, gt, update_type="discriminator", global_step=1)
    d["disc_loss"].backward()
    assert all(p.grad is None for p in gen), "discriminator update leaked into the generator"
    assert sum(float(p.grad.abs().sum()) for p in disc) > 0

    # reusing the generator's reconstruction gives the same discriminator loss as recomputing it (eval mode)
    model.eval()
    model.compute_loss(imgs, gt, update_type="generator", global_step=1)
    reuse = model.compute_loss(imgs, gt, "discriminator", 1, reconstructions=model.last_reconstructions)
    again = model.compute_loss(imgs, gt, "discriminator", 1)
    assert float(reuse["disc_loss"]) == pytest.approx(float(again["disc_loss"]), rel=1e-5)


def test_lpips_perceptual_integration():
    from losses.lpips_vgg import build_lpips_vgg

    torch.manual_seed(0)
    # lpips.LPIPS(net="vgg") with a random VGG16 backbone and the package's calibrated heads, no download
    net = build_lpips_vgg(pretrained_backbone=False)
    # LPIPS-VGG needs >= 32 px (five pooling stages)
    model = tiny_model(use_perceptual=True, perceptual_weight=0.7, perceptual_module=net, img_size=(35, 35))
    imgs = torch.rand(2, 3, 35, 35) * 2 - 1
    gt = torch.randn(2, 25, 16)
    out = model.compute_loss(imgs, gt)
    assert set(out) == expected_gen_keys(["perceptual_loss"])
    model.eval()
    out = model.compute_loss(imgs, gt)
    rec, _ = model.reconstruct(imgs)
    assert float(out["perceptual_loss"]) == pytest.approx(float(net(rec, imgs).mean()), rel=1e-5)
    assert float(out["perceptual_loss_weighted"]) == pytest.approx(0.7 * float(out["perceptual_loss"]))
    assert not any(k.startswith("loss_fn.perceptual") for k in model.state_dict())
    assert all(not p.requires_grad for p in net.parameters())
    model.train()
    out = model.compute_loss(imgs, gt)
    out["total_loss"].backward()
    assert all(p.grad is None for p in net.parameters())
