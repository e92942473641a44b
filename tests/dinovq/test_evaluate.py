"""Reconstruction metrics against closed forms and a direct per-window computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.dinovq.evaluate import codebook_stats, frechet_distance, psnr, ssim


def test_psnr_closed_form():
    x = torch.zeros(1, 3, 8, 8)
    y = torch.full((1, 3, 8, 8), 0.1)
    assert float(psnr(x, y)) == pytest.approx(10 * math.log10(1 / 0.01), rel=1e-5)


def test_ssim_constant_images_closed_form():
    a, b = 0.3, 0.7
    x, y = torch.full((2, 3, 16, 16), a), torch.full((2, 3, 16, 16), b)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances are 0, so the contrast term is c2/c2 = 1
    torch.testing.assert_close(ssim(x, y), torch.full((2,), expected), rtol=1e-5, atol=1e-6)
    assert float(ssim(x, x)[0]) == pytest.approx(1.0)


def test_ssim_matches_direct_window_computation():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 1, 13, 12, generator=g), torch.rand(1, 1, 13, 12, generator=g)
    coords = np.arange(11) - 5
    w1 = np.exp(-(coords**2) / (2 * 1.5**2))
    w = np.outer(w1, w1) / np.outer(w1, w1).sum()
    xs, ys = x[0, 0].double().numpy(), y[0, 0].double().numpy()
    vals = []
    for i in range(13 - 10):
        for j in range(12 - 10):
            px, py = xs[i : i + 11, j : j + 11], ys[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cxy = (w * (px - mx) * (py - my)).sum()
            c1, c2 = 0.01**2, 0.03**2
            vals.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert float(ssim(x, y)[0]) == pytest.approx(float(np.mean(vals)), rel=1e-5)
    with pytest.raises(ValueError, match="smaller"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


def test_codebook_stats_by_hand():
    idx = torch.tensor([0, 0, 1, 3])
    stats = codebook_stats(idx, codebook_size=8)
    assert stats["codebook_usage"] == pytest.approx(3 / 8)
    p = np.array([0.5, 0.25, 0.25])
    assert stats["codebook_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_frechet_distance_identical_and_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(4 * 4.0, rel=1e-6)


def test_rfid_equals_clean_fid_on_the_same_images(tmp_path, random_inception_torchscript, fast_sqrtm):
    """rFID (in-memory reconstructions through clean-fid's resizer and extractor, as train/dinovq/train.py
    builds it) equals clean-fid's compute_fid on the same images saved as PNG."""
    from cleanfid.fid import compute_fid
    from PIL import Image

    from eval.inception import load_inception
    from train.dinovq.evaluate import evaluate_reconstruction

    class Darken(torch.nn.Module):  # a "tokenizer" whose reconstruction is the image at 3/4 brightness
        def reconstruct(self, imgs):
            x255 = ((imgs + 1) * 127.5).round()
            return (x255 * 3 // 4) / 127.5 - 1, torch.zeros(imgs.shape[0], 4, dtype=torch.long)

    g = torch.Generator().manual_seed(0)
    x255 = torch.randint(0, 256, (4, 3, 32, 32), generator=g).float()
    imgs = x255 / 127.5 - 1
    net = load_inception(random_inception_torchscript)
    inception = lambda x01: net(x01 * 255.0, outputs=("pool",))["pool"]  # noqa: E731  (train.py's)
    metrics, _ = evaluate_reconstruction(Darken(), [{"image": imgs}], 16, inception=inception)
    for name, batch in (("real", x255), ("rec", x255 * 3 // 4)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(batch):
            Image.fromarray(img.permute(1, 2, 0).byte().numpy()).save(tmp_path / name / f"{i}.png")
    ref = compute_fid(
        str(tmp_path / "real"),
        str(tmp_path / "rec"),
        mode="clean",
        custom_feat_extractor=net.pool,  # clean-fid's InceptionV3W on the test file (see test_fid_cleanfid.py)
        device=torch.device("cpu"),
        num_workers=0,
        verbose=False,
    )
    assert metrics["rfid"] == pytest.approx(ref, rel=1e-4) and ref > 0
    assert np.isfinite(metrics["psnr"])
