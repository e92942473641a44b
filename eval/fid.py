"""FID, KID and sFID through clean-fid's own code, and cached reference statistics of an image folder.

    python eval/fid.py DIR_A DIR_B [--mode clean|legacy_pytorch] [--inception_path FILE] [--kid] [--sfid]

- FID / KID: clean-fid (Parmar et al. 2022): its folder listing, resizer and feature extractor of the mode
  (``cleanfid.fid.get_folder_features``), its ``frechet_distance`` on ``np.mean`` / ``np.cov`` of the features,
  its ``kernel_distance`` for KID. ``fid_folders(a, b)`` equals ``cleanfid.fid.compute_fid(a, b, mode=...)`` and
  ``kid_folders(a, b)`` equals ``cleanfid.fid.compute_kid(a, b, mode=...)`` (with numpy's global seed set the
  same way; clean-fid draws KID's subsets from it) on the same Inception file (tested).
- sFID (Nash et al. 2021, as in the ADM evaluator): the same distance on the spatial features, the first 7
  channels of ``mixed_6/conv`` (17x17) flattened in NHWC order to ``[N, 2023]`` (``models.inception``), computed
  in the same pass as pool3 on the same clean-fid-resized images.
- In-memory images (samples of a model, reconstructions) are quantised like a saved PNG where they come from
  [-1, 1] (``to_uint8_range``) and resized per image with clean-fid's resizer, as clean-fid's
  ``get_model_features`` does; their features equal those of the same images saved as PNG (tested).
- Reference statistics of an image folder (``reference_stats``): a seeded subsample, each image centre-cropped
  to a square and resized to the generation resolution (PIL bicubic; clean-fid's ``custom_image_tranform``
  hook), then clean-fid's pipeline; cached as ``.npz`` (``pool_mu/pool_sigma/spatial_mu/spatial_sigma``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np
import torch

from models.inception import POOL_DIM, CleanFIDInception
from utils.images import IMAGE_EXTENSIONS, load_rgb
from utils.logging import get_logger

logger = get_logger("fid")
FEATURES = ("pool", "spatial")
STATS_FORMAT = (
    "cleanfid-1"  # part of the reference-statistics cache key: caches of the old pipeline are not reused
)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) (clean-fid's implementation)."""
    from cleanfid.fid import frechet_distance as _fd

    return float(_fd(mu1, sigma1, mu2, sigma2))  # no casts: clean-fid subtracts the float32 means as they are


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) as clean-fid computes them (``np.mean``, ``np.cov(rowvar=False)``)."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need at least 2 images for FID statistics, got features of shape {feats.shape}")
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def _split(feats: np.ndarray, spatial: bool) -> dict[str, np.ndarray]:
    return {"pool": feats[:, :POOL_DIM], "spatial": feats[:, POOL_DIM:]} if spatial else {"pool": feats}


def folder_features(
    folder: str | os.PathLike,
    inception: CleanFIDInception,
    spatial: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
) -> dict[str, np.ndarray]:
    """clean-fid's features of every image under ``folder`` (``cleanfid.fid.get_folder_features``)."""
    from cleanfid.fid import get_folder_features

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    feats = get_folder_features(
        str(folder),
        inception.feature_fn(spatial),
        num_workers=num_workers,
        batch_size=batch_size,
        device=inception.device,
        mode=inception.mode,
        description=f"FID {Path(folder).name} : ",
        verbose=False,
    )
    return _split(feats, spatial)


def fid_folders(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    inception: CleanFIDInception,
    sfid: bool = False,
    batch_size: int = 32,
    num_workers: int = 0,
) -> dict[str, float]:
    """FID (and sFID) between two image folders; ``fid`` equals ``cleanfid.fid.compute_fid(dir_a, dir_b)``."""
    a = folder_features(dir_a, inception, sfid, batch_size, num_workers)
    b = folder_features(dir_b, inception, sfid, batch_size, num_workers)
    out = {"fid": frechet_distance(*feature_stats(a["pool"]), *feature_stats(b["pool"]))}
    if sfid:
        out["sfid"] = frechet_distance(*feature_stats(a["spatial"]), *feature_stats(b["spatial"]))
    return out


def kid_folders(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    inception: CleanFIDInception,
    seed: int | None = 0,
    batch_size: int = 32,
    num_workers: int = 0,
) -> float:
    """KID between two folders with clean-fid's ``kernel_distance`` (100 subsets of <= 1000).

    clean-fid draws the subsets from numpy's global RNG; ``seed`` seeds it for this call (and restores it), so
    the value equals ``np.random.seed(seed); cleanfid.fid.compute_kid(dir_a, dir_b)``; ``None`` leaves it as is.
    """
    from cleanfid.fid import kernel_distance

    a = folder_features(dir_a, inception, False, batch_size, num_workers)["pool"]
    b = folder_features(dir_b, inception, False, batch_size, num_workers)["pool"]
    state = np.random.get_state()
    try:
        if seed is not None:
            np.random.seed(seed)
        return float(kernel_distance(a, b))
    finally:
        if seed is not None:
            np.random.set_state(state)


