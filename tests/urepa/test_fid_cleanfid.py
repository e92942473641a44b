"""FID / KID equal clean-fid's own calls on the same folders and Inception file; sFID's ADM feature layout.

The references are clean-fid's public entry points (``cleanfid.fid.compute_fid`` / ``compute_kid``) building
their own feature extractor; only the place they read the weights from is redirected to the random test file
(clean-fid would download to /tmp otherwise).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eval.fid import (
    feature_stats,
    fid_folders,
    folder_features,
    inception_stats,
    kid_folders,
    reference_stats,
)
from eval.inception import (
    PYTORCH_FID_FILENAME,
    SPATIAL_DIM,
    TORCHSCRIPT_FILENAME,
    CleanFIDInception,
    build_fid_inception_v3,
)
from utils.weights import MissingWeightsError

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of 3 small images each (different distributions, different sizes than 299)."""
    root = tmp_path_factory.mktemp("fid_folders")
    rng = np.random.default_rng(0)
    for name, scale in (("a", 255), ("b", 120)):
        (root / name).mkdir()
        for i in range(3):
            arr = (rng.random((36, 44, 3)) * scale).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root / "a", root / "b"


@pytest.fixture
def clean_fid_reads(monkeypatch, tmp_path):
    """Point clean-fid's own loaders at given files: mode "clean" reads <dir>/inception-2015-12-05.pt (its
    InceptionV3W, normally /tmp), mode "legacy_pytorch" reads $TORCH_HOME/hub/checkpoints/<pytorch-fid file>."""
    import cleanfid.features
    from cleanfid.inception_torchscript import InceptionV3W

    def use(torchscript=None, state_dict=None):
        if torchscript is not None:
            (tmp_path / "ts").mkdir()
            (tmp_path / "ts" / TORCHSCRIPT_FILENAME).symlink_to(torchscript)

            class Redirected(InceptionV3W):
                def __init__(self, path, download=True, resize_inside=False):
                    super().__init__(str(tmp_path / "ts"), download=False, resize_inside=resize_inside)

            monkeypatch.setattr(cleanfid.features, "InceptionV3W", Redirected)
        if state_dict is not None:
            hub = tmp_path / "torch_home" / "hub" / "checkpoints"
            hub.mkdir(parents=True)
            (hub / PYTORCH_FID_FILENAME).symlink_to(state_dict)
            monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    return use


def test_fid_and_kid_equal_clean_fid_clean_mode(
    folders, random_inception_torchscript, clean_fid_reads, fast_sqrtm
):
    from cleanfid.fid import compute_fid, compute_kid

    from eval.fid import main

    clean_fid_reads(torchscript=random_inception_torchscript)
    inception = CleanFIDInception(random_inception_torchscript)  # not named inception-2015-12-05.pt
    assert inception.mode == "clean"
    a, b = map(str, folders)
    ours = fid_folders(a, b, inception, sfid=True)
    ref = compute_fid(a, b, mode="clean", device=CPU, num_workers=0, verbose=False)
    assert ours["fid"] == ref  # the same features, statistics and frechet_distance: bit for bit
    assert ours["fid"] > 0 and np.isfinite(ours["sfid"]) and ours["sfid"] > 0
    np.random.seed(0)
    kid_ref = compute_kid(a, b, mode="clean", device=CPU, num_workers=0, verbose=False)
    assert kid_folders(a, b, inception, seed=0) == kid_ref
    cli = main([a, b, "--inception_path", str(random_inception_torchscript), "--device", "cpu", "--kid"])
    assert cli["fid"] == ref and cli["kid"] == kid_ref and cli["mode"] == "clean"


def test_fid_equals_clean_fid_legacy_pytorch(
    folders, random_inception_state_dict, clean_fid_reads, fast_sqrtm
):
    from cleanfid.fid import compute_fid

    clean_fid_reads(state_dict=random_inception_state_dict)
    inception = CleanFIDInception(random_inception_state_dict, device="cpu")
    assert inception.mode == "legacy_pytorch"
    a, b = map(str, folders)
    ref = compute_fid(a, b, mode="legacy_pytorch", device=CPU, num_workers=0, verbose=False)
    assert fid_folders(a, b, inception)["fid"] == ref
    assert ref > 0


