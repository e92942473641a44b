"""U-REPA replica (seed 004) at CPU scale: does aligning the U-Net to DINOv2 make a LoRA fine-tune learn faster?

    python script/replicas/urepa.py --assets .cache/trained --out outputs/replicas/urepa --seeds 0 1 2
    python script/replicas/urepa.py --quick            # CI guard, <= 60 s CPU: random tiny assets, a few steps

What it does, all with the repo's own code paths:

1. Data: the scikit-learn digits of the trained assets (`preprocessing/trained_assets.py`: ImageFolder
   `{train,test}/<digit>/NNNN.png`, 64 px) written as the sample CSV the cache builders read
   (`id,img_path,class_id,synset`), then `preprocessing/build_caches.py` (stand-in VAE latents 4 x 8 x 8 +
   stand-in DINOv2 tokens 4 x 4 x 64, one pass) and `preprocessing/prepare_clip_embeddings.py` (prompts "a photo
   of the digit {name}", the stand-in's text encoder).
2. The base (built once, cached in `<work>/base_sd15`, shared by every arm and seed): the stand-in SD-1.5 with
   its U-Net replaced by a two-level U-Net of SD-1.5's block types (`REPLICA_UNET`), pretrained from scratch
   for `Settings.base_steps` steps by the stand-in's own pretraining loop
   (`preprocessing/standin_training.train_text_to_image`, text encoder frozen) on the training digits' cached
   latents. Why: on 8x8 latents SD-1.5's four levels put the aligned stage at 1x1 (one global vector); two
   levels keep it at 4x4, the DINO token grid. Short on purpose: a weak but non-random digit model that the
   LoRA can improve within its steps (the stand-in SD already samples digits at ~98 % accuracy).
3. Training: `train_sd15.main` with `configs/sd15_repa_replica_digits.yaml` (setting A's recipe: LoRA on the
   whitelist of the U-Net's lowest-resolution stage, here mid_block / down_blocks.1 / up_blocks.0, EMA, warmup
   + cosine; eps prediction, see Settings) for three arms with the same base, seeds, data order and steps:
   U-REPA (lambda 0.8, w 3), baseline (lambda 0), token-only (lambda 0.8, w 0).
4. Evaluation of every checkpoint (EMA weights, loaded back from the checkpoint files) and of the base
   (step 0):
   - class-conditional samples (`train/urepa/sampling.py`: DPM-Solver++, interval CFG) decoded by the stand-in
     VAE, scored by the separately trained digit classifier (`models/digit_classifier.py`, never a training
     signal): Frechet distance of its 64-d features to the held-out test digits (clean-fid's
     `frechet_distance`, as `eval/fid.py`), and class accuracy (argmax == prompted digit);
   - alignment of the raw U-Net mid features (4 x 4) with the DINO tokens of the held-out digits at t = 250
     (`eval/alignment.py`: SVCCA on tokens as `eval/evaluate_sd15.py`, CKNNA on per-image features);
   - held-out diffusion loss and (arms with a head) held-out token loss, fixed noise and timesteps.
5. Results under --out: `results.json` (rows, aggregate, the verdict of the rule fixed before the runs, the
   base's stamp, timings), `results.csv` (one row per arm, seed, step), `summary.md` (mean +- std over seeds
   at each step, steps each arm needs to reach the baseline's final values, paired final differences, the
   verdict), `curves.png` (metrics vs step, mean +- std bands), `samples.png` (base and final samples of each
   arm, seed 0).

The quick mode (`--quick`) runs the same pipeline (base pretraining included) on the random tiny assets
(`preprocessing/make_tiny_assets.py`) and a digit subset for a few steps, without the classifier metrics
(those need the trained classifier): it is the CI guard that training lowers the held-out losses below the
untrained model's (`tests/replicas/test_urepa_replica.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import csv
import dataclasses
import json
import os
import platform
import time
from typing import Any

import numpy as np
import torch

from script.replicas.summary import resolve_replica_assets
from utils.cli import UserError, run_cli
from utils.logging import get_logger

logger = get_logger("replica_urepa")
REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "configs" / "sd15_repa_replica_digits.yaml"
DIGIT_TEMPLATE = "a photo of the digit {}"


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    label: str
    align_coeff: float
    manifold_coeff: float


ARMS = (
    Arm("urepa", "U-REPA (lambda 0.8, w 3)", 0.8, 3.0),
    Arm("baseline", "baseline (lambda 0)", 0.0, 3.0),
    Arm("token_only", "token only (lambda 0.8, w 0)", 0.8, 0.0),
)


# The replica's base U-Net: SD-1.5's block types (cross-attention down blocks, a plain last down block, the
# cross-attention mid block, a plain first up block, cross-attention up blocks), SD-1.5's layers per block, but
# two levels instead of four. On the 8x8 latents of the 64 px stand-ins SD-1.5's four levels leave the aligned
# stage (down_blocks[-1], mid, up_blocks[0]) at 1x1; two levels keep it at 4x4, the stand-in DINO's token grid
# (as SD-1.5's 8x8 stage of a 64x64 latent is a spatial grid aligned to DINOv2's 16x16 tokens).
REPLICA_UNET: dict[str, Any] = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),  # the stand-in's first and last widths (32, 32, 64, 64)
    "layers_per_block": 2,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
BASE_VERSION = 1  # bump when the base pretraining below changes (part of the base's cache key)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Run lengths and evaluation sizes (fixed before any arm comparison was looked at; docs/replicas.md)."""

    steps: int = 200
    eval_every: int = 50
    batch_size: int = 64
    lr: float | None = None  # None: the config's optim.lr
    finetune: str = "lora"  # model.finetune
    # loss.prediction. The paper switches SD-1.5 to v; the base here is an eps model (docs/replicas.md, U-REPA)
    prediction: str = "epsilon"
    # The base: the two-level U-Net pretrained from scratch by the stand-in's own loop
    # (preprocessing/standin_training.train_text_to_image: SD's eps objective, 10 % prompt dropout, AdamW,
    # warmup + cosine) on the training digits' cached latents, the stand-in's text encoder frozen. Short on
    # purpose: a weak but non-random digit model that the fine-tune can improve within its steps.
    base_steps: int = 300
    base_batch: int = 64
    base_lr: float = 1e-3  # the stand-in U-Net's pretraining lr (preprocessing/trained_assets.py)
    base_seed: int = 0
    samples_per_class: int = 20  # Frechet distance / accuracy: 200 samples vs the 300 held-out digits
    sample_steps: int = 10  # DPM-Solver++ (evaluate_sd15.py's default sampler; 25 steps there)
    cfg_scale: float = 3.0  # the stand-in's own evaluation (preprocessing/trained_assets.py) uses CFG 3
    align_images: int = 300  # held-out digits for SVCCA / CKNNA / held-out losses
    align_timestep: int = 250  # as eval/evaluate_sd15.py
    cknna_topk: int = 10  # as REPA's evaluation
    train_limit: int | None = None  # digits per split (None: all)
    test_limit: int | None = None