@torch.no_grad()
def inception_stats(
    batches: Iterable[torch.Tensor], inception: CleanFIDInception
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"pool": (mu, sigma), "spatial": (mu, sigma)} of ``[B,3,H,W]`` batches in [0, 255] (in-memory images)."""
    feats: dict[str, list[np.ndarray]] = {k: [] for k in FEATURES}
    for images in batches:
        out = inception(images, outputs=FEATURES)
        for k in FEATURES:
            feats[k].append(out[k].detach().cpu().numpy())
    return {k: feature_stats(np.concatenate(v)) for k, v in feats.items()}


def fid_from_stats(a: dict, b: dict) -> dict[str, float]:
    return {
        "fid": frechet_distance(*a["pool"], *b["pool"]),
        "sfid": frechet_distance(*a["spatial"], *b["spatial"]),
    }


def to_uint8_range(images: torch.Tensor) -> torch.Tensor:
    """[-1,1] float images -> [0,255] float, quantised like a saved PNG."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def list_reference_images(ref_dir: str | os.PathLike) -> list[Path]:
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise FileNotFoundError(
            f"--ref_dir {ref_dir} is not a directory (expected e.g. ILSVRC/Data/CLS-LOC/val with <synset>/*.JPEG)"
        )
    files = sorted(p for p in ref_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images found under {ref_dir}")
    return files


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop, then PIL bicubic resize to ``size`` (uint8 HWC in, uint8 HWC out)."""
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(np.ascontiguousarray(img[top : top + s, left : left + s]))
    return np.asarray(crop.resize((size, size), Image.BICUBIC), dtype=np.uint8)


class _CenterCropResize:
    """Picklable ``custom_image_tranform`` for clean-fid's DataLoader workers."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: np.ndarray) -> np.ndarray:
        return center_crop_resize(img, self.size)


def reference_stats(
    ref_dir: str | os.PathLike,
    inception: CleanFIDInception,
    resolution: int,
    num_images: int | None = 10_000,
    cache_dir: str | os.PathLike = ".cache/fid_stats",
    batch_size: int = 50,
    inception_id: str = "",
    seed: int = 0,
    num_workers: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Statistics of ``num_images`` (seeded subsample; None = all) reference images, cached as .npz.

    Unreadable images are skipped (logged); the rest go through clean-fid's ``get_files_features`` with the
    centre-crop-and-resize as its ``custom_image_tranform``.
    """
    from cleanfid.fid import get_files_features

    files = list_reference_images(ref_dir)
    if num_images is not None and num_images < len(files):
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), size=num_images, replace=False))]
    key = hashlib.sha1(
        json.dumps(
            [
                str(Path(ref_dir).resolve()),
                len(files),
                resolution,
                inception_id,
                inception.mode,
                seed,
                STATS_FORMAT,
            ]
        ).encode()
    ).hexdigest()[:12]
    cache = (
        Path(cache_dir) / f"ref_{Path(ref_dir).name}_{len(files)}_{resolution}px_{inception.mode}_{key}.npz"
    )
    if cache.is_file():
        data = np.load(cache)
        logger.info(f"reference statistics from cache {cache}")
        return {k: (data[f"{k}_mu"], data[f"{k}_sigma"]) for k in FEATURES}

    readable = [p for p in files if load_rgb(p) is not None]
    if len(readable) < len(files):
        skipped = sorted(set(map(str, files)) - set(map(str, readable)))
        logger.warning(f"skipped {len(skipped)} unreadable reference images, e.g. {skipped[:3]}")
    feats = get_files_features(
        [str(p) for p in readable],
        inception.feature_fn(spatial=True),
        num_workers=num_workers,
        batch_size=batch_size,
        device=inception.device,
        mode=inception.mode,
        custom_image_tranform=_CenterCropResize(resolution),
        description="reference images",
        verbose=True,
    )
    stats = {k: feature_stats(v) for k, v in _split(feats, True).items()}
    from utils.checkpoint import atomic_write

    with atomic_write(cache) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                **{f"{k}_{s}": v for k, (mu, sig) in stats.items() for s, v in (("mu", mu), ("sigma", sig))},
            )
    logger.info(f"reference statistics cached at {cache}")
    return stats


def main(argv: list[str] | None = None) -> dict[str, float]:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir_a", help="first image folder (searched recursively, as clean-fid does)")
    p.add_argument("dir_b", help="second image folder")
    p.add_argument(
        "--mode",
        choices=("clean", "legacy_pytorch"),
        default=None,
        help="clean-fid mode; default: the one the weight file serves (TorchScript file: clean, "
        "pytorch-fid .pth: legacy_pytorch)",
    )
    p.add_argument(
        "--inception_path",
        default=None,
        help="inception-2015-12-05.pt (TorchScript, mode clean) or pt_inception-2015-12-05-6726825d.pth "
        "(mode legacy_pytorch); default: clean-fid's /tmp copy, then $TORCH_HOME/hub/checkpoints",
    )
    p.add_argument("--kid", action="store_true", help="also KID (clean-fid's kernel_distance, seed --seed)")
    p.add_argument("--sfid", action="store_true", help="also sFID (ADM spatial features)")
    p.add_argument("--seed", type=int, default=0, help="numpy seed of KID's random subsets")
    p.add_argument("--batch_size", type=int, default=32, help="images per Inception batch")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers for reading/resizing")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--output_json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    inception = CleanFIDInception(args.inception_path, mode=args.mode, device=args.device)
    result: dict = {"dir_a": args.dir_a, "dir_b": args.dir_b, "mode": inception.mode}
    result.update(
        fid_folders(args.dir_a, args.dir_b, inception, args.sfid, args.batch_size, args.num_workers)
    )
    if args.kid:
        result["kid"] = kid_folders(
            args.dir_a, args.dir_b, inception, args.seed, args.batch_size, args.num_workers
        )
    print(json.dumps(result, indent=2))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