@torch.no_grad()
def test_spatial_features_follow_the_adm_layout(random_inception_torchscript, random_inception_state_dict):
    """ADM: spatial = mixed_6/conv (NHWC)[..., :7].reshape(N, -1), i.e. index (h*17 + w)*7 + c."""

    def adm_by_hand(fmap):  # [B,C,17,17] NCHW -> the ADM layout, element by element
        b, _, hh, ww = fmap.shape
        out = torch.empty(b, hh * ww * 7)
        for h in range(hh):
            for w in range(ww):
                for c in range(7):
                    out[:, (h * ww + w) * 7 + c] = fmap[:, c, h, w]
        return out

    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    # TorchScript file: the map of layers.mixed_6.conv, reached by running the layers before mixed_6
    ts = CleanFIDInception(random_inception_torchscript)
    pool, spatial = ts.pool_and_spatial(x)
    h = (x - 128) / 128
    for name, layer in torch.jit.load(str(random_inception_torchscript)).layers.named_children():
        if name == "mixed_6":
            fmap = layer.conv(h)
            break
        h = layer(h)
    assert spatial.shape == (2, SPATIAL_DIM) and fmap.shape[-2:] == (17, 17)
    torch.testing.assert_close(spatial, adm_by_hand(fmap), rtol=0, atol=0)
    torch.testing.assert_close(pool, ts.pool(x), rtol=0, atol=0)  # same pass gives clean-fid's pool3

    # pytorch-fid weights: TF mixed_6/conv = torchvision Inception3's Mixed_6d.branch1x1, via forward hooks on
    # torchvision's own forward (independent of the clean-fid block walk under test)
    sd = CleanFIDInception(random_inception_state_dict)
    pool, spatial = sd.pool_and_spatial(x)
    net = build_fid_inception_v3()
    net.load_state_dict(torch.load(random_inception_state_dict, weights_only=True))
    seen = {}
    net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("map", o))
    net.avgpool.register_forward_hook(lambda m, i, o: seen.__setitem__("pool", o.flatten(1)))
    net.eval()(x / 127.5 - 1)
    torch.testing.assert_close(spatial, adm_by_hand(seen["map"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pool, seen["pool"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pool, sd.pool(x), rtol=0, atol=0)


def test_in_memory_images_equal_their_png_folder(tmp_path, random_inception_torchscript):
    """Generated images go through clean-fid's resizer per image; features equal the saved PNGs' features."""
    inception = CleanFIDInception(random_inception_torchscript)
    images = torch.randint(0, 256, (3, 3, 40, 40), generator=torch.Generator().manual_seed(1)).float()
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).byte().numpy()).save(tmp_path / f"{i}.png")
    from_folder = folder_features(tmp_path, inception, spatial=True)
    in_memory = inception(images, outputs=("pool", "spatial"))
    for k in ("pool", "spatial"):
        np.testing.assert_array_equal(in_memory[k].numpy(), from_folder[k])
    stats = inception_stats([images], inception)  # the same batch as the folder's (one DataLoader batch)
    for k in ("pool", "spatial"):
        mu, sigma = feature_stats(from_folder[k])
        np.testing.assert_array_equal(stats[k][0], mu)
        np.testing.assert_array_equal(stats[k][1], sigma)


def test_reference_stats_crop_skip_and_cache(tmp_path, random_inception_torchscript, caplog):
    """Reference images: centre crop + bicubic resize, then clean-fid; unreadable files skipped; cached."""
    from cleanfid.fid import get_folder_features

    ref = tmp_path / "ref" / "n01"
    ref.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for i, (h, w) in enumerate([(30, 50), (48, 36), (40, 40)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(ref / f"{i}.JPEG", quality=95)
    (ref / "broken.JPEG").write_bytes(b"not a jpeg")
    inception = CleanFIDInception(random_inception_torchscript)
    stats = reference_stats(
        tmp_path / "ref", inception, 32, None, tmp_path / "cache", inception_id=inception.id
    )
    assert "skipped 1 unreadable" in caplog.text
    # independent path: crop/resize by hand with PIL, save as PNG, clean-fid's folder features
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(3):
        with Image.open(ref / f"{i}.JPEG") as img:
            w, h = img.size
            s = min(w, h)
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            img.convert("RGB").crop(box).resize((32, 32), Image.BICUBIC).save(crops / f"{i}.png")
    feats = get_folder_features(
        str(crops), inception.feature_fn(True), num_workers=0, device=CPU, mode="clean", verbose=False
    )
    mu, sigma = feature_stats(feats[:, :2048])
    np.testing.assert_allclose(stats["pool"][0], mu, rtol=1e-5, atol=1e-5 * np.abs(mu).max())
    np.testing.assert_allclose(stats["pool"][1], sigma, rtol=1e-5, atol=1e-5 * np.abs(sigma).max())
    caplog.clear()
    again = reference_stats(
        tmp_path / "ref", inception, 32, None, tmp_path / "cache", inception_id=inception.id
    )
    assert "from cache" in caplog.text
    np.testing.assert_array_equal(again["spatial"][1], stats["spatial"][1])


def test_mode_and_file_must_match(tmp_path, random_inception_torchscript):
    with pytest.raises(ValueError, match="legacy_pytorch"):
        CleanFIDInception(random_inception_torchscript, mode="legacy_pytorch")
    with pytest.raises(ValueError, match="FID mode"):
        CleanFIDInception(random_inception_torchscript, mode="legacy_tensorflow")
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt"):
        CleanFIDInception(tmp_path / "missing.pt")


def test_trace_preserving_sqrtm(fast_sqrtm):
    """The test stand-in for scipy's sqrtm keeps the trace on low-rank covariance products."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 80)), rng.normal(size=(5, 80)) + 0.5
    m = np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)  # rank 3, like 4 images' covariances
    exact = np.sqrt(np.clip(np.linalg.eigvals(m).real, 0, None)).sum()  # tr sqrtm(m) = sum sqrt(eigenvalues)
    assert np.trace(fast_sqrtm(m, disp=False)[0]) == pytest.approx(exact, rel=1e-6)
    full = np.cov(rng.normal(size=(200, 6)), rowvar=False) @ np.cov(rng.normal(size=(200, 6)), rowvar=False)
    from scipy.linalg._matfuncs import sqrtm  # the unpatched function

    assert np.trace(fast_sqrtm(full, disp=False)[0]) == pytest.approx(np.trace(sqrtm(full)).real, rel=1e-6)