FULL = Settings()
QUICK = Settings(
    steps=20,
    eval_every=20,
    batch_size=16,
    lr=1e-2,
    base_steps=30,
    base_batch=16,
    samples_per_class=0,
    align_images=40,
    cknna_topk=5,
    train_limit=100,
    test_limit=40,
)
QUICK_ARMS = ("urepa", "baseline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--assets",
        default=None,
        help="Trained-asset tree of preprocessing/trained_assets.py (TRAINED_ASSETS.json in it), used read-only. "
        "Default: .cache/trained, or with --quick the random tiny assets (.cache/tiny, built if missing).",
    )
    p.add_argument("--out", default="outputs/replicas/urepa", help="Results: JSON, CSV, markdown, figures.")
    p.add_argument(
        "--work", default=None, help="Caches and checkpoints (default: <out>/work); reused when rerun."
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="Training seeds, each arm runs each (default 0 1 2; quick: 0).",
    )
    p.add_argument(
        "--arms",
        nargs="+",
        default=None,
        choices=[a.name for a in ARMS],
        help="Which arms to run (default: all three; quick: urepa baseline).",
    )
    p.add_argument(
        "--quick", action="store_true", help="CI guard: tiny assets, few steps, no classifier metrics."
    )
    p.add_argument(
        "--steps", type=int, default=None, help="Training steps per run (default: 200; quick: 20)."
    )
    p.add_argument("--eval_every", type=int, default=None, help="Checkpoint + evaluation interval in steps.")
    p.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default: the config's 1e-2).")
    p.add_argument(
        "--base_steps",
        type=int,
        default=None,
        help="Pretraining steps of the replica's base U-Net (default 300; quick: 30). The base is cached in "
        "<work>/base_sd15 and rebuilt when this or any of its inputs changes.",
    )
    p.add_argument(
        "--prediction",
        choices=("epsilon", "v"),
        default=None,
        help="Diffusion target (default epsilon, the stand-in's own; v is the paper's switch, see the docs).",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads.")
    args = p.parse_args(argv)
    settings = QUICK if args.quick else FULL
    settings = dataclasses.replace(
        settings,
        lr=args.lr if args.lr is not None else settings.lr,
        prediction=args.prediction or settings.prediction,
        steps=args.steps or settings.steps,
        base_steps=args.base_steps or settings.base_steps,
        eval_every=args.eval_every or (args.steps if args.quick and args.steps else settings.eval_every),
    )
    if settings.steps < 1 or settings.eval_every < 1 or settings.steps % settings.eval_every:
        p.error(
            f"--steps ({settings.steps}) must be a positive multiple of --eval_every ({settings.eval_every})"
        )
    args.settings = settings
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.arms = args.arms or (list(QUICK_ARMS) if args.quick else [a.name for a in ARMS])
    return args


# ------------------------------------------------------------------------------------------------ assets, data


def digit_rows(digits: Path, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Sample-CSV rows of one split, ids `<split>_<digit>_<index>`; `limit` keeps a class-balanced prefix."""
    rows = []
    for d in range(10):
        files = sorted((digits / split / str(d)).glob("*.png"))
        if not files:
            raise UserError(
                f"{digits / split / str(d)}: no PNG files (expected the trained-asset digit layout)"
            )
        rows += [
            {
                "id": f"{split}_{d}_{f.stem}",
                "img_path": str(f.resolve()),
                "class_id": d,
                "synset": f"digit{d}",
            }
            for f in files
        ]
    if limit:
        per_class = max(1, limit // 10)
        rows = [r for d in range(10) for r in [r for r in rows if r["class_id"] == d][:per_class]]
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    from datasets.sample_csv import CSV_COLUMNS

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    return path


def prepare_data(assets: dict[str, Any], work: Path, s: Settings) -> dict[str, Path]:
    """CSV files, latent + DINO caches (one pass over train and test) and the prompt table (resumable)."""
    from preprocessing import build_caches, prepare_clip_embeddings
    from preprocessing.digits import DIGIT_WORDS

    data = work / "data"
    out = {
        "train_csv": write_csv(digit_rows(assets["digits"], "train", s.train_limit), data / "train.csv"),
        "test_csv": write_csv(digit_rows(assets["digits"], "test", s.test_limit), data / "test.csv"),
        "latents": data / "latents",
        "dino": data / "dino",
        "clip": data / "clip.safetensors",
    }
    all_csv = write_csv(
        digit_rows(assets["digits"], "train", s.train_limit)
        + digit_rows(assets["digits"], "test", s.test_limit),
        data / "all.csv",
    )
    build_caches.main(
        [
            "--csv",
            str(all_csv),
            "--num_workers",
            "0",
            "--batch_size",
            "64",
            "--latent_dir",
            str(out["latents"]),
            "--pretrained_model_name_or_path",
            str(assets["sd15"]),
            "--vae_resolution",
            "64",
            "--dino_dir",
            str(out["dino"]),
            "--dinov2_weights",
            str(assets["dinov2_official"]),
            "--variant",
            "tiny14",
            "--dino_resolution",
            "56",
        ]  # fmt: skip
    )
    if not out["clip"].is_file():
        index = data / "digit_classes.json"
        index.write_text(json.dumps({str(d): [f"digit{d}", w] for d, w in enumerate(DIGIT_WORDS)}))
        prepare_clip_embeddings.main(
            [
                "--pretrained_model_name_or_path",
                str(assets["sd15"]),
                "--class_index_json",
                str(index),
                "--template",
                DIGIT_TEMPLATE,
                "--out",
                str(out["clip"]),
                "--dtype",
                "float32",
                "--device",
                "cpu",
            ]  # fmt: skip
        )
    return out


# ------------------------------------------------------------------------------------------------ the base
BASE_STAMP = "REPLICA_BASE.json"


def build_replica_unet(sample_size: int, cross_attention_dim: int, seed: int):
    """The randomly initialised two-level U-Net of REPLICA_UNET (diffusers ``UNet2DConditionModel``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, cross_attention_dim=cross_attention_dim,
        act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
        norm_eps=1e-5, **REPLICA_UNET,
    )  # fmt: skip


def base_key(standin: Path, train_csv: Path, s: Settings) -> str:
    """Cache key of the base: its settings, the U-Net layout, the pretraining loop's source, and every input it
    is trained from (the stand-in's VAE, which made the cached latents, text encoder, tokenizer and scheduler;
    the training ids)."""
    import hashlib

    digest = hashlib.sha256(
        json.dumps(
            {
                "version": BASE_VERSION,
                "unet": REPLICA_UNET,
                **{k: getattr(s, k) for k in ("base_steps", "base_batch", "base_lr", "base_seed")},
            },
            sort_keys=True,
        ).encode()
    )
    loop = REPO_ROOT / "preprocessing" / "standin_training.py"  # the pretraining loop itself
    digest.update(b"standin_training.py\0" + loop.read_bytes())
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in sorted((standin / sub).iterdir()):
            digest.update(f"{sub}/{f.name}\0".encode() + f.read_bytes())
    with open(train_csv, newline="") as f:
        digest.update("".join(f"{r['id']},{r['class_id']}\n" for r in csv.DictReader(f)).encode())
    return digest.hexdigest()[:16]


def ensure_base(assets: dict[str, Any], data: dict[str, Path], work: Path, s: Settings) -> dict[str, Any]:
    """The replica's base pipeline (built once, cached in ``work/base_sd15``, shared by every arm and seed).

    A copy of the stand-in SD-1.5 folder (VAE, text encoder, tokenizer, scheduler) whose ``unet/`` is the
    two-level U-Net pretrained here. Rebuilt when its key (``base_key``) changes; written atomically."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from datasets.lmdb_cache import LMDBCacheReader
    from preprocessing.digits import digit_prompt
    from preprocessing.standin_training import train_text_to_image
    from train.urepa.setup import load_scheduler_config, load_unet
    from utils.checkpoint import atomic_write

    standin, out = Path(assets["sd15"]), work / "base_sd15"
    key = base_key(standin, data["train_csv"], s)
    stamp_path = out / BASE_STAMP
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("key") == key:
            return {"dir": out, **stamp}
    t0 = time.perf_counter()
    standin_unet = load_unet(standin).config
    unet = build_replica_unet(
        int(standin_unet.sample_size), int(standin_unet.cross_attention_dim), seed=s.base_seed
    )
    text_encoder = (
        CLIPTextModel.from_pretrained(standin, subfolder="text_encoder").eval().requires_grad_(False)
    )
    tokenizer = CLIPTokenizer.from_pretrained(standin, subfolder="tokenizer")
    prompts = [digit_prompt(d) for d in range(10)] + [""]
    prompt_ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with open(data["train_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    reader = LMDBCacheReader(data["latents"])
    # the cache holds scaled posterior means ([4, h, w], build_caches.py's default, what the fine-tune reads)
    # or means and stds ([2, 4, h, w]); either way the base sees the latents the fine-tune sees
    records = torch.stack([reader.get(r["id"]).float() for r in rows])
    mean, std = (records[:, 0], records[:, 1]) if records.ndim == 5 else (records, torch.zeros_like(records))
    labels = torch.tensor([int(r["class_id"]) for r in rows])
    # The stand-in's own pretraining loop; the text encoder is frozen (no gradient: AdamW leaves it as is),
    # so the fine-tune's cached prompt embeddings (preprocessing/prepare_clip_embeddings.py) stay valid.
    # Deterministic algorithms, as the stand-ins' build (preprocessing/trained_assets.build): with more than one
    # thread some CPU backward kernels otherwise accumulate in a scheduling-dependent order.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        figures = train_text_to_image(
            unet,
            text_encoder,
            prompt_ids,
            [(mean, std, labels)],
            [1.0],
            DDPMScheduler.from_config(load_scheduler_config(standin)),
            steps=s.base_steps,
            batch=s.base_batch,
            lr=s.base_lr,
            uncond_prob=0.1,
            uncond_index=len(prompts) - 1,
            seed=s.base_seed + 1,
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)

    import shutil

    stamp = {
        "key": key,
        "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in REPLICA_UNET.items()},
        "settings": {k: getattr(s, k) for k in ("base_steps", "base_batch", "base_lr", "base_seed")},
        "pretraining_loss": figures,
        "seconds": round(time.perf_counter() - t0, 1),
        "standin": str(standin),
    }
    with atomic_write(out) as tmp:
        shutil.copytree(standin, tmp, ignore=lambda d, names: ["unet"] if Path(d) == standin else [])
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / BASE_STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    logger.info(f"replica base: {json.dumps(stamp)}")
    return {"dir": out, **stamp}


# ------------------------------------------------------------------------------------------------ training
def logged_losses(run_dir: Path) -> list[dict[str, float]]:
    """The trainer's logged loss terms (training core's losses.jsonl), one dict per log_every steps."""
    path = run_dir / "losses.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def run_overrides(arm: Arm, seed: int, data: dict[str, Path], base: Path, s: Settings) -> list[str]:
    """The train_sd15.py --set overrides of one run (output_dir excepted)."""
    return [
        f"seed={seed}",
        f"model.pretrained={base}",
        f"data.csv={data['train_csv']}",
        f"data.latent_dir={data['latents']}",
        f"data.dino_dir={data['dino']}",
        f"data.clip_embeddings={data['clip']}",
        f"loss.align_coeff={arm.align_coeff}",
        f"loss.manifold_coeff={arm.manifold_coeff}",
        f"train.max_steps={s.steps}",
        f"train.checkpointing_steps={s.eval_every}",
        f"train.batch_size={s.batch_size}",
        f"train.log_every={max(1, min(25, s.steps // 4))}",
        f"model.finetune={s.finetune}",
        f"loss.prediction={s.prediction}",
    ] + ([f"optim.lr={s.lr}"] if s.lr is not None else [])


def run_dir_of(work: Path, arm: Arm, seed: int, overrides: list[str], base_key: str) -> Path:
    """``<work>/runs/<arm>_seed<seed>_<hash>``: the hash of the run's settings and of the base, so a rerun with
    other settings or another base trains afresh instead of reusing a finished run's checkpoints."""
    import hashlib

    h = hashlib.sha256(json.dumps([overrides, base_key]).encode()).hexdigest()[:8]
    return work / "runs" / f"{arm.name}_seed{seed}_{h}"


def train_run(overrides: list[str], run_dir: Path, s: Settings) -> None:
    """One train_sd15.py run (resumes a finished or interrupted run in run_dir: nothing is redone)."""
    import train_sd15

    if (run_dir / f"checkpoint-{s.steps}").is_dir():
        return
    train_sd15.main(["--config", str(CONFIG), "--set", f"output_dir={run_dir}", *overrides])


# ------------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Everything shared by the evaluations: held-out data, VAE, scheduler, prompt table, classifier."""

    def __init__(self, assets: dict[str, Any], base: Path, data: dict[str, Path], s: Settings) -> None:
        from datasets.sd15_aligned import SD15AlignedDataset
        from train.urepa.data import load_clip_embeddings
        from train.urepa.setup import load_scheduler_config, load_vae

        self.s = s
        self.sd_dir = Path(base)
        self.vae = load_vae(self.sd_dir).eval().requires_grad_(False)
        self.scheduler_config = load_scheduler_config(self.sd_dir)
        self.table = load_clip_embeddings(data["clip"]).float()
        ds = SD15AlignedDataset(
            data["test_csv"], data["latents"], data["dino"], data["clip"], cfg_dropout=0.0,
            sample_posterior=False, layers=("mid",),
        )  # fmt: skip
        n = min(s.align_images, len(ds))
        batch = ds.get_batch(list(range(n)))
        self.latents = batch["latent"].float()
        self.dino = batch["dino_tokens"]["mid"].float()
        self.ehs = batch["encoder_hidden_states"].float()
        g = torch.Generator().manual_seed(1234)
        self.noise = torch.randn(self.latents.shape, generator=g)
        self.timesteps = torch.randint(0, 1000, (n,), generator=g)
        self._start: dict[str, float] | None = None  # step-0 sample / alignment metrics (seed-independent)
        self.classifier = None
        if assets.get("classifier") is not None and s.samples_per_class:
            from eval.fid import feature_stats
            from models.digit_classifier import DigitClassifier
            from utils.images import load_rgb

            self.classifier = DigitClassifier.from_pretrained(assets["classifier"])
            with open(data["test_csv"], newline="") as f:
                paths = [r["img_path"] for r in csv.DictReader(f)]
            ref = (
                torch.stack([torch.from_numpy(np.array(load_rgb(p))).permute(2, 0, 1) for p in paths]).float()
                / 127.5
                - 1
            )
            with torch.no_grad():
                self.ref_stats = feature_stats(self.classifier.features(ref).double().numpy())

    def load(self, cfg: dict[str, Any], ckpt: Path | None, seed: int):
        """The aligned U-Net of a run: EMA weights of ``ckpt``, or the untrained start (zero LoRA, random head)."""
        from train.urepa.checkpoint import load_trainable
        from train.urepa.setup import build_aligned_model, load_unet

        torch.manual_seed(seed)
        align = float(cfg["loss"]["align_coeff"]) > 0
        model = build_aligned_model(
            cfg["model"], load_unet(self.sd_dir), int(cfg["model"]["D"]), tuple(cfg["model"]["grid"]), align,
            verbose=False,
        )  # fmt: skip
        if ckpt is not None:
            load_trainable(model, ckpt, use_ema=True)
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def held_out(self, model, cfg: dict[str, Any]) -> dict[str, float]:
        """Diffusion MSE (the configured prediction) and (with a head) token / manifold loss on the held-out digits, fixed draws."""
        from diffusers import DDPMScheduler

        from losses.urepa import URepaLoss

        align = float(cfg["loss"]["align_coeff"]) > 0
        criterion = URepaLoss(
            DDPMScheduler.from_config(self.scheduler_config),
            prediction=cfg["loss"]["prediction"],
            align_coeff=float(cfg["loss"]["align_coeff"]),
            manifold_coeff=float(cfg["loss"]["manifold_coeff"]),
        )
        terms = criterion(
            model, self.latents, {"mid": self.dino}, self.ehs, noise=self.noise, timesteps=self.timesteps
        )
        out = {"heldout_diffusion_loss": float(terms["loss_diff"])}
        if align:
            out["heldout_token_loss"] = float(terms["loss_token"])
        return out

    @torch.no_grad()
    def alignment(self, model) -> dict[str, float]:
        """SVCCA (tokens, as eval/evaluate_sd15.py) and CKNNA (per image) of raw mid features vs DINO tokens."""
        from diffusers import DDPMScheduler

        from eval.alignment import cknna_score, features_to_tokens, svcca_score
        from models.sd15_unet_aligned import capture_features

        scheduler = DDPMScheduler.from_config(self.scheduler_config)
        t = torch.full((len(self.latents),), self.s.align_timestep, dtype=torch.long)
        x_t = scheduler.add_noise(self.latents, self.noise, t)
        with capture_features(model.unet, ["mid"]) as feats:
            model.unet(x_t, t, encoder_hidden_states=self.ehs)
        side = int(round(self.dino.shape[1] ** 0.5))
        u = features_to_tokens(feats["mid"], (side, self.dino.shape[1] // side))
        return {
            "svcca": svcca_score(
                u.reshape(-1, u.shape[-1]).numpy(), self.dino.reshape(-1, self.dino.shape[-1]).numpy()
            ),
            "cknna": cknna_score(u.mean(1).numpy(), self.dino.mean(1).numpy(), topk=self.s.cknna_topk),
        }

    @torch.no_grad()
    def samples(self, model, cfg: dict[str, Any], seed: int = 0) -> torch.Tensor:
        """samples_per_class images of each digit in [-1, 1] (sample i: noise seeded by i, same for every model)."""
        from train.urepa.sampling import decode_latents, make_scheduler, sample_latents

        n = 10 * self.s.samples_per_class
        classes = torch.arange(n) % 10
        unet = model.unet
        shape = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(seed * 100_003 + i))
                for i in range(n)
            ]
        )
        latents = sample_latents(
            lambda x, t, c: model(x, t, c, return_tokens=False)[0],
            self.table[classes],
            self.table[-1],
            make_scheduler(self.scheduler_config, "dpmsolver++", cfg["loss"]["prediction"]),
            shape,
            num_steps=self.s.sample_steps,
            cfg_scale=self.s.cfg_scale,
            guidance_low=0.0,
            guidance_high=0.7,
            noise=noise,
        )
        return decode_latents(self.vae, latents, batch_size=100)

    @torch.no_grad()
    def sample_metrics(self, images: torch.Tensor) -> dict[str, float]:
        from eval.fid import feature_stats, frechet_distance

        feats = self.classifier.features(images)
        predicted = self.classifier.head(feats).argmax(1)
        classes = torch.arange(len(images)) % 10
        return {
            "frechet_distance": float(
                frechet_distance(*feature_stats(feats.double().numpy()), *self.ref_stats)
            ),
            "class_accuracy": float((predicted == classes).float().mean()),
        }

    def evaluate(self, cfg: dict[str, Any], ckpt: Path | None, seed: int) -> tuple[dict[str, float], Any]:
        model = self.load(cfg, ckpt, seed)
        row = self.held_out(model, cfg)
        if ckpt is None and self._start is not None:  # step 0: the same base U-Net in every arm and seed
            row.update(self._start)  # (zero LoRA; samples and raw features do not involve the head)
            return row, None
        shared = self.alignment(model)
        images = None
        if self.classifier is not None:
            images = self.samples(model, cfg)
            shared.update(self.sample_metrics(images))
        if ckpt is None:
            self._start = shared
        return {**row, **shared}, images


