"""IC-LPIPS of generated images (see eval/ic_lpips.py for the protocol and the feature caching).

One folder (the seed's form; class and defect are read from the path ``<gen_root>/<class>/<defect>``):

    python eval/compute_ic_lpips.py --image_dir generate_data/hazelnut/full --mvtec_root datasets/mvtec_ad

Every generated folder of a class (``full`` and each defect), with a JSON and a CSV and the class average
over defect types:

    python eval/compute_ic_lpips.py --gen_root generate_data --class_name hazelnut --mvtec_root datasets/mvtec_ad

Cluster centres (``--centres``) of a defect type:

* ``official`` (default): the first ``N//3`` sorted test images of the defect type (N = its test images),
  as the official DualAnoDiff/AnomalyDiffusion script (``'%03d.png' % k for k in range(N // 3)``). This is
  not the training split: for hazelnut cut/print (N = 17) it gives 5 centres, the split 6;
* ``split``: the few-shot training images (``--split_rule`` of datasets/mvtec.py);
* any other value: a folder whose images are the centres.

For ``full`` (normal images, no reference protocol), ``official`` and ``split`` both use the first
``--num_full_centres`` (10) sorted ``train/good`` images: stage 1 trains on all of train/good (hundreds of
images), and one centre per training image would leave most clusters with fewer than 2 members.

Every input (generated folders, MVTec centres, VGG16 weights) is checked before VGG is loaded, and all
problems are reported in one message (exit code 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import json
import math

import torch

from datasets.mvtec import SPLIT_RULES, defect_images, few_shot_split, good_images
from eval.ic_lpips import (
    DEFAULT_CLUSTER_SIZE,
    IC_LPIPS_RESOLUTION,
    LPIPSFeatureSpace,
    ic_lpips,
    list_generated_images,
)
from eval.manifest import check_sets, evaluation_manifest, result_manifest_name, set_folder_of, write_manifest
from losses.lpips_vgg import build_lpips_vgg, resolve_vgg16_checkpoint
from utils.cli import UserError, raise_if_problems, run_cli
from utils.images import list_images
from utils.logging import get_logger

logger = get_logger("compute_ic_lpips")
FULL = "full"
CENTRE_RULES = ("official", "split")
DEFAULT_MVTEC_ROOT = "datasets/mvtec_ad"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--image_dir", help="one generated folder: <gen_root>/<class>/full or <gen_root>/<class>/<defect>"
    )
    src.add_argument("--gen_root", help="root of generate_data/: evaluate every folder of --class_name")
    p.add_argument(
        "--class_name",
        "--mvtec_name",
        dest="class_name",
        default=None,
        help="MVTec class (default with --image_dir: read from the path)",
    )
    p.add_argument(
        "--defect", default=None, help="defect type or 'full' (default with --image_dir: the folder name)"
    )
    p.add_argument(
        "--mvtec_root", default=DEFAULT_MVTEC_ROOT, help="MVTec AD root holding <class>/train, test"
    )
    p.add_argument(
        "--centres",
        default="official",
        help="cluster centres of a defect type: official = first N//3 sorted test images (the official "
        "script), split = the few-shot training images (--split_rule), or a folder of images",
    )
    p.add_argument(
        "--num_full_centres", type=int, default=10, help="centres for 'full': first K sorted train/good"
    )
    p.add_argument(
        "--split_rule",
        choices=SPLIT_RULES,
        default="official",
        help="--centres split: few-shot split rule (datasets/mvtec.py)",
    )
    p.add_argument(
        "--cluster_size", type=int, default=DEFAULT_CLUSTER_SIZE, help="max members per cluster (50)"
    )
    p.add_argument("--resolution", type=int, default=IC_LPIPS_RESOLUTION, help="images resized to this (256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the member draw")
    p.add_argument("--batch_size", type=int, default=8, help="images per VGG forward pass")
    p.add_argument(
        "--cache_budget_gb",
        type=float,
        default=4.0,
        help="RAM for kept member features (32 MB per image at 256 px); beyond it members are recomputed",
    )
    p.add_argument(
        "--vgg_ckpt_path", default=None, help="torchvision VGG16 checkpoint (default: torchvision cache)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--output_dir", default=None, help="where ic_lpips.json / ic_lpips.csv go (default: the class folder)"
    )
    p.add_argument("--output_json", default=None, help="--image_dir form: also write the result here")
    p.add_argument(
        "--allow_mixed_weights",
        action="store_true",
        help="score sets whose manifests show images of several weights, weights trained for another "
        "class/defect, or different base models (refused by default; eval/manifest.py)",
    )
    p.add_argument(
        "--random_vgg",
        action="store_true",
        help="SMOKE TEST ONLY: random VGG backbone (values meaningless); used by the demo",
    )
    args = p.parse_args(argv)
    if args.cluster_size < 2 or args.num_full_centres < 1 or args.batch_size < 1 or args.resolution < 16:
        p.error("need --cluster_size >= 2, --num_full_centres >= 1, --batch_size >= 1, --resolution >= 16")
    if args.gen_root and not args.class_name:
        p.error("--gen_root needs --class_name")
    if args.centres not in CENTRE_RULES and not Path(args.centres).is_dir():
        p.error(f"--centres {args.centres!r} is neither one of {CENTRE_RULES} nor an existing folder")
    return args


def infer_class_and_defect(image_dir: Path) -> tuple[str, str]:
    """``.../<class>/<defect>`` or ``.../<class>/<defect>/image`` -> (class, defect)."""
    parts = image_dir.resolve().parts
    if parts[-1] == "image":
        parts = parts[:-1]
    if len(parts) < 2:
        raise ValueError(f"cannot read <class>/<defect> from {image_dir}; pass --class_name and --defect")
    return parts[-2], parts[-1]


def official_centres(images: list[Path]) -> list[Path]:
    """The official script's centres: the first ``N//3`` of a defect type's N sorted test images."""
    images = sorted(images)
    return images[: len(images) // 3]


def centre_images(args: argparse.Namespace, class_name: str, defect: str) -> list[Path]:
    if args.centres not in CENTRE_RULES:
        return list_images(args.centres)
    if defect == FULL:
        return good_images(args.mvtec_root, class_name)[: args.num_full_centres]
    images = defect_images(args.mvtec_root, class_name, defect)
    if args.centres == "official":
        centres = official_centres(images)
        if not centres:
            raise ValueError(
                f"{class_name}/{defect} has {len(images)} test images: N//3 = 0 official centres; "
                "use --centres split or a folder"
            )
        return centres
    train, _ = few_shot_split(images, args.split_rule)
    return train


def folders_to_evaluate(args: argparse.Namespace) -> list[tuple[Path, str, str]]:
    """``[(generated folder, class, defect)]`` named by --image_dir or found under --gen_root/<class>."""
    if args.image_dir:
        image_dir = Path(args.image_dir)
        try:
            cls, defect = infer_class_and_defect(image_dir)
        except ValueError as err:
            if not (args.class_name and args.defect):
                raise UserError(str(err)) from None
            cls, defect = args.class_name, args.defect
        return [(image_dir, args.class_name or cls, args.defect or defect)]
    class_dir = Path(args.gen_root) / args.class_name
    folders = sorted(p for p in class_dir.iterdir() if p.is_dir()) if class_dir.is_dir() else []
    if not folders:
        raise UserError(
            f"no generated folders under {class_dir} (expected full/ and <defect>/ folders written by "
            f"eval/generate.py with --output_root {args.gen_root})"
        )
    return [(d, args.class_name, d.name) for d in folders]


def check_inputs(args: argparse.Namespace, folders: list[tuple[Path, str, str]]) -> None:
    """Every missing input at once: generated images, cluster centres, VGG16 weights."""
    problems = []
    for image_dir, class_name, defect in folders:
        try:
            list_generated_images(image_dir)
        except FileNotFoundError as err:
            problems.append(err)
        try:
            if not centre_images(args, class_name, defect):
                problems.append(f"no cluster centre images for {class_name}/{defect}")
        except FileNotFoundError as err:
            problems.append(err)
        except ValueError as err:
            problems.append(f"centres for {class_name}/{defect}: {err}")
    if not args.random_vgg:
        try:
            resolve_vgg16_checkpoint(args.vgg_ckpt_path)
        except FileNotFoundError as err:
            problems.append(err)
    raise_if_problems(problems)


def evaluate_folder(args, model, image_dir: Path, class_name: str, defect: str) -> dict:
    generated = list_generated_images(image_dir)
    centres = centre_images(args, class_name, defect)
    logger.info("%s/%s: %d generated images, %d centres", class_name, defect, len(generated), len(centres))
    space = LPIPSFeatureSpace(model, device=args.device, resolution=args.resolution)
    result = ic_lpips(
        generated,
        centres,
        space,
        cluster_size=args.cluster_size,
        seed=args.seed,
        batch_size=args.batch_size,
        cache_budget_gb=args.cache_budget_gb,
    )
    return {
        "class": class_name,
        "defect": defect,
        "image_dir": str(image_dir),
        "centres": args.centres,
        **result.as_dict(),
    }


def write_reports(rows: list[dict], class_name: str, out_dir: Path, random_vgg: bool) -> dict:
    defect_values = [r["ic_lpips"] for r in rows if r["defect"] != FULL and r["ic_lpips"] is not None]
    summary = {
        "class": class_name,
        "class_average_over_defects": sum(defect_values) / len(defect_values) if defect_values else None,
        "full": next((r["ic_lpips"] for r in rows if r["defect"] == FULL), None),
        "random_vgg": random_vgg,
        "per_folder": rows,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ic_lpips.json").write_text(json.dumps(summary, indent=2))
    with open(out_dir / "ic_lpips.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "defect", "ic_lpips", "num_images", "num_centres", "clusters_used"])
        for r in rows:
            w.writerow(
                [
                    class_name,
                    r["defect"],
                    r["ic_lpips"],
                    r["num_images"],
                    r["num_centres"],
                    r["clusters_used"],
                ]
            )
        w.writerow([class_name, "average_over_defects", summary["class_average_over_defects"], "", "", ""])
    logger.info("wrote %s and %s", out_dir / "ic_lpips.json", out_dir / "ic_lpips.csv")
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folders = folders_to_evaluate(args)
    check_inputs(args, folders)
    set_manifests = check_sets(
        {f"{c}/{d}": set_folder_of(p) for p, c, d in folders}, args.allow_mixed_weights
    )
    if args.random_vgg:
        logger.warning("--random_vgg: random VGG backbone, the values below are NOT LPIPS distances")
    model = build_lpips_vgg(args.vgg_ckpt_path, device=args.device, pretrained_backbone=not args.random_vgg)
    if args.image_dir:
        image_dir, cls, defect = folders[0]
        row = evaluate_folder(args, model, image_dir, cls, defect)
        row["random_vgg"] = bool(args.random_vgg)
        print(json.dumps({k: v for k, v in row.items() if k not in ("cluster_means",)}, indent=2))
        if args.output_json:
            out = Path(args.output_json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(row, indent=2))
            manifest = evaluation_manifest(
                job="ic_lpips", flags=vars(args), inputs=set_manifests, outputs=[out],
                allowed_mixed=args.allow_mixed_weights,
            )  # fmt: skip
            write_manifest(out.parent, manifest, result_manifest_name(out))
        return row
    class_dir = Path(args.gen_root) / args.class_name
    rows = [evaluate_folder(args, model, d, cls, defect) for d, cls, defect in folders]
    out_dir = Path(args.output_dir or class_dir)
    summary = write_reports(rows, args.class_name, out_dir, bool(args.random_vgg))
    manifest = evaluation_manifest(
        job="ic_lpips", flags=vars(args), inputs=set_manifests,
        outputs=[out_dir / "ic_lpips.json", out_dir / "ic_lpips.csv"], allowed_mixed=args.allow_mixed_weights,
    )  # fmt: skip
    write_manifest(out_dir, manifest, result_manifest_name("ic_lpips.json"))
    table = {r["defect"]: r["ic_lpips"] for r in rows}
    print(
        json.dumps(
            {
                "class": args.class_name,
                "per_folder": table,
                "class_average_over_defects": summary["class_average_over_defects"],
            },
            indent=2,
        )
    )
    if summary["class_average_over_defects"] is not None and math.isnan(
        summary["class_average_over_defects"]
    ):
        logger.warning("class average is undefined")
    return summary


if __name__ == "__main__":
    run_cli(main)
