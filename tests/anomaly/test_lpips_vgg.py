"""LPIPS-VGG: parity with the lpips package on the same weights, offline loading, clear errors."""

from __future__ import annotations

import warnings

import lpips
import pytest
import torch

from losses.lpips_vgg import (
    build_lpips_vgg,
    lpips_distance_from_features,
    lpips_features,
    torchvision_vgg16_cache_path,
)
from utils.weights import MissingWeightsError


@pytest.fixture(scope="module")
def reference_and_ckpt(tmp_path_factory):
    """lpips.LPIPS with a random VGG trunk and that trunk saved as a torchvision VGG16 checkpoint."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    state = {}
    for key, value in ref.state_dict().items():
        if key.startswith("net.slice"):
            _, _, idx, name = key.split(".")
            state[f"features.{idx}.{name}"] = value
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return ref, path


def test_matches_lpips_package_on_same_weights(reference_and_ckpt):
    ref, ckpt = reference_and_ckpt
    ours = build_lpips_vgg(vgg_ckpt_path=ckpt)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    torch.manual_seed(1)
    x, y = torch.rand(3, 3, 48, 48) * 2 - 1, torch.rand(3, 3, 48, 48) * 2 - 1
    expected = ref(x, y).flatten()
    assert torch.allclose(ours(x, y).flatten(), expected, atol=1e-6)
    cached = lpips_distance_from_features(ours, lpips_features(ours, x), lpips_features(ours, y))
    assert torch.allclose(cached, expected, atol=1e-6)
    # broadcasting one image's features against a batch = the per-pair values
    fa = [f[:1] for f in lpips_features(ours, x)]
    row = lpips_distance_from_features(ours, fa, lpips_features(ours, y))
    assert torch.allclose(row, ref(x[:1].expand(3, -1, -1, -1), y).flatten(), atol=1e-6)
    # [0,1] inputs with normalize=True
    f01 = lpips_features(ours, (x + 1) / 2, normalize=True)
    assert torch.allclose(
        lpips_distance_from_features(ours, f01, lpips_features(ours, y)), expected, atol=1e-6
    )


def test_linear_heads_are_the_calibrated_ones():
    ours = build_lpips_vgg(pretrained_backbone=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # loads the package's v0.1 heads
    for k in range(5):
        assert torch.equal(ours.lins[k].model[-1].weight, ref.lins[k].model[-1].weight)
    assert torch.equal(ours.scaling_layer.scale, ref.scaling_layer.scale)


def test_missing_weights_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(MissingWeightsError) as err:
        build_lpips_vgg()
    assert str(torchvision_vgg16_cache_path()) in str(err.value) and "--vgg_ckpt_path" in str(err.value)
    with pytest.raises(MissingWeightsError) as err:
        build_lpips_vgg(vgg_ckpt_path=tmp_path / "nope.pth")
    assert "nope.pth" in str(err.value) and str(torchvision_vgg16_cache_path()) in str(err.value)


def test_wrong_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision VGG16 checkpoint"):
        build_lpips_vgg(vgg_ckpt_path=bad)