# ------------------------------------------------------------------------------------------------ reporting
METRICS = (
    ("frechet_distance", "Frechet distance (classifier features) vs held-out digits", "lower"),
    ("class_accuracy", "class accuracy of samples", "higher"),
    ("cknna", "CKNNA (U-Net mid vs DINO, held-out)", "higher"),
    ("svcca", "SVCCA (U-Net mid vs DINO tokens, held-out)", "higher"),
    ("heldout_diffusion_loss", "held-out diffusion loss (eps MSE)", "lower"),
    ("heldout_token_loss", "held-out token loss (1 - cos)", "lower"),
)


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, tuple[float, float]]]]:
    """{arm: {step: {metric: (mean, std over seeds)}}}."""
    out: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        for step in sorted({r["step"] for r in rows if r["arm"] == arm}):
            sel = [r for r in rows if r["arm"] == arm and r["step"] == step]
            out.setdefault(arm, {})[step] = {
                m: mean_std([r[m] for r in sel]) for m, _, _ in METRICS if all(m in r for r in sel)
            }
    return out


def steps_to_reach(
    rows: list[dict[str, Any]], metric: str, lower_is_better: bool
) -> dict[str, list[int | None]]:
    """Per arm and seed: the first evaluated step at which the metric is at least as good as the *baseline's
    final value of the same seed* (None: not within the run). The seeds share the data order and noise, so the
    comparison is paired."""
    final = max(r["step"] for r in rows)
    out: dict[str, list[int | None]] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        for seed in sorted({r["seed"] for r in rows if r["arm"] == arm}):
            ref = [
                r[metric] for r in rows if r["arm"] == "baseline" and r["seed"] == seed and r["step"] == final
            ]
            if not ref:
                continue
            pts = sorted((r["step"], r[metric]) for r in rows if r["arm"] == arm and r["seed"] == seed)
            hit = [st for st, v in pts if (v <= ref[0] if lower_is_better else v >= ref[0])]
            out.setdefault(arm, []).append(hit[0] if hit else None)
    return out


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule fixed before the runs (docs/replicas.md, U-REPA): an arm shows the paper's effect when, on every
    seed, it reaches the baseline's final Frechet distance (same seed) at an earlier evaluated step than the
    baseline does; learning is shown when the baseline's final Frechet distance is below the base's (step 0)
    and its class accuracy above it on every seed. Also the paired final differences (arm - baseline)."""
    final = max(r["step"] for r in rows)
    if not any(r["arm"] == "baseline" for r in rows) or "frechet_distance" not in rows[0]:
        return {}
    by = {(r["arm"], r["seed"], r["step"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if r["arm"] == "baseline"})
    reach = {
        m: steps_to_reach(rows, m, m == "frechet_distance") for m in ("frechet_distance", "class_accuracy")
    }
    base = reach["frechet_distance"]["baseline"]
    out: dict[str, Any] = {
        "steps_to_baseline_final": reach,
        "learning_shown": all(
            by[("baseline", sd, final)]["frechet_distance"] < by[("baseline", sd, 0)]["frechet_distance"]
            and by[("baseline", sd, final)]["class_accuracy"] > by[("baseline", sd, 0)]["class_accuracy"]
            for sd in seeds
        ),
        "effect": {},
        "final_differences": {},
    }
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm == "baseline":
            continue
        hits = reach["frechet_distance"][arm]
        out["effect"][arm] = all(h is not None and b is not None and h < b for h, b in zip(hits, base))
        out["final_differences"][arm] = {
            m: mean_std([by[(arm, sd, final)][m] - by[("baseline", sd, final)][m] for sd in seeds])
            for m in ("frechet_distance", "class_accuracy", "cknna", "svcca")
        }
    return out


def plot_curves(agg: dict, path: Path, title: str) -> Path:
    from utils.figures import _pyplot, _save

    plt = _pyplot()
    metrics = [m for m in METRICS if any(m[0] in v for a in agg.values() for v in a.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    labels = {a.name: a.label for a in ARMS}
    colours = {a.name: f"C{i}" for i, a in enumerate(ARMS)}  # one colour per arm in every panel
    for ax, (metric, name, better) in zip(axes[0], metrics):
        for arm, steps in agg.items():
            pts = [(st, *v[metric]) for st, v in sorted(steps.items()) if metric in v]
            if not pts:
                continue
            x, mu, sd = (np.asarray(c) for c in zip(*pts))
            ax.plot(x, mu, marker="o", ms=3, label=labels.get(arm, arm), color=colours.get(arm))
            ax.fill_between(x, mu - sd, mu + sd, alpha=0.2, color=colours.get(arm))
        ax.set_title(f"{name}\n({better} is better)", fontsize=8)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=90)


def write_summary(result: dict[str, Any], out: Path) -> str:
    agg = result["aggregate"]
    labels = {a.name: a.label for a in ARMS}
    s = result["settings"]
    seeds = result["seeds"]
    lines = [
        f"Mean +- std over seeds {seeds} (sample std, n = {len(seeds)}); {s['steps']} steps, batch {s['batch_size']}, "
        f"evaluated every {s['eval_every']} steps (step 0 = the replica base before fine-tuning: zero LoRA, untrained head).",
        "",
    ]
    metrics = [m for m in METRICS if any(m[0] in v for a in agg.values() for v in a.values())]
    header = (
        "| arm | step | "
        + " | ".join(f"{m[0]} ({'lower' if m[2] == 'lower' else 'higher'} better)" for m in metrics)
        + " |"
    )
    lines += [header, "|" + "---|" * (len(metrics) + 2)]
    for arm, steps in agg.items():
        for step, v in sorted(steps.items()):
            cells = [f"{v[m[0]][0]:.3f} +- {v[m[0]][1]:.3f}" if m[0] in v else "-" for m in metrics]
            lines.append(f"| {labels.get(arm, arm)} | {step} | " + " | ".join(cells) + " |")
    v = result.get("verdict")
    if v:
        names = {"frechet_distance": "Frechet distance", "class_accuracy": "class accuracy"}
        lines += [
            "",
            f"Steps to reach the baseline's final value of the same seed (evaluated every {s['eval_every']} steps; "
            f"`-`: not reached within {s['steps']} steps):",
            "",
            "| arm | " + " | ".join(f"{n}, per seed" for n in names.values()) + " |",
            "|---|---|---|",
        ]
        for arm in v["steps_to_baseline_final"]["frechet_distance"]:
            cells = [
                ", ".join("-" if h is None else str(h) for h in v["steps_to_baseline_final"][m][arm])
                for m in names
            ]
            lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Paired differences at step {s['steps']} (arm - baseline, same seed; mean +- std over seeds):",
            "",
            "| arm | Frechet distance | class accuracy | CKNNA | SVCCA |",
            "|---|---|---|---|---|",
        ]
        for arm, d in v["final_differences"].items():
            cells = [
                f"{d[m][0]:+.3f} +- {d[m][1]:.3f}"
                for m in ("frechet_distance", "class_accuracy", "cknna", "svcca")
            ]
            lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Rule fixed before the runs: learning shown = the baseline's final Frechet distance below and class "
            f"accuracy above the base's on every seed: **{'yes' if v['learning_shown'] else 'no'}**. "
            "Effect shown for an arm = on every seed it reaches the baseline's final Frechet distance at an "
            "earlier evaluated step than the baseline: "
            + "; ".join(f"{labels.get(a, a)}: **{'yes' if e else 'no'}**" for a, e in v["effect"].items())
            + ".",
        ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    s: Settings = args.settings
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    args.work = str(work)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    assets = resolve_replica_assets(args.assets, args.quick, Path(args.work))
    logger.info(f"assets: {assets['kind']}")
    data = prepare_data(assets, work, s)
    seconds = {"data": round(time.perf_counter() - start, 1), "base": 0.0, "train": 0.0, "eval": 0.0}
    t_base = time.perf_counter()
    base = ensure_base(assets, data, work, s)
    seconds["base"] = time.perf_counter() - t_base
    evaluator = Evaluator(assets, base["dir"], data, s)
    from train.urepa.checkpoint import load_checkpoint_config

    rows: list[dict[str, Any]] = []
    training: list[dict[str, Any]] = []
    final_images: dict[str, torch.Tensor] = {}
    for seed in args.seeds:
        for arm in [a for a in ARMS if a.name in args.arms]:
            overrides = run_overrides(arm, seed, data, base["dir"], s)
            run_dir = run_dir_of(work, arm, seed, overrides, base["key"])
            t0 = time.perf_counter()
            train_run(overrides, run_dir, s)
            t1 = time.perf_counter()
            seconds["train"] += t1 - t0
            cfg = load_checkpoint_config(run_dir / f"checkpoint-{s.steps}")
            log = logged_losses(run_dir)
            training.append(
                {
                    "arm": arm.name,
                    "seed": seed,
                    "first": log[0] if log else None,
                    "last": log[-1] if log else None,
                }
            )
            for step in range(0, s.steps + 1, s.eval_every):
                ckpt = run_dir / f"checkpoint-{step}" if step else None
                row, images = evaluator.evaluate(cfg, ckpt, seed)
                rows.append({"arm": arm.name, "seed": seed, "step": step, **row})
                logger.info(json.dumps(rows[-1]))
                if step == 0 and images is not None:  # the base: the first evaluation of step 0
                    final_images["base"] = images
                if step == s.steps and seed == args.seeds[0] and images is not None:
                    final_images[arm.name] = images
            seconds["eval"] += time.perf_counter() - t1
    agg = aggregate(rows)
    result: dict[str, Any] = {
        "replica": "U-REPA (seed 004) on the stand-in SD-1.5, scikit-learn digits",
        "assets": assets["kind"],
        "base": {k: v for k, v in base.items() if k != "dir"},
        "settings": dataclasses.asdict(s),
        "arms": [dataclasses.asdict(a) for a in ARMS if a.name in args.arms],
        "seeds": args.seeds,
        "rows": rows,
        "training_log": training,
        "aggregate": {a: {str(st): v for st, v in steps.items()} for a, steps in agg.items()},
    }
    result["verdict"] = verdict(rows)
    seconds["total"] = round(time.perf_counter() - start, 1)
    result["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    result["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads"
    )
    result["command"] = "python script/replicas/urepa.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        cols = ["arm", "seed", "step"] + [m for m, _, _ in METRICS if any(m in r for r in rows)]
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in cols} for r in rows)
    result["aggregate"] = agg
    summary = write_summary(result, out)
    plot_curves(agg, out / "curves.png", f"U-REPA replica: {assets['kind']}, seeds {args.seeds}")
    if final_images:
        from utils.figures import save_labelled_grid

        labels = {"base": "base (step 0)", **{a.name: a.label for a in ARMS}}
        per_row = 10
        save_labelled_grid(
            torch.cat([img[:per_row] for img in final_images.values()]),
            out / "samples.png",
            ncols=per_row,
            row_labels=[labels[a] for a in final_images],
            col_labels=[str(d) for d in range(per_row)],
            title=f"The base and each arm after {s.steps} steps (seed {args.seeds[0]}, EMA), one digit per column, "
            "same noise",
        )
    print(summary)
    logger.info(f"done in {seconds['total']:.0f} s: {out}")
    return result


if __name__ == "__main__":
    run_cli(main)
