"""Inception Score of a folder of images.

    python eval/compute_is.py --image_dir generate_data/hazelnut/full
    python eval/compute_is.py --image_dir generate_data/hazelnut/hole --inception_path /path/inception-2015-12-05.pt

A stage-2 folder (``<defect>/`` holding ``image/``) is scored on its ``image/`` images. Weights: see
``eval/inception.py`` (StyleGAN2-ADA / clean-fid TorchScript file or pytorch-fid weights; never downloaded).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eval.ic_lpips import list_generated_images  # noqa: E402
from eval.inception import build_random_inception, load_inception, resize_like_tf  # noqa: E402
from eval.metrics_is import inception_score  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.images import load_rgb  # noqa: E402
from utils.logging import get_logger, progress  # noqa: E402

logger = get_logger("compute_is")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--image_dir", required=True, help="folder of generated images (or a <defect>/ folder with image/)"
    )
    p.add_argument(
        "--inception_path",
        default=None,
        help="inception-2015-12-05.pt (TorchScript) or a pytorch-fid .pth; default: clean-fid's "
        "/tmp/inception-2015-12-05.pt, then $TORCH_HOME/hub/checkpoints/{pt_,weights-}inception-2015-12-05-6726825d.pth",
    )
    p.add_argument("--splits", type=int, default=10, help="number of chunks for mean/std (standard: 10)")
    p.add_argument("--batch_size", type=int, default=50, help="images per Inception forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--output_json", default=None, help="also write the result here")
    p.add_argument(
        "--random_weights",
        action="store_true",
        help="SMOKE TEST ONLY: random-weight Inception stand-in (the score is meaningless); used by the demo",
    )
    args = p.parse_args(argv)
    if args.splits < 1 or args.batch_size < 1:
        p.error("--splits and --batch_size must be >= 1")
    return args


def load_uint8_batch(paths: list[Path]) -> torch.Tensor:
    """[B,3,299,299] float in [0,255]; each image resized alone with the Inception's own resize rule."""
    out = []
    for path in paths:
        img = load_rgb(path)
        if img is None:
            raise ValueError(f"cannot read image {path} (corrupt or not an image)")
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)[None]
        out.append(resize_like_tf(x))
    return torch.cat(out)


@torch.no_grad()
def compute_probs(paths: list[Path], model, batch_size: int, device: str) -> np.ndarray:
    probs = []
    for s in progress(range(0, len(paths), batch_size), desc="inception", unit="batch"):
        x = load_uint8_batch(paths[s : s + batch_size]).to(device)
        probs.append(model(x, outputs=("probs",))["probs"].double().cpu().numpy())
    return np.concatenate(probs)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    paths = list_generated_images(args.image_dir)
    if len(paths) < args.splits:
        raise SystemExit(
            f"--splits {args.splits} needs at least that many images; {args.image_dir} has {len(paths)}"
        )
    bad = [str(p) for p in paths if load_rgb(p) is None]  # fail before loading the network
    if bad:
        raise ValueError(f"{len(bad)} unreadable image(s) in {args.image_dir}, e.g. {bad[:3]}")
    if args.random_weights:
        logger.warning(
            "--random_weights: random Inception stand-in, the score below is NOT an Inception Score"
        )
        model = build_random_inception(device=args.device)
    else:
        model = load_inception(args.inception_path, device=args.device)
    mean, std = inception_score(compute_probs(paths, model, args.batch_size, args.device), splits=args.splits)
    result = {
        "image_dir": str(args.image_dir),
        "num_images": len(paths),
        "splits": args.splits,
        "is_mean": mean,
        "is_std": std,
        "random_weights": bool(args.random_weights),
    }
    print(json.dumps(result, indent=2))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    run_cli(main)
