"""Metrics, focal loss, the DRAEM segmentation U-Net and the Perlin-noise anomalies, on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.downstream.metrics import (
    auroc,
    average_precision,
    f1_max,
    image_scores_from_maps,
    localization_metrics,
)

# sklearn's documented example: AUROC 0.75, AP 0.8333...
LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_auroc_ap_f1_on_the_textbook_case():
    assert auroc(LABELS, SCORES) == pytest.approx(0.75)
    assert average_precision(LABELS, SCORES) == pytest.approx((1.0 + 2 / 3) / 2)
    # descending: 0.8 (+) P=1 R=.5 F1=.667; 0.35 (+) P=2/3 R=1 F1=.8
    assert f1_max(LABELS, SCORES) == pytest.approx(0.8)
    # the references' grid rule (score > t, t = 0, 0.5, 1): t=0 -> F1 2/3, t=0.5 -> F1 2/3
    assert f1_max(LABELS, SCORES, grid_step=0.5) == pytest.approx(2 / 3)


def test_metrics_agree_with_sklearn_on_random_data():
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    s = np.round(rng.random(500) + 0.5 * y, 2)  # ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    p, r, _ = precision_recall_curve(y, s)
    assert f1_max(y, s) == pytest.approx(np.nanmax(2 * p * r / (p + r)))


def test_single_class_is_an_error():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        auroc([1, 1], [0.2, 0.3], "image AUROC")
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        average_precision([0, 1], [0.1, 0.2, 0.3])


def test_image_score_is_max_of_zero_padded_box_filter():
    maps = torch.zeros(2, 5, 5)
    maps[0, 2, 2] = 9.0  # centre: a 3x3 box sees it once -> 1
    maps[1, 0, 0] = 9.0  # corner: zero padding counts in the average (count_include_pad) -> 9 / 9 = 1
    maps[1, 4, 4] = 4.5
    assert image_scores_from_maps(maps, 3).tolist() == pytest.approx([1.0, 1.0])
    assert image_scores_from_maps(maps, 1).tolist() == pytest.approx([9.0, 9.0])
    with pytest.raises(ValueError, match="odd"):
        image_scores_from_maps(maps, 4)


def test_localization_metrics_pool_pixels_and_take_image_labels_from_masks():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(1)
    masks = np.zeros((4, 8, 8), dtype=bool)
    masks[0, 2:4, 2:5] = True
    masks[1, 5:7, 1:3] = True
    maps = np.clip(rng.random((4, 8, 8)) * 0.6 + 0.4 * masks, 0, 1).astype(np.float32)
    m = localization_metrics(maps, masks, kernel=3)
    img_scores = image_scores_from_maps(torch.from_numpy(maps), 3).numpy()
    assert m["image_auroc"] == pytest.approx(roc_auc_score([1, 1, 0, 0], img_scores))
    assert m["image_ap"] == pytest.approx(average_precision_score([1, 1, 0, 0], img_scores))
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert m["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    assert 0 < m["au_pro"] <= 1 and 0 < m["pixel_f1_max"] <= 1
    with pytest.raises(ValueError, match="must both be"):
        localization_metrics(maps, masks[:, :4])


# ---------------------------------------------------------------------------------------------- focal loss


def test_focal_loss_hand_value_with_the_references_smoothing():
    from losses.focal import focal_loss

    probs = torch.tensor([0.2, 0.8]).view(1, 2, 1, 1)
    target = torch.ones(1, 1, 1, 1)
    s = 1e-5
    pt = s * 0.2 + (1 - s) * 0.8 + s  # one-hot clamped to [s/(C-1), 1-s], then + s
    expected = -((1 - pt) ** 2) * math.log(pt)
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_without_focusing_or_smoothing_is_cross_entropy():
    from losses.focal import focal_loss

    logits = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 1, 4, 5), generator=torch.Generator().manual_seed(1))
    ce = F.cross_entropy(logits, target[:, 0])
    assert focal_loss(logits.softmax(1), target, gamma=0.0, smooth=0.0).item() == pytest.approx(
        ce.item(), rel=1e-5
    )
    # gamma > 0 down-weights easy pixels: never above the cross-entropy
    assert focal_loss(logits.softmax(1), target, gamma=2.0, smooth=0.0).item() < ce.item()
    # alpha is normalised to sum 1 (the reference's list alpha): equal weights halve a 2-class loss
    two = logits[:, :2].softmax(1)
    t2 = (target > 0).float()
    assert focal_loss(two, t2, alpha=[1.0, 1.0]).item() == pytest.approx(
        focal_loss(two, t2).item() / 2, rel=1e-6
    )


# ---------------------------------------------------------------------------------------------- U-Net


def _reference_parameter_count(in_ch: int, out_ch: int, w: int) -> int:
    """DRAEM model_unet.DiscriminativeSubNetwork, layer by layer (conv 3x3 with bias, BatchNorm affine)."""

    def conv(a, b):
        return 9 * a * b + b

    def bn(c):
        return 2 * c

    def block(a, b):  # conv-bn-relu-conv-bn-relu
        return conv(a, b) + bn(b) + conv(b, b) + bn(b)

    def up(a, b):  # upsample-conv-bn-relu
        return conv(a, b) + bn(b)

    enc = block(in_ch, w) + block(w, 2 * w) + block(2 * w, 4 * w) + block(4 * w, 8 * w)
    enc += block(8 * w, 8 * w) + block(8 * w, 8 * w)
    dec = up(8 * w, 8 * w) + block(16 * w, 8 * w) + up(8 * w, 4 * w) + block(12 * w, 4 * w)
    dec += up(4 * w, 2 * w) + block(6 * w, 2 * w) + up(2 * w, w) + block(3 * w, w)
    dec += up(w, w) + block(2 * w, w) + conv(w, out_ch)
    return enc + dec


def test_unet_matches_the_reference_layout():
    from models.draem_segmentation import DiscriminativeSubNetwork, init_weights

    for w in (8, 64):
        with torch.device("meta"):  # no memory, no init time: only the shapes are counted
            m = DiscriminativeSubNetwork(3, 2, w)
        assert sum(p.numel() for p in m.parameters()) == _reference_parameter_count(3, 2, w)
    m = DiscriminativeSubNetwork(3, 2, 8)
    keys = set(m.state_dict())
    for k in (
        "encoder_segment.block1.0.weight",
        "encoder_segment.block6.4.running_var",
        "decoder_segment.up_b.1.weight",
        "decoder_segment.db_b.0.weight",
        "decoder_segment.db4.4.bias",
        "decoder_segment.fin_out.0.weight",
    ):
        assert k in keys, k
    assert m.decoder_segment.db_b[0].in_channels == 16 * 8 and m.decoder_segment.db3[0].in_channels == 3 * 8
    torch.manual_seed(0)
    init_weights(m)
    bn = m.encoder_segment.block1[1]
    assert torch.all(bn.bias == 0) and abs(bn.weight.mean().item() - 1) < 0.05
    assert m.encoder_segment.block2[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert m(torch.rand(2, 3, 64, 32)).shape == (2, 2, 64, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        m(torch.rand(1, 3, 48, 64))


# ---------------------------------------------------------------------------------------------- Perlin noise


def _perlin_pixel(y: int, x: int, shape, angles: np.ndarray) -> float:
    """Perlin noise at one pixel, straight from the definition (corner gradients . offsets, quintic fade)."""
    h, w = shape
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    py, px = y * ry / h, x * rx / w
    iy, ix = int(math.floor(py)), int(math.floor(px))
    fy, fx = py - iy, px - ix

    def dot(cy, cx):
        a = angles[iy + cy, ix + cx]
        return math.cos(a) * (fy - cy) + math.sin(a) * (fx - cx)

    def fade(t):
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    uy, ux = fade(fy), fade(fx)
    left = dot(0, 0) + uy * (dot(1, 0) - dot(0, 0))
    right = dot(0, 1) + uy * (dot(1, 1) - dot(0, 1))
    return math.sqrt(2) * (left + ux * (right - left))


def test_perlin_noise_matches_per_pixel_definition():
    from eval.downstream.perlin import perlin_noise_from_angles

    rng = np.random.default_rng(0)
    angles = 2 * math.pi * rng.random((3, 4))  # lattice 2 x 3 cells
    shape = (8, 12)
    noise = perlin_noise_from_angles(shape, torch.from_numpy(angles))
    expected = np.array([[_perlin_pixel(y, x, shape, angles) for x in range(12)] for y in range(8)])
    np.testing.assert_allclose(noise.numpy(), expected, atol=1e-6)
    assert noise[::4, ::4].abs().max() < 1e-6  # zero on lattice corners
    with pytest.raises(ValueError, match="multiple of the lattice"):
        perlin_noise_from_angles((9, 12), torch.from_numpy(angles))


def test_perlin_anomaly_is_seeded_and_only_touches_the_mask():
    from eval.downstream.perlin import TEXTURE_OPS, paste_anomaly

    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    texture = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    masks = []
    for seed in range(6):
        a, m = paste_anomaly(image, texture, np.random.default_rng(seed))
        b, m2 = paste_anomaly(image, texture, np.random.default_rng(seed))
        assert torch.equal(a, b) and torch.equal(m, m2)
        assert m.shape == (1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
        outside = (m == 0).expand_as(image)
        assert torch.equal(a[outside], image[outside])
        assert a.min() >= 0 and a.max() <= 1
        masks.append(m)
    assert any(m.sum() > 0 for m in masks)
    for op in TEXTURE_OPS:
        out = op(texture, np.random.default_rng(0))
        assert out.dtype == torch.uint8 and out.shape == texture.shape


def test_segmentation_loss_optional_terms():
    import argparse

    from eval.downstream.localization import segmentation_loss
    from losses.focal import focal_loss
    from models.draem_segmentation import DiscriminativeSubNetwork
    from train.dinovq.evaluate import ssim

    torch.manual_seed(0)
    model = DiscriminativeSubNetwork(3, 2, 4).eval()
    batch = {"image": torch.rand(2, 3, 32, 32), "mask": (torch.rand(2, 1, 32, 32) > 0.8).float()}
    probs = model(batch["image"]).softmax(1)
    focal = focal_loss(probs, batch["mask"])
    l1 = (probs[:, 1:] - batch["mask"]).abs().mean()
    s = 1 - ssim(probs[:, 1:], batch["mask"]).mean()
    args = argparse.Namespace(focal_gamma=2.0, l1_weight=0.0, ssim_weight=0.0)
    loss, logs = segmentation_loss(args)(model, batch)
    assert loss.item() == pytest.approx(focal.item(), rel=1e-6) and set(logs) == {"loss_focal"}
    args = argparse.Namespace(focal_gamma=2.0, l1_weight=0.5, ssim_weight=0.25)
    loss, logs = segmentation_loss(args)(model, batch)
    assert loss.item() == pytest.approx((focal + 0.5 * l1 + 0.25 * s).item(), rel=1e-5)
    assert set(logs) == {"loss_focal", "loss_l1", "loss_ssim"}
