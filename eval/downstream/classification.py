"""Classification benchmark of generated anomalies: a ResNet-34 trained on generated images labelled by
defect type, tested on the real held-out test images of those types (AnomalyDiffusion protocol).

    python eval/downstream/classification.py --class_name hazelnut --mvtec_root datasets/mvtec_ad \
        --generated_root generate_data --output_dir outputs/downstream/hazelnut/classification \
        --max_train_steps 5000

Writes to --output_dir: model.safetensors + model_config.json, metrics.json and metrics.csv (top-1 accuracy
over the class and per defect type, confusion matrix), confusion.png, checkpoint-<step>/, losses.jsonl and
TensorBoard logs. Protocol: docs/anomaly_downstream.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from datasets.mvtec import SPLIT_RULES, defect_images
from eval.downstream.data import (
    DEFAULT_SPLIT_RULE,
    DownstreamDataError,
    GeneratedClassificationDataset,
    find_generated_pairs,
    held_out_images,
    load_image_uint8,
    resolve_defects,
)
from eval.downstream.report import METRICS_CSV, METRICS_JSON, confusion_figure, write_csv, write_json
from eval.downstream.resnet import build_resnet34
from eval.downstream.trainer import (
    add_optimisation_args,
    check_optimisation_args,
    log_evaluation,
    train_model,
)
from eval.manifest import check_sets, evaluation_manifest, write_manifest
from train.core import add_core_args, core_config_from_args, make_accelerator
from utils.cli import run_cli
from utils.logging import get_logger

logger = get_logger("downstream.classification")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_core_args(
        p,
        checkpointing_steps=1000,
        log_every=10,
        max_steps_help="Optimizer steps. The references: 30 epochs over 5 x the generated images at batch 8 "
        "(30 * ceil(5 * N / 8) for N images).",
    )
    g = p.add_argument_group("data")
    g.add_argument("--class_name", required=True, help="MVTec AD class, e.g. hazelnut.")
    g.add_argument("--mvtec_root", default="datasets/mvtec_ad", help="MVTec AD root (holds <class>/).")
    g.add_argument(
        "--generated_root",
        default="generate_data",
        help="Generation output root: <root>/<class>/<defect>/image/ (eval/generate.py --output_root).",
    )
    g.add_argument(
        "--defects",
        nargs="*",
        default=None,
        help="Defect types (classes of the classifier; default all of the MVTec class's, at least 2).",
    )
    g.add_argument(
        "--max_images_per_defect",
        type=int,
        default=500,
        help="Generated images per defect type (the first N by name; references: 500).",
    )
    g.add_argument(
        "--split_rule",
        choices=SPLIT_RULES,
        default=DEFAULT_SPLIT_RULE,
        help="Few-shot split of the generator's training; only the held-out images are tested.",
    )
    g.add_argument("--resolution", type=int, default=256, help="Image side for training and test.")
    g = p.add_argument_group("model")
    g.add_argument(
        "--resnet_weights",
        default="auto",
        help="ImageNet ResNet-34 weights: auto (torchvision's cache if present, else random init with a "
        "warning), none (random init), or a .pth path.",
    )
    g.add_argument(
        "--imagenet_normalize",
        action="store_true",
        help="Normalise inputs with the ImageNet mean/std (the references feed [0, 1] images unnormalised).",
    )
    add_optimisation_args(p, batch_size=8)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_batch_size", type=int, default=32, help="Test-time batch size.")
    g.add_argument("--skip_eval", action="store_true", help="Train only.")
    g.add_argument(
        "--allow_mixed_weights",
        action="store_true",
        help="Use generated sets whose manifests show images of several weights, weights trained for another "
        "class/defect, or different base models (refused by default; eval/manifest.py).",
    )
    g.add_argument("--note", default="", help="Free text stored in metrics.json and shown in the tables.")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_optimisation_args(args)
    except ValueError as err:
        parser.error(str(err))
    if args.resolution < 32:
        parser.error(f"--resolution must be >= 32, got {args.resolution}")
    if args.eval_batch_size < 1:
        parser.error(f"--eval_batch_size must be >= 1, got {args.eval_batch_size}")
    if args.max_images_per_defect < 1:
        parser.error(f"--max_images_per_defect must be >= 1, got {args.max_images_per_defect}")
    return args


class Classifier(torch.nn.Module):
    """ResNet-34 on [0, 1] images, optionally ImageNet-normalised first."""

    def __init__(self, net: torch.nn.Module, normalize: bool):
        super().__init__()
        self.net = net
        self.normalize = normalize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.mean) / self.std
        return self.net(x)


def classification_loss(model, batch):
    loss = F.cross_entropy(model(batch["image"]).float(), batch["label"])
    return loss, {}


def test_set(args: argparse.Namespace, defects: list[str]) -> list[tuple[Path, int]]:
    items = []
    for k, d in enumerate(defects):
        held = held_out_images(defect_images(args.mvtec_root, args.class_name, d), args.split_rule)
        if not held:
            logger.warning("defect %s: every image is in the few-shot training split; none tested", d)
        items += [(p, k) for p in held]
    if not items:
        raise DownstreamDataError(f"class {args.class_name!r}: no held-out test image for {defects}")
    return items


def load_test_images(items: list[tuple[Path, int]], resolution: int) -> torch.Tensor:
    return torch.stack([load_image_uint8(p, resolution) for p, _ in items])


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int, device) -> np.ndarray:
    """uint8 ``[N,3,R,R]`` -> predicted type indices ``[N]``."""
    model.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        preds.append(model(images[i : i + batch_size].to(device).float() / 255.0).argmax(1).cpu())
    return torch.cat(preds).numpy()


def evaluate(model, args, defects, items, images, device, extra: dict[str, Any]) -> dict[str, Any]:
    """Top-1 accuracy (class and per type), confusion matrix, and the output files."""
    labels = np.array([k for _, k in items])
    preds = predict(model, images, args.eval_batch_size, device)
    k = len(defects)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    per_defect = {
        d: float((preds[labels == i] == i).mean()) for i, d in enumerate(defects) if (labels == i).any()
    }
    accuracy = float((preds == labels).mean())
    out = Path(args.output_dir)
    root = Path(args.mvtec_root)
    record = {
        "job": "classification",
        "class": args.class_name,
        "method": "generated",
        "note": args.note,
        "metrics": {"accuracy": accuracy, "per_defect": per_defect},
        "labels": defects,
        "confusion": confusion.tolist(),
        "n_test_images": {d: int((labels == i).sum()) for i, d in enumerate(defects)},
        "test_images": [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p, _ in items],
        "protocol": {
            "split_rule": args.split_rule,
            "resolution": args.resolution,
            "max_train_steps": args.max_train_steps,
            "train_batch_size": args.train_batch_size,
            "imagenet_normalize": args.imagenet_normalize,
            "seed": args.seed,
        },
        **extra,
    }
    write_json(out / METRICS_JSON, record)
    write_csv(
        out / METRICS_CSV,
        ["scope", "accuracy", "n_test_images"],
        [["all", f"{accuracy:.6f}", len(items)]]
        + [[d, f"{a:.6f}", record["n_test_images"][d]] for d, a in per_defect.items()],
    )
    title = f"{args.class_name}: ResNet-34 trained on generated anomalies, top-1 {accuracy:.3f}"
    if extra.get("imagenet_weights") is None:
        title += "\nrandom-init backbone (no ImageNet weights)"
    confusion_figure(
        out / "confusion.png", confusion, defects, title + (f"\n{args.note}" if args.note else "")
    )
    logger.info("%s: top-1 accuracy %.4f %s -> %s", args.class_name, accuracy, per_defect, out / METRICS_JSON)
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    defects = resolve_defects(args.mvtec_root, args.class_name, args.defects)
    if len(defects) < 2:
        raise DownstreamDataError(
            f"classification needs at least 2 defect types, got {defects} (class {args.class_name!r})"
        )
    items = test_set(args, defects)
    images = load_test_images(items, args.resolution)  # decoded now: a bad file fails before training
    pairs = find_generated_pairs(
        args.generated_root, args.class_name, defects, args.max_images_per_defect, need_masks=False
    )
    sets = {d: Path(args.generated_root) / args.class_name / d for d in defects}
    set_manifests = check_sets(sets, args.allow_mixed_weights)
    dataset = GeneratedClassificationDataset(pairs, args.resolution)
    train_counts = {d: len(p.images) for d, p in pairs.items()}
    logger.info("training images: %s; test images: %d", train_counts, len(items))

    cfg = core_config_from_args(args, "downstream-classification")
    accelerator = make_accelerator(cfg)  # seeds before the fresh fc (and a random backbone) are built
    net, imagenet_file = build_resnet34(len(defects), args.resnet_weights)
    model = Classifier(net, args.imagenet_normalize)
    model_config = {
        "model": "resnet34",
        "labels": defects,
        "imagenet_normalize": args.imagenet_normalize,
        "resolution": args.resolution,
        "class_name": args.class_name,
        "imagenet_weights": imagenet_file,
    }
    model = train_model(accelerator, args, cfg, model, dataset, classification_loss, model_config)
    try:
        if args.skip_eval or not accelerator.is_main_process:
            return {}
        extra = {"train_images": train_counts, "imagenet_weights": imagenet_file}
        if imagenet_file is None:
            extra["warning"] = (
                "ResNet-34 trained from random initialisation (no ImageNet weights): not comparable"
            )
        record = evaluate(model, args, defects, items, images, accelerator.device, extra)
        out = Path(args.output_dir)
        manifest = evaluation_manifest(
            job="classification", flags=vars(args), inputs=set_manifests,
            outputs=[out / METRICS_JSON, out / METRICS_CSV, out / "model.safetensors"],
            allowed_mixed=args.allow_mixed_weights,
        )  # fmt: skip
        write_manifest(out, manifest)
        per = record["metrics"]["per_defect"]
        rows = [["all", record["metrics"]["accuracy"]], *([d, a] for d, a in per.items())]
        scalars = {"accuracy": record["metrics"]["accuracy"]}
        log_evaluation(
            accelerator, "eval/classification", ["scope", "accuracy"], rows, cfg.max_steps, scalars
        )
        return record
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)  # DownstreamDataError / missing files or weights: exit code 2 and a message, no traceback
