"""Inception Score of a folder of images, computed by torch-fidelity (the tool the DualAnoDiff evaluation calls).

    python eval/compute_is.py --image_dir generate_data/hazelnut/full
    python eval/compute_is.py --image_dir generate_data/hazelnut/hole \
        --inception_path ~/.cache/torch/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth

A stage-2 folder (``<defect>/`` holding ``image/``) is scored on its ``image/`` images.

With the torch-fidelity / pytorch-fid state dict (``weights-inception-2015-12-05-6726825d.pth`` or
``pt_inception-2015-12-05-6726825d.pth``, the same weights) the score is
``torch_fidelity.calculate_metrics(input1=<the images>, isc=True, feature_extractor_weights_path=<file>)``: its
image reading, its Inception, its protocol (logits without the FC bias, rows shuffled with seed 2020, 10
splits). With only StyleGAN2-ADA's TorchScript ``inception-2015-12-05.pt`` the class probabilities come from
that file's own ``forward(img, no_output_bias=True)`` (same TF weights, its own resize) and torch-fidelity's
``isc_features_to_metric`` computes the score. Weights are never downloaded (``models/inception.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import tempfile

import torch

from eval.ic_lpips import list_generated_images
from eval.manifest import check_sets, evaluation_manifest, result_manifest_name, set_folder_of, write_manifest
from models.inception import (
    TORCH_FIDELITY_FILENAME,
    resolve_inception_path,
    weights_format,
    write_random_fid_state_dict,
)
from utils.cli import run_cli
from utils.images import load_rgb
from utils.logging import get_logger, progress

logger = get_logger("compute_is")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--image_dir", required=True, help="folder of generated images (or a <defect>/ folder with image/)"
    )
    p.add_argument(
        "--inception_path",
        default=None,
        help="torch-fidelity / pytorch-fid weights (weights-/pt_inception-2015-12-05-6726825d.pth) or the "
        "TorchScript inception-2015-12-05.pt; default: $TORCH_HOME/hub/checkpoints/{weights-,pt_}inception-"
        "2015-12-05-6726825d.pth, then clean-fid's /tmp/inception-2015-12-05.pt",
    )
    p.add_argument("--splits", type=int, default=10, help="number of chunks for mean/std (standard: 10)")
    p.add_argument("--batch_size", type=int, default=50, help="images per Inception forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--output_json",
        default=None,
        help="also write the result here, with <name>.manifest.json next to it (flags, commit, the set's manifest)",
    )
    p.add_argument(
        "--allow_mixed_weights",
        action="store_true",
        help="score a set whose manifest shows images of several weights (refused by default)",
    )
    p.add_argument(
        "--random_weights",
        action="store_true",
        help="SMOKE TEST ONLY: random-weight Inception stand-in (the score is meaningless); used by the demo",
    )
    args = p.parse_args(argv)
    if args.splits < 1 or args.batch_size < 1:
        p.error("--splits and --batch_size must be >= 1")
    return args


def check_images(paths: list[Path], image_dir: str) -> None:
    """Fail before loading a network: unreadable files, or sizes torch-fidelity cannot batch together."""
    sizes: dict[tuple[int, int], int] = {}
    bad = []
    for path in paths:
        img = load_rgb(path)
        if img is None:
            bad.append(str(path))
        else:
            sizes[img.size] = sizes.get(img.size, 0) + 1
    if bad:
        raise ValueError(f"{len(bad)} unreadable image(s) in {image_dir}, e.g. {bad[:3]}")
    if len(sizes) > 1:
        raise ValueError(
            f"images in {image_dir} have {len(sizes)} different sizes ({dict(list(sizes.items())[:4])}); "
            "torch-fidelity batches images of one size: resize them to one size first"
        )


def is_torch_fidelity(
    paths: list[Path], weights: Path, splits: int, batch_size: int, device: str
) -> dict[str, float]:
    """torch-fidelity's ISC of the images (its ImagesPathDataset, Inception and protocol)."""
    import torch_fidelity
    from torch_fidelity.datasets import ImagesPathDataset

    return torch_fidelity.calculate_metrics(
        input1=ImagesPathDataset([str(p) for p in paths]),
        isc=True,
        isc_splits=splits,
        feature_extractor_weights_path=str(weights),
        batch_size=batch_size,
        cuda=str(device).startswith("cuda"),
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes
        verbose=False,
    )


@torch.no_grad()
def is_torchscript(
    paths: list[Path], weights: Path, splits: int, batch_size: int, device: str
) -> dict[str, float]:
    """StyleGAN2-ADA TorchScript class probabilities (its own resize, no output bias) + torch-fidelity's
    ``isc_features_to_metric`` (shuffle with seed 2020, ``splits`` chunks)."""
    from torch_fidelity.datasets import ImagesPathDataset
    from torch_fidelity.metric_isc import isc_features_to_metric

    net = torch.jit.load(str(weights), map_location=device).eval()
    data = ImagesPathDataset([str(p) for p in paths])  # torch-fidelity's reading: PIL RGB -> uint8 tensor
    probs = []
    for s in progress(range(0, len(data), batch_size), desc="inception", unit="batch"):
        x = torch.stack([data[i] for i in range(s, min(s + batch_size, len(data)))]).to(device)
        probs.append(net(x.float(), no_output_bias=True).double().cpu())
    # softmax(log p) = p: the logits torch-fidelity expects, up to a per-row constant
    logits = torch.cat(probs).clamp_min(torch.finfo(torch.float64).tiny).log()
    return isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    paths = list_generated_images(args.image_dir)
    if len(paths) < args.splits:
        raise SystemExit(
            f"--splits {args.splits} needs at least that many images; {args.image_dir} has {len(paths)}"
        )
    check_images(paths, args.image_dir)
    set_manifests = check_sets({"set": set_folder_of(args.image_dir)}, args.allow_mixed_weights)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights:
            logger.warning(
                "--random_weights: random Inception stand-in, the score below is NOT an Inception Score"
            )
            weights = write_random_fid_state_dict(Path(tmp) / TORCH_FIDELITY_FILENAME)
        else:
            weights = resolve_inception_path(args.inception_path, prefer="state_dict")
        if weights_format(weights) == "state_dict":
            backend = "torch-fidelity"
            metrics = is_torch_fidelity(paths, weights, args.splits, args.batch_size, args.device)
        else:
            backend = "torchscript+torch-fidelity-protocol"
            logger.info(
                "%s is StyleGAN2-ADA's TorchScript file: its own network and resize give the probabilities, "
                "torch-fidelity's protocol the score (with %s torch-fidelity runs end to end)",
                weights,
                TORCH_FIDELITY_FILENAME,
            )
            metrics = is_torchscript(paths, weights, args.splits, args.batch_size, args.device)
    result = {
        "image_dir": str(args.image_dir),
        "num_images": len(paths),
        "splits": args.splits,
        "is_mean": float(metrics["inception_score_mean"]),
        "is_std": float(metrics["inception_score_std"]),
        "backend": backend,
        "weights": "random" if args.random_weights else str(weights),
        "random_weights": bool(args.random_weights),
    }
    print(json.dumps(result, indent=2))
    if args.output_json:
        out = Path(args.output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        manifest = evaluation_manifest(
            job="inception_score", flags=vars(args), inputs=set_manifests, outputs=[out],
            allowed_mixed=args.allow_mixed_weights,
        )  # fmt: skip
        write_manifest(out.parent, manifest, result_manifest_name(out))
    return result


if __name__ == "__main__":
    run_cli(main)
