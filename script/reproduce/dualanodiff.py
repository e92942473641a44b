"""The DualAnoDiff plan: MVTec AD classes x defect types -> training -> generation -> IS / IC-LPIPS -> downstream
localization and classification -> the paper's three tables (generation quality, localization, classification).

Variants (``--variants``; each is a column group of the tables):

- ``dual``: DualAnoDiff's dual-interrelated model as its official ``dual-interrelated_diff/run_mvtec_split.py``
  trains it: stage 2 from SD-1.5 directly (no stage 1), batch 4, LR 2e-5 constant, 5000 steps, rank 32,
  text-encoder LoRA, seed 32, PyTorch's init of the interaction module; generation as its
  ``inference_mvtec_split.py``: 500 pairs per defect type, PNDM 100 steps, guidance 2.5 (``--preset official``).
- ``bcm``: the same with background compensation (``bcm-dual-interrelated_diff/``: batch 2, 5000 steps;
  generation ``--preset official_bcm``). Planned when foreground masks are available: ``--set
  fg_mask_dir=DIR`` (U-2-Net masks in the layout of docs/anomaly_training.md) or ``--set stand_in_masks=true``
  (``preprocessing/make_fg_masks.py`` stand-ins, a deviation); otherwise left out, and ``--dry_run`` says so.
- ``dino``: seed 000's variant (the seed's two commands): stage 1 DreamBooth LoRA on train/good with the DINOv2
  perceptual loss (batch 8, 5000 steps), stage 2 dual from its checkpoint-5000 to step 8000 (batch 4), both with
  ``--use_dinov2_loss --dinov2_loss_weight 0.1 --dinov2_model_name vitb14 --dinov2_loss_type l2
  --dinov2_feature_layers 3 6 9 11``; generation as ``dual``.

Evaluation per variant, class and defect type: IS (torch-fidelity, per defect type; the class value is the mean
over its types, as DualAnoDiff's ``compute-is.py``), IC-LPIPS (per class over its types), localization U-Net and
ResNet-34 classifier (docs/anomaly_downstream.md; classification needs >= 2 defect types).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from script.reproduce.units import Plan, Setting, Settings, Unit, count_files, json_problems
from utils.cli import UserError

VARIANTS = ("dual", "bcm", "dino")
TEXTURE_CLASSES = ("carpet", "grid", "leather", "tile", "wood")  # MVTec AD's textures: no object to cut out


def settings() -> Settings:
    S = Setting
    return Settings(
        base_model=S("models/stable-diffusion-v1-5", "models/stable-diffusion-v1-5", "SD-1.5 (diffusers folder)",
                     "not SD-1.5: a tiny random-weight stand-in; every image and value is meaningless"),
        resolution=S(512, 512, "training and generation resolution (px)"),
        rank=S(32, 32, "LoRA rank"),
        learning_rate=S(2e-5, 2e-5, "learning rate (constant)"),
        dual_steps=S(5000, 5000, "dual: stage-2 steps (DualAnoDiff run_mvtec_split.py)"),
        dual_batch=S(4, 4, "dual: batch size"),
        bcm_steps=S(5000, 5000, "bcm: steps (run_mvtec_split_background_control_scale.py)"),
        bcm_batch=S(2, 2, "bcm: batch size"),
        seed_stage1_steps=S(5000, 5000, "dino: stage-1 steps (seed 000)"),
        seed_stage2_steps=S(8000, 8000, "dino: stage-2 end step, continuing stage 1 (seed 000)"),
        seed_stage1_batch=S(8, 8, "dino: stage-1 batch size (seed 000)"),
        seed_stage2_batch=S(4, 4, "dino: stage-2 batch size (seed 000)"),
        dinov2_model=S("vitb14", "vitb14", "dino: DINOv2 variant of the perceptual loss"),
        dinov2_layers=S("3 6 9 11", "3 6 9 11", "dino: DINOv2 blocks of the loss"),
        dinov2_loss_impl=S("reference", "reference", "dino: the term's implementation (reference = the seed "
                           "trainer's formula; fast = this repository's default, docs/anomaly_training.md)"),
        dinov2_resolution=S(None, None, "dino: DINO input size of the fast/crop term (None: the impl's)", kind=int),
        dinov2_weights=S(None, None, "dino: DINOv2 weights file (None: the torch.hub cache)"),
        num_images=S(500, 500, "generated pairs per defect type (inference_mvtec_split.py)"),
        sampling_steps=S(None, None, "sampler steps (None: the preset's, PNDM 100 / BCM 50)", kind=int),
        gen_batch=S(4, 4, "generation batch size (a sample depends on it: keep it for a whole run)"),
        gen_dtype=S("fp32", "fp32", "generation precision (the reference pipeline runs fp32)"),
        random_metric_networks=S(False, False, "random-weight VGG16 / Inception / ResNet-34 (smoke tests only)",
                                 "random VGG16/Inception/ResNet-34: IS, IC-LPIPS and accuracy are meaningless"),
        vgg_ckpt_path=S(None, None, "VGG16 weights for IC-LPIPS (None: torchvision's cache)"),
        inception_path=S(None, None, "Inception weights for IS (None: the caches compute_is.py names)"),
        resnet_weights=S("auto", "auto", "ResNet-34 init: auto (ImageNet from the torchvision cache), none, a path"),
        ic_lpips_resolution=S(256, 256, "IC-LPIPS image size"),
        is_splits=S(10, 10, "IS splits"),
        downstream_resolution=S(256, 256, "localization / classification image size"),
        loc_steps=S(6400, 6400, "localization U-Net steps (200 epochs x 500 items / 16)"),
        loc_batch=S(16, 16, "localization batch size"),
        loc_base_width=S(64, 64, "localization U-Net width"),
        cls_steps=S(None, None, "classifier steps (None: 30 x ceil(5 N / batch), N = generated images, as the "
                    "references)", kind=int),
        cls_batch=S(8, 8, "classifier batch size"),
        anomaly_maps=S("npy", "npy", "saved test anomaly maps (npy, tiff, both, none)"),
        figure_images=S(8, 8, "test images in each localization job's predictions.png (0: no figure)"),
        perlin_baseline=S(False, False, "also train the localization U-Net on Perlin anomalies (extra rows)"),
        fg_mask_dir=S(None, None, "bcm: foreground masks <dir>/<class>/<defect|good>/<image> (U-2-Net)"),
        stand_in_masks=S(False, False, "bcm: make stand-in masks with preprocessing/make_fg_masks.py",
                         "bcm masks are make_fg_masks.py stand-ins (border colour distance; empty for textures), "
                         "not U-2-Net's"),
        train_seed=S(32, 32, "training seed (the reference run script's)"),
    ).not_protocol(*NON_PROTOCOL)  # fmt: skip


# not part of the protocol: where things are, how fast they run
NON_PROTOCOL = {
    "dinov2_weights",
    "vgg_ckpt_path",
    "inception_path",
    "gen_batch",
    "anomaly_maps",
    "fg_mask_dir",
}

TINY = dict(
    base_model=".cache/tiny/sd15",
    resolution=32,
    rank=2,
    dual_steps=1,
    dual_batch=1,
    bcm_steps=1,
    bcm_batch=1,
    seed_stage1_steps=1,
    seed_stage2_steps=2,
    seed_stage1_batch=1,
    seed_stage2_batch=1,
    dinov2_model="tiny14",
    dinov2_layers="1 3",
    dinov2_loss_impl="fast",
    dinov2_resolution=28,
    dinov2_weights=".cache/tiny/dinov2/dinov2_tiny14_pretrain.pth",
    num_images=2,
    sampling_steps=1,
    gen_batch=2,
    random_metric_networks=True,
    ic_lpips_resolution=32,
    is_splits=1,
    downstream_resolution=32,
    loc_steps=1,
    loc_batch=2,
    loc_base_width=4,
    cls_steps=1,
    cls_batch=2,
    anomaly_maps="none",
    stand_in_masks=True,
)
TINY_MVTEC = ".cache/tiny/mvtec"


def discover_mvtec(root: Path, classes: list[str] | None) -> dict[str, list[str]]:
    """``class -> sorted defect types`` of an MVTec AD tree (``<class>/train/good``, ``<class>/test/<defect>``)."""
    if not root.is_dir():
        raise UserError(
            f"--mvtec_root {root}: no such folder (MVTec AD unpacked as <root>/<class>/{{train/good,test/<defect>,"
            "ground_truth/<defect>}}; --profile tiny uses the synthetic tiny classes)"
        )
    found = {}
    for cls in sorted(p for p in root.iterdir() if p.is_dir()):
        if (cls / "train" / "good").is_dir() and (cls / "test").is_dir():
            found[cls.name] = sorted(
                d.name for d in (cls / "test").iterdir() if d.is_dir() and d.name != "good"
            )
    if not found:
        raise UserError(f"--mvtec_root {root}: no class folder with train/good and test/ in it")
    if classes:
        unknown = [c for c in classes if c not in found]
        if unknown:
            raise UserError(
                f"--classes {' '.join(unknown)}: not under {root}; classes there: {', '.join(found)}"
            )
        found = {c: found[c] for c in classes}
    empty = [c for c, d in found.items() if not d]
    if empty:
        raise UserError(f"{root}: no defect type under test/ of {', '.join(empty)}")
    return found


class DualAnoDiffPlan:
    """Builds the units; one method per kind of unit."""

    def __init__(self, s: Settings, mvtec_root: Path, out: Path, classes: dict[str, list[str]], variants):
        self.s, self.root, self.out, self.classes = s, mvtec_root, out, classes
        self.variants = list(variants)
        self.units: list[Unit] = []
        self.notes: list[str] = []
        self.counts: dict[str, float] | None = None

    # --- helpers ----------------------------------------------------------------------------------------

    def v(self, name: str) -> Any:
        return self.s.v(name)

    def path(self, value: Any) -> str:
        from script.reproduce.units import REPO_ROOT

        p = Path(str(value))
        return str(p if p.is_absolute() else (REPO_ROOT / p))

    def add(self, unit: Unit) -> Unit:
        self.units.append(unit)
        return unit

    def flops(self, key: str, factor: float) -> float | None:
        return None if self.counts is None else self.counts[key] * factor

    def common_train(self) -> list[str]:
        return [
            "--mixed_precision", "no", "--pretrained_model_name_or_path", self.path(self.v("base_model")),
            "--instance_data_dir", str(self.root), "--resolution", str(self.v("resolution")),
            "--rank", str(self.v("rank")), "--learning_rate", str(self.v("learning_rate")),
            "--train_text_encoder", "--seed", str(self.v("train_seed")), "--report_to", "none",
        ]  # fmt: skip

    def dino_flags(self) -> list[str]:
        flags = [
            "--use_dinov2_loss", "--dinov2_loss_weight", "0.1", "--dinov2_model_name", self.v("dinov2_model"),
            "--dinov2_loss_type", "l2", "--dinov2_feature_layers", *self.v("dinov2_layers").split(),
            "--dinov2_loss_impl", self.v("dinov2_loss_impl"),
        ]  # fmt: skip
        if self.v("dinov2_weights"):
            flags += ["--dinov2_weights", self.path(self.v("dinov2_weights"))]
        if self.v("dinov2_resolution"):
            flags += ["--dinov2_resolution", str(self.v("dinov2_resolution"))]
        return flags

    def vdir(self, variant: str) -> Path:
        return self.out / variant

    # --- units ------------------------------------------------------------------------------------------

    def masks_unit(self, cls: str) -> Unit:
        out = self.out / "fg_masks"
        subsets = [*self.classes[cls], "good"]
        method = "empty" if cls in TEXTURE_CLASSES else "border"

        def check() -> list[str]:
            problems = []
            for sub in subsets:
                src = self.root / cls / ("train" if sub == "good" else "test") / sub
                n = count_files(src)
                if count_files(out / cls / sub, "*") < n:
                    problems.append(f"{out / cls / sub}: fewer masks than images in {src}")
            return problems

        return self.add(Unit(
            name=f"dualanodiff/fg_masks/{cls}", entry="preprocessing/make_fg_masks.py",
            args=["--mvtec_root", str(self.root), "--mvtec_name", cls, "--subsets", *subsets,
                  "--output_dir", str(out), "--method", method],
            outputs=[out / cls], check=check, precision="fp32", estimate_note="CPU only",
            deviations=("stand_in_masks",),
        ))  # fmt: skip

    def stage1_unit(self, cls: str) -> Unit:
        out = self.vdir("dino") / "models" / cls / "stage1-full"
        steps, batch = self.v("seed_stage1_steps"), self.v("seed_stage1_batch")
        args = [
            *self.common_train(), "--mvtec_name", cls, "--output_dir", str(out), "--instance_prompt", "a vfx",
            "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--checkpointing_steps",
            str(min(500, steps)), "--resume_from_checkpoint", "latest", *self.dino_flags(),
        ]  # fmt: skip
        term = "dinov2_term_reference" if self.v("dinov2_loss_impl") == "reference" else "dinov2_term_default"
        flops = None
        if self.counts is not None:
            flops = steps * batch * (self.counts["train_unet_lora32"] + self.counts[term])
        return self.add(Unit(
            name=f"dualanodiff/dino/stage1/{cls}", entry="train/stage1-full/train.py", args=args,
            outputs=[out / "pytorch_lora_weights.safetensors", out / f"checkpoint-{steps}"],
            flops=flops, precision="fp32",
            estimate_note=f"{steps} steps x batch {batch} x (U-Net LoRA step + DINOv2 term, {term})",
            deviations=self.train_deviations("dino"),
        ))  # fmt: skip

    def train_deviations(self, variant: str) -> tuple[str, ...]:
        common = ("base_model", "resolution", "rank", "learning_rate", "train_seed")
        own = {
            "dual": ("dual_steps", "dual_batch"),
            "bcm": ("bcm_steps", "bcm_batch", "stand_in_masks"),
            "dino": ("seed_stage1_steps", "seed_stage2_steps", "seed_stage1_batch", "seed_stage2_batch",
                     "dinov2_model", "dinov2_layers", "dinov2_loss_impl", "dinov2_resolution"),
        }[variant]  # fmt: skip
        return common + own

    def stage2_unit(self, variant: str, cls: str, defect: str, masks: Path | None) -> Unit:
        out = self.vdir(variant) / "models" / cls / f"stage2-{defect}"
        args = [
            *self.common_train(),
            "--mvtec_name",
            cls,
            "--mvtec_anamaly_name",
            defect,
            "--output_dir",
            str(out),
        ]
        deps: tuple[str, ...] = ()
        c = self.counts
        if variant == "dino":
            s1_steps, steps = self.v("seed_stage1_steps"), self.v("seed_stage2_steps")
            batch = self.v("seed_stage2_batch")
            stage1 = self.vdir("dino") / "models" / cls / "stage1-full" / f"checkpoint-{s1_steps}"
            args += ["--resume_from_checkpoint", str(stage1), *self.dino_flags()]
            deps = (f"dualanodiff/dino/stage1/{cls}",)
            n_steps = steps - s1_steps
            term = (
                "dinov2_term_reference"
                if self.v("dinov2_loss_impl") == "reference"
                else "dinov2_term_default"
            )
            per_pair = None if c is None else c["train_dual_pair_lora32"] + c[term]
            note = f"{n_steps} steps x batch {batch} x (dual pair step + DINOv2 term on the blend branch, {term})"
        else:
            steps = self.v(f"{variant}_steps")
            batch = self.v(f"{variant}_batch")
            n_steps = steps
            args += ["--resume_from_checkpoint", "latest", "--interaction_init", "default"]
            per_pair = None if c is None else c["train_dual_pair_lora32"]
            note = f"{steps} steps x batch {batch} x dual pair step (forward + backward)"
            if variant == "bcm":
                args += ["--bcm", "--bcm_fg_mask_dir", str(masks)]
                if self.v("stand_in_masks"):
                    deps = (f"dualanodiff/fg_masks/{cls}",)
                per_pair = None if c is None else per_pair + c["train_unet_lora32"]
                note += " + the write pass (a U-Net LoRA step)"
        args += ["--train_batch_size", str(batch), "--max_train_steps", str(steps),
                 "--checkpointing_steps", str(min(500, n_steps))]  # fmt: skip
        return self.add(Unit(
            name=f"dualanodiff/{variant}/train/{cls}/{defect}", entry="train/stage2-dual/train.py", args=args,
            outputs=[out / "dual_unet.safetensors", out / "dual_config.json", out / f"checkpoint-{steps}"],
            deps=deps, flops=None if per_pair is None else n_steps * batch * per_pair, precision="fp32",
            estimate_note=note, deviations=self.train_deviations(variant),
        ))  # fmt: skip

    def generate_unit(self, variant: str, cls: str, defect: str) -> Unit:
        weights = self.vdir(variant) / "models" / cls / f"stage2-{defect}"
        gen_root = self.vdir(variant) / "generate_data"
        folder = gen_root / cls / defect
        n = self.v("num_images")
        preset = "official_bcm" if variant == "bcm" else "official"
        args = [
            "stage2", "--pretrained_model_name_or_path", self.path(self.v("base_model")), "--weights_dir", str(weights),
            "--mvtec_name", cls, "--mvtec_anomaly_name", defect, "--output_root", str(gen_root),
            "--num_images", str(n), "--preset", preset, "--seed", "0", "--batch_size", str(self.v("gen_batch")),
            "--resolution", str(self.v("resolution")), "--dtype", self.v("gen_dtype"),
        ]  # fmt: skip
        steps = self.v("sampling_steps")
        if steps:
            args += ["--num_inference_steps", str(steps)]
        preset_steps = 50 if variant == "bcm" else 100

        def check() -> list[str]:
            return [
                f"{folder / sub}: {count_files(folder / sub)} of {n} images"
                for sub in ("image", "fg", "mask")
                if count_files(folder / sub) < n
            ]

        flops = None
        if self.counts is not None:
            from script.reproduce.estimate import unet_evals

            evals = unet_evals("pndm", steps or preset_steps, True)
            per = evals * self.counts["dual_unet_pair"] + 2 * self.counts["vae_decode"]
            if variant == "bcm":
                per += evals * self.counts["unet"]  # the write pass: one more single-branch U-Net call
            flops = n * per
        return self.add(Unit(
            name=f"dualanodiff/{variant}/generate/{cls}/{defect}", entry="eval/generate.py", args=args,
            outputs=[folder / "image", folder / "fg", folder / "mask"], check=check,
            deps=(f"dualanodiff/{variant}/train/{cls}/{defect}",), flops=flops,
            precision="fp32" if self.v("gen_dtype") == "fp32" else self.v("gen_dtype"),
            estimate_note=f"{n} pairs x (PNDM {steps or preset_steps} steps with guidance: U-Net pair evaluations "
            "+ 2 VAE decodes)" + (" + the BCM write pass per evaluation" if variant == "bcm" else ""),
            deviations=("num_images", "sampling_steps"),
        ))  # fmt: skip

    def is_unit(self, variant: str, cls: str, defect: str) -> Unit:
        folder = self.vdir(variant) / "generate_data" / cls / defect
        out = folder / "is.json"
        args = ["--image_dir", str(folder), "--splits", str(self.v("is_splits")), "--output_json", str(out)]
        if self.v("inception_path"):
            args += ["--inception_path", self.path(self.v("inception_path"))]
        elif self.v("random_metric_networks"):
            args += ["--random_weights"]
        n = self.v("num_images")
        return self.add(Unit(
            name=f"dualanodiff/{variant}/is/{cls}/{defect}", entry="eval/compute_is.py", args=args, outputs=[out],
            check=lambda: json_problems(out, ("is_mean", "num_images")),
            deps=(f"dualanodiff/{variant}/generate/{cls}/{defect}",),
            flops=self.flops("inception_299", n), precision="fp32", estimate_note=f"{n} Inception forwards",
            deviations=("random_metric_networks", "is_splits"),
        ))  # fmt: skip

    def ic_lpips_unit(self, variant: str, cls: str) -> Unit:
        gen_root = self.vdir(variant) / "generate_data"
        out = gen_root / cls / "ic_lpips.json"
        args = ["--gen_root", str(gen_root), "--class_name", cls, "--mvtec_root", str(self.root),
                "--resolution", str(self.v("ic_lpips_resolution"))]  # fmt: skip
        if self.v("vgg_ckpt_path"):
            args += ["--vgg_ckpt_path", self.path(self.v("vgg_ckpt_path"))]
        elif self.v("random_metric_networks"):
            args += ["--random_vgg"]
        n = self.v("num_images") * len(self.classes[cls])
        return self.add(Unit(
            name=f"dualanodiff/{variant}/ic_lpips/{cls}", entry="eval/compute_ic_lpips.py", args=args, outputs=[out],
            check=lambda: json_problems(out, ("class_average_over_defects",)),
            deps=tuple(f"dualanodiff/{variant}/generate/{cls}/{d}" for d in self.classes[cls]),
            flops=self.flops("vgg16_256", n), precision="fp32",
            estimate_note=f"{n} VGG-16 forwards (features computed once per image; the pair distances are small)",
            deviations=("random_metric_networks", "ic_lpips_resolution"),
        ))  # fmt: skip

    def localization_unit(self, variant: str | None, cls: str) -> Unit:
        source = "perlin" if variant is None else "generated"
        base = self.out / "perlin" if variant is None else self.vdir(variant) / "downstream"
        out = base / cls / f"localization-{source}"
        steps, batch = self.v("loc_steps"), self.v("loc_batch")
        args = [
            "--class_name", cls, "--mvtec_root", str(self.root), "--source", source, "--output_dir", str(out),
            "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--base_width", str(self.v("loc_base_width")), "--resolution", str(self.v("downstream_resolution")),
            "--resume_from_checkpoint", "latest", "--seed", "0", "--anomaly_maps", self.v("anomaly_maps"),
            "--num_figure_images", str(self.v("figure_images")), "--report_to", "none",
        ]  # fmt: skip
        deps: tuple[str, ...] = ()
        if variant is not None:
            args += ["--generated_root", str(self.vdir(variant) / "generate_data")]
            deps = tuple(f"dualanodiff/{variant}/generate/{cls}/{d}" for d in self.classes[cls])
        out_json = out / "metrics.json"
        return self.add(Unit(
            name=f"dualanodiff/{variant or 'perlin'}/localization/{cls}", entry="eval/downstream/localization.py",
            args=args, outputs=[out_json], check=lambda: json_problems(out_json, ("metrics",)), deps=deps,
            flops=self.flops("draem_256_step", steps * batch), precision="fp32",
            estimate_note=f"{steps} steps x batch {batch} x segmentation U-Net step (test images not counted)",
            deviations=("loc_steps", "loc_batch", "loc_base_width", "downstream_resolution"),
        ))  # fmt: skip

    def classification_unit(self, variant: str, cls: str) -> Unit:
        out = self.vdir(variant) / "downstream" / cls / "classification"
        per_type = min(500, self.v("num_images"))
        n = per_type * len(self.classes[cls])
        batch = self.v("cls_batch")
        steps = self.v("cls_steps") or max(1, 30 * math.ceil(5 * n / batch))
        args = [
            "--class_name", cls, "--mvtec_root", str(self.root),
            "--generated_root", str(self.vdir(variant) / "generate_data"), "--output_dir", str(out),
            "--max_train_steps", str(steps), "--train_batch_size", str(batch),
            "--resolution", str(self.v("downstream_resolution")), "--resume_from_checkpoint", "latest",
            "--seed", "0", "--report_to", "none",
            "--resnet_weights", "none" if self.v("random_metric_networks") else self.v("resnet_weights"),
        ]  # fmt: skip
        out_json = out / "metrics.json"
        return self.add(Unit(
            name=f"dualanodiff/{variant}/classification/{cls}", entry="eval/downstream/classification.py",
            args=args, outputs=[out_json], check=lambda: json_problems(out_json, ("metrics",)),
            deps=tuple(f"dualanodiff/{variant}/generate/{cls}/{d}" for d in self.classes[cls]),
            flops=self.flops("resnet34_256_step", steps * batch), precision="fp32",
            estimate_note=f"{steps} steps x batch {batch} x ResNet-34 step",
            deviations=("cls_steps", "cls_batch", "downstream_resolution", "random_metric_networks"),
        ))  # fmt: skip

    def build(self) -> list[Unit]:
        masks: Path | None = None
        if "bcm" in self.variants:
            if self.v("fg_mask_dir"):
                masks = Path(self.path(self.v("fg_mask_dir")))
            elif self.v("stand_in_masks"):
                masks = self.out / "fg_masks"
                for cls in self.classes:
                    self.masks_unit(cls)
            else:
                self.variants.remove("bcm")
                self.notes.append(
                    "variant bcm left out: it needs foreground masks (--set fg_mask_dir=DIR with U-2-Net masks, "
                    "or --set stand_in_masks=true for preprocessing/make_fg_masks.py stand-ins)"
                )
        for variant in self.variants:
            for cls, defects in self.classes.items():
                if variant == "dino":
                    self.stage1_unit(cls)
                for defect in defects:
                    self.stage2_unit(variant, cls, defect, masks)
                    self.generate_unit(variant, cls, defect)
                    self.is_unit(variant, cls, defect)
                self.ic_lpips_unit(variant, cls)
                self.localization_unit(variant, cls)
                if len(defects) >= 2:
                    self.classification_unit(variant, cls)
                else:
                    self.notes.append(f"{variant}/{cls}: classification left out (one defect type)")
        if self.v("perlin_baseline"):
            for cls in self.classes:
                self.localization_unit(None, cls)
        return self.units


def build_plan(
    s: Settings,
    mvtec_root: Path,
    out: Path,
    classes: list[str] | None,
    variants: list[str],
    counts: dict[str, float] | None,
    profile: str,
    report_unit: Unit,
) -> Plan:
    from script.reproduce.tables import dualanodiff_report

    found = discover_mvtec(mvtec_root, classes)
    builder = DualAnoDiffPlan(s, mvtec_root, out, found, variants)
    builder.counts = counts
    units = builder.build()
    report_unit.deps = tuple(u.name for u in units)
    units.append(report_unit)
    info = {"classes": found, "variants": builder.variants}
    return Plan(
        "dualanodiff", out, s, units, dualanodiff_report, profile=profile, notes=builder.notes, info=info
    )
