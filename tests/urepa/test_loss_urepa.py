"""Token, manifold and diffusion-target terms against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from losses.diffusion_target import noisy_and_target
from losses.urepa import URepaLoss, alignment_loss, manifold_loss, token_loss


def test_token_loss_hand_computed():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    y = torch.tensor([[[1.0, 1.0], [0.0, -3.0]]])
    # cos = 1/sqrt2 and -1 -> mean(1 - cos) = (1 - 1/sqrt2 + 2) / 2
    assert token_loss(x, y).item() == pytest.approx((3 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert token_loss(y.half(), y.half()).dtype == torch.float32
    with pytest.raises(ValueError):
        token_loss(x, y[:, :1])


def test_manifold_loss_hand_computed():
    # per-sample mean tokens: x -> e1, e2 (Gram = I); y -> e1, (e1+e2)/sqrt2 (off-diagonal 1/sqrt2)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]]])
    y = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    off = 1 / math.sqrt(2)
    assert manifold_loss(x, y).item() == pytest.approx(2 * off**2 / 4, abs=1e-6)
    assert manifold_loss(x, y, upper_only=True).item() == pytest.approx(off**2, abs=1e-6)
    assert manifold_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)
    # token counts may differ (only per-sample means enter)
    assert manifold_loss(x, y[:, :1]).item() == pytest.approx(manifold_loss(x, y[:, :1] * 5).item(), abs=1e-6)


def test_alignment_loss_averages_layers():
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(3, 4, 8, generator=g) for _ in range(4))
    out = alignment_loss({"mid": a, "enc_last": c}, {"mid": b, "enc_last": d}, manifold_coeff=3.0)
    tok = (token_loss(a, b) + token_loss(c, d)) / 2
    man = (manifold_loss(a, b) + manifold_loss(c, d)) / 2
    torch.testing.assert_close(out["loss_token"], tok)
    torch.testing.assert_close(out["loss_manifold"], man)
    torch.testing.assert_close(out["loss_align"], tok + 3.0 * man)
    with pytest.raises(KeyError, match="dec_first"):
        alignment_loss({"dec_first": a}, {"mid": b})


def _scheduler_with(alphas_cumprod: list[float]) -> DDPMScheduler:
    """A DDPM schedule whose cumulative products are exactly ``alphas_cumprod``."""
    ac = torch.tensor(alphas_cumprod, dtype=torch.float64)
    betas = 1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    return DDPMScheduler(num_train_timesteps=len(alphas_cumprod), trained_betas=betas.tolist())


def test_v_and_epsilon_targets_closed_form():
    """x_t and the v / eps targets of the shared scheduler-based function against the closed form."""
    sched = _scheduler_with([0.9, 0.5, 0.1])
    x0 = torch.tensor([[2.0], [2.0], [2.0]])
    eps = torch.tensor([[1.0], [1.0], [1.0]])
    t = torch.tensor([0, 1, 2])
    xt, v = noisy_and_target(sched, x0, eps, t, "v")
    expected = torch.tensor(
        [
            [math.sqrt(0.9) - 2 * math.sqrt(0.1)],
            [math.sqrt(0.5) - 2 * math.sqrt(0.5)],
            [math.sqrt(0.1) - 2 * math.sqrt(0.9)],
        ]
    )
    torch.testing.assert_close(v, expected)
    expected_xt = torch.tensor(
        [[2 * math.sqrt(0.9) + math.sqrt(0.1)], [3 * math.sqrt(0.5)], [2 * math.sqrt(0.1) + math.sqrt(0.9)]]
    )
    torch.testing.assert_close(xt, expected_xt)
    xt_eps, target = noisy_and_target(sched, x0, eps, t, "epsilon")
    torch.testing.assert_close(target, eps)
    torch.testing.assert_close(xt_eps, xt)
    # x0 = alpha x_t - sigma v and eps = sigma x_t + alpha v on the unit circle alpha^2 + sigma^2 = 1
    alpha, sigma = (
        torch.tensor([0.9, 0.5, 0.1]).sqrt()[:, None],
        torch.tensor([0.1, 0.5, 0.9]).sqrt()[:, None],
    )
    torch.testing.assert_close(alpha * xt - sigma * v, x0)
    torch.testing.assert_close(sigma * xt + alpha * v, eps)
    with pytest.raises(ValueError):
        noisy_and_target(sched, x0, eps, t, "sample")


def test_combined_loss_matches_terms():
    class Toy(torch.nn.Module):
        def forward(self, x, t, c, return_tokens=True):
            tokens = {"mid": x.flatten(2).transpose(1, 2)[:, :, :2].contiguous()} if return_tokens else {}
            return x * 0.5, tokens

    ac = torch.linspace(0.99, 0.01, 1000)
    sched = _scheduler_with(ac.tolist())
    x = torch.randn(3, 4, 2, 2)
    noise, t = torch.randn_like(x), torch.tensor([5, 500, 995])
    dino = {"mid": torch.randn(3, 4, 2)}
    out = URepaLoss(sched, prediction="epsilon", align_coeff=0.8, manifold_coeff=3.0)(
        Toy(), x, dino, None, noise, t
    )
    a = ac[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x + (1 - a).sqrt() * noise  # closed form, independent of the code under test
    diff = ((xt * 0.5 - noise) ** 2).mean()
    tokens = xt.flatten(2).transpose(1, 2)[:, :, :2]
    align = token_loss(tokens, dino["mid"]) + 3.0 * manifold_loss(tokens, dino["mid"])
    torch.testing.assert_close(out["loss_diff"], diff)
    torch.testing.assert_close(out["loss"], diff + 0.8 * align)
    assert set(out) == {"loss", "loss_diff", "loss_token", "loss_manifold", "loss_align"}
