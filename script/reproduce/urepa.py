"""The U-REPA plan (seed 004): ImageNet subsets -> VAE + DINOv2 caches -> CLIP class embeddings -> training of
settings A and B and the seed's ablations -> FID/sFID (+ SVCCA) of every checkpoint -> tables and the FID-vs-step
plots (aligned vs the lambda-0 baseline).

Settings (``--settings``, the config files in configs/): ``A`` (200 images per class, 60k steps), ``B`` (500 per
class, 120k steps), and the ablations of seed 004 section 5.3 on A's data: ``lambda0`` (baseline, no alignment),
``w0`` (token loss only), ``three_layers`` (enc_last + mid + dec_first), ``lambda0.5``, ``lambda1.0``. Each run
is ``train_sd15.py --config configs/sd15_repa_<setting>.yaml`` with the plan's paths (``--set``), checkpoints
every ``eval_every`` steps (the seed evaluates every 5k steps) and none pruned (each is evaluated). Evaluation:
the seed's sampler (DDPM 250 steps, CFG 7.5 on t/T <= 0.7, EMA weights), 10k samples against 10k ImageNet val
images, clean-fid FID and sFID (docs/urepa.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from script.reproduce.units import REPO_ROOT, Plan, Setting, Settings, Unit, json_problems
from utils.cli import UserError

CONFIGS = {  # setting -> (config file, data group, what it changes)
    "A": ("sd15_repa_A.yaml", "A", "setting A: 200 images per class, 60k steps"),
    "B": ("sd15_repa_B.yaml", "B", "setting B: 500 images per class, 120k steps"),
    "lambda0": ("sd15_repa_ablation_lambda0.yaml", "A", "baseline: lambda 0 (no alignment)"),
    "w0": ("sd15_repa_ablation_w0.yaml", "A", "w 0 (token loss only)"),
    "three_layers": ("sd15_repa_ablation_three_layers.yaml", "A", "align enc_last + mid + dec_first"),
    "lambda0.5": ("sd15_repa_ablation_lambda0.5.yaml", "A", "lambda 0.5"),
    "lambda1.0": ("sd15_repa_ablation_lambda1.0.yaml", "A", "lambda 1.0"),
}


def settings() -> Settings:
    S = Setting
    return Settings(
        base_model=S("models/stable-diffusion-v1-5", "models/stable-diffusion-v1-5", "SD-1.5 (diffusers folder)",
                     "not SD-1.5: a tiny random-weight stand-in; every value is meaningless"),
        class_index_json=S(None, None, "ImageNet class list (None: datasets/imagenet_classes.json)"),
        per_class_A=S(200, 200, "images per class of setting A's subset (and the ablations')"),
        per_class_B=S(500, 500, "images per class of setting B's subset"),
        vae_resolution=S(512, 512, "VAE latent cache resolution"),
        dinov2_variant=S("vitl14", "vitl14", "DINOv2 of the token cache"),
        dino_resolution=S(224, 224, "DINOv2 input size of the token cache"),
        dinov2_weights=S(None, None, "DINOv2 weights (None: the torch.hub cache)"),
        cache_shards=S(8, 8, "cache builder jobs per subset (each one unit, resumable)"),
        cache_batch=S(64, 64, "cache builder batch size"),
        cache_workers=S(8, 8, "cache builder image-loading workers"),
        train_steps=S(None, None, "training steps (None: the config's, 60k / 120k)", kind=int),
        train_batch=S(None, None, "batch size per process (None: the config's, 64)", kind=int),
        train_mixed_precision=S("bf16", "bf16", "training precision (seed: bf16)"),
        tiny_model=S(False, False, "the tiny demo's training overrides (LoRA rank 4, EMA 0.9, no workers)",
                     "tiny training overrides of configs/sd15_repa_tiny.yaml (LoRA rank 4, EMA 0.9)"),
        eval_every=S(5000, 5000, "evaluate (and keep) a checkpoint every N steps (seed: 5k)"),
        eval_sampler=S("ddpm", "ddpm", "FID sampler (seed: NFE 250, REPA's default)"),
        eval_steps=S(250, 250, "FID sampler steps"),
        cfg_scale=S(7.5, 7.5, "classifier-free guidance scale"),
        guidance_high=S(0.7, 0.7, "CFG only where t/T <= this (REPA's guidance interval)"),
        num_samples=S(10000, 10000, "generated images per checkpoint (seed: 10k)"),
        num_ref=S(10000, 10000, "ImageNet val reference images"),
        eval_batch=S(64, 64, "sampling batch size (a sample depends on it: keep it for a whole curve)"),
        eval_mixed_precision=S("bf16", "bf16", "sampling precision (seed: bf16 throughout)"),
        align_num=S(64, 64, "images for SVCCA / t-SNE (0: no alignment analysis)"),
        random_metric_networks=S(False, False, "random-weight Inception (smoke tests only)",
                                 "random Inception: FID / sFID are meaningless"),
        inception_path=S(None, None, "Inception weights (None: the caches evaluate_sd15.py names)"),
    ).not_protocol("class_index_json", "dinov2_weights", "cache_shards", "cache_batch", "cache_workers", "eval_batch",
                   "inception_path")  # fmt: skip


TINY = dict(
    base_model=".cache/tiny/sd15",
    class_index_json=".cache/tiny/imagenet/imagenet_class_index.json",
    per_class_A=4,
    per_class_B=6,
    vae_resolution=64,
    dinov2_variant="tiny14",
    dino_resolution=56,
    dinov2_weights=".cache/tiny/dinov2/dinov2_tiny14_pretrain.pth",
    cache_shards=1,
    cache_batch=8,
    cache_workers=0,
    train_steps=2,
    train_batch=2,
    train_mixed_precision="no",
    tiny_model=True,
    eval_every=2,  # the final checkpoint only: each FID/sFID needs two 2048 x 2048 sqrtm, ~a minute on a CPU
    eval_sampler="dpmsolver++",
    eval_steps=2,
    num_samples=2,
    num_ref=4,
    eval_batch=2,
    eval_mixed_precision="no",
    align_num=0,  # SVCCA + t-SNE: minutes on a shared CPU even for 4 images
    random_metric_networks=True,
)
TINY_IMAGENET = ".cache/tiny/imagenet"


def _abs(value: object) -> str:
    p = Path(str(value))
    return str(p if p.is_absolute() else REPO_ROOT / p)


def config_max_steps(config: str) -> int:
    """``train.max_steps`` of a config (with its ``base:`` chain), read the way train_sd15.py reads it."""
    from train.urepa.config_schema import URepaConfig
    from utils.config import load_config

    return int(load_config(str(REPO_ROOT / "configs" / config), schema=URepaConfig)["train"]["max_steps"])


class URepaPlan:
    def __init__(self, s: Settings, imagenet_root: Path, out: Path, chosen: list[str], counts):
        self.s, self.root, self.out, self.chosen, self.counts = s, imagenet_root, out, chosen, counts
        self.units: list[Unit] = []
        self.data = out / "data"
        self.final_steps: dict[str, int] = {}

    def v(self, name):
        return self.s.v(name)

    def add(self, unit: Unit) -> Unit:
        self.units.append(unit)
        return unit

    def caches(self, group: str) -> tuple[Path, Path]:
        return self.data / f"latents_{group}", self.data / f"dino_{group}"

    def subset_unit(self, group: str) -> Unit:
        csv = self.data / f"train_{group}.csv"
        args = [
            "--imagenet_root",
            str(self.root),
            "--per_class",
            str(self.v(f"per_class_{group}")),
            "--out",
            str(csv),
        ]
        if self.v("class_index_json"):
            args += ["--class_index_json", _abs(self.v("class_index_json"))]
        return self.add(Unit(
            name=f"urepa/subset/{group}", entry="preprocessing/sample_imagenet_subset.py", args=args,
            outputs=[csv], check=lambda: [] if csv.stat().st_size > 0 else [f"{csv} is empty"],
            precision="fp32", estimate_note="CPU only", deviations=(f"per_class_{group}",),
        ))  # fmt: skip

    def cache_units(self, group: str) -> list[Unit]:
        csv = self.data / f"train_{group}.csv"
        latents, dino = self.caches(group)
        k = self.v("cache_shards")
        images = 1000 * self.v(f"per_class_{group}")  # the subset's size for ImageNet-1k
        units = []
        for i in range(k):
            writer = f"part{i:03d}-of-{k:03d}.json"

            def check(writer=writer) -> list[str]:
                problems = []
                for cache in (latents, dino):
                    rec = json_problems(cache / "writers" / writer, ("finished",))
                    if rec:
                        problems += rec
                    elif not json.loads((cache / "writers" / writer).read_text())["finished"]:
                        problems.append(f"{cache / 'writers' / writer}: not finished")
                return problems

            args = [
                "--csv", str(csv), "--num_shards", str(k), "--shard_index", str(i), "--latent_dir", str(latents),
                "--pretrained_model_name_or_path", _abs(self.v("base_model")),
                "--vae_resolution", str(self.v("vae_resolution")), "--dino_dir", str(dino),
                "--variant", self.v("dinov2_variant"), "--dino_resolution", str(self.v("dino_resolution")),
                "--batch_size", str(self.v("cache_batch")), "--num_workers", str(self.v("cache_workers")),
                "--no_progress",
            ]  # fmt: skip
            if self.v("dinov2_weights"):
                args += ["--dinov2_weights", _abs(self.v("dinov2_weights"))]
            flops = None
            if self.counts is not None:
                flops = images / k * (self.counts["vae_encode_512"] + self.counts["dinov2_vitl14_224"])
            units.append(self.add(Unit(
                name=f"urepa/caches/{group}/shard-{i}", entry="preprocessing/build_caches.py", args=args,
                outputs=[latents / "metadata.json", dino / "metadata.json"], check=check,
                deps=(f"urepa/subset/{group}",), flops=flops, precision="fp32",
                estimate_note=f"~{images // k} images x (VAE encoder 512 px + DINOv2 ViT-L/14 224 px)",
                deviations=("vae_resolution", "dinov2_variant", "dino_resolution"),
            )))  # fmt: skip
        return units

    def clip_unit(self) -> Unit:
        out = self.data / "clip_embeddings.safetensors"
        args = ["--pretrained_model_name_or_path", _abs(self.v("base_model")), "--out", str(out)]
        if self.v("class_index_json"):
            args += ["--class_index_json", _abs(self.v("class_index_json"))]
        return self.add(Unit(
            name="urepa/clip", entry="preprocessing/prepare_clip_embeddings.py", args=args, outputs=[out],
            flops=None, precision="fp32", estimate_note="1001 prompts through the CLIP text encoder: negligible",
        ))  # fmt: skip

    def train_unit(self, setting: str, cache_units: dict[str, list[Unit]]) -> Unit:
        config, group, _ = CONFIGS[setting]
        run = self.out / "runs" / setting
        latents, dino = self.caches(group)
        steps = self.v("train_steps") or config_max_steps(config)
        self.final_steps[setting] = steps
        sets = [
            f"output_dir={run}", f"model.pretrained={_abs(self.v('base_model'))}",
            f"data.csv={self.data / f'train_{group}.csv'}", f"data.latent_dir={latents}", f"data.dino_dir={dino}",
            f"data.clip_embeddings={self.data / 'clip_embeddings.safetensors'}",
            f"train.max_steps={steps}", f"train.checkpointing_steps={self.v('eval_every')}",
            "train.checkpoints_total_limit=null", "train.resume_from_checkpoint=latest",
            f"train.mixed_precision={self.v('train_mixed_precision')}",
        ]  # fmt: skip
        if self.v("train_batch"):
            sets.append(f"train.batch_size={self.v('train_batch')}")
        if self.v("tiny_model"):  # configs/sd15_repa_tiny.yaml's overrides
            sets += ["model.lora.rank=4", "model.lora.alpha=4", "ema.decay=0.9", "data.num_workers=0",
                     "train.log_every=1", "train.sample_every=0"]  # fmt: skip
        final = run / f"checkpoint-{steps}"
        batch = self.v("train_batch") or 64
        flops = None if self.counts is None else steps * batch * self.counts["train_urepa"]
        return self.add(Unit(
            name=f"urepa/train/{setting}", entry="train_sd15.py",
            args=["--config", str(REPO_ROOT / "configs" / config), "--set", *sets],
            outputs=[final / "trainable_state.safetensors"],
            deps=(*[u.name for u in cache_units[group]], "urepa/clip"), flops=flops,
            precision="fp32" if self.v("train_mixed_precision") == "no" else self.v("train_mixed_precision"),
            estimate_note=f"{steps} steps x batch {batch} x U-REPA step (U-Net LoRA forward + backward, head)",
            deviations=("base_model", "train_steps", "train_batch", "train_mixed_precision", "tiny_model"),
        ))  # fmt: skip

    def eval_unit(self, setting: str, step: int) -> Unit:
        ckpt = self.out / "runs" / setting / f"checkpoint-{step}"
        out_dir = self.out / "eval"
        result = out_dir / setting / f"checkpoint-{step}.json"
        n = self.v("num_samples")
        ref_dir = self.root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
        args = [
            "--baseline" if setting == "lambda0" else "--checkpoints", str(ckpt), "--out_dir", str(out_dir),
            "--sampler", self.v("eval_sampler"), "--num_steps", str(self.v("eval_steps")),
            "--cfg_scale", str(self.v("cfg_scale")), "--guidance_high", str(self.v("guidance_high")),
            "--num_samples", str(n), "--num_ref", str(self.v("num_ref")), "--ref_dir", str(ref_dir),
            "--batch_size", str(self.v("eval_batch")), "--mixed_precision", self.v("eval_mixed_precision"),
            "--stats_cache", str(out_dir / "fid_stats"), "--grid_classes", "0", "1",
        ]  # fmt: skip
        if self.v("inception_path"):
            args += ["--inception_path", _abs(self.v("inception_path"))]
        elif self.v("random_metric_networks"):
            args += ["--inception_path", "random"]
        group = CONFIGS[setting][1]
        if self.v("align_num"):
            latents, dino = self.caches(group)
            args += ["--align_csv", str(self.data / f"train_{group}.csv"), "--align_latent_dir", str(latents),
                     "--align_dino_dir", str(dino), "--align_num", str(self.v("align_num"))]  # fmt: skip
        flops = None
        if self.counts is not None:
            from script.reproduce.estimate import unet_evals

            evals = unet_evals(self.v("eval_sampler"), self.v("eval_steps"), self.v("cfg_scale") > 1, 0.0,
                               self.v("guidance_high"))  # fmt: skip
            c = self.counts
            flops = n * (evals * c["unet_urepa_lora32"] + c["vae_decode"] + c["inception_299"])
            flops += self.v("num_ref") * c["inception_299"]
        keys = ("fid", "sfid") if n else ("step",)
        return self.add(Unit(
            name=f"urepa/eval/{setting}/{step}", entry="eval/evaluate_sd15.py", args=args, outputs=[result],
            check=lambda: json_problems(result, keys), deps=(f"urepa/train/{setting}",), flops=flops,
            precision="fp32" if self.v("eval_mixed_precision") == "no" else self.v("eval_mixed_precision"),
            estimate_note=f"{n} samples x ({self.v('eval_sampler')} {self.v('eval_steps')} steps, CFG on t/T <= "
            f"{self.v('guidance_high')}: U-Net evaluations + VAE decode + Inception) + {self.v('num_ref')} reference "
            "Inception forwards (cached after the first unit)",
            deviations=("eval_every", "eval_sampler", "eval_steps", "cfg_scale", "guidance_high", "num_samples",
                        "num_ref", "eval_mixed_precision", "random_metric_networks", "align_num"),
        ))  # fmt: skip

    def build(self) -> list[Unit]:
        groups = sorted({CONFIGS[s][1] for s in self.chosen})
        for group in groups:
            self.subset_unit(group)
        self.clip_unit()
        cache_units = {group: self.cache_units(group) for group in groups}
        for setting in self.chosen:
            self.train_unit(setting, cache_units)
        every = self.v("eval_every")
        for setting in self.chosen:
            last = self.final_steps[setting]
            for step in [*range(every, last, every), last]:
                self.eval_unit(setting, step)
        return self.units


def build_plan(
    s: Settings,
    imagenet_root: Path,
    out: Path,
    chosen: list[str],
    counts: dict[str, float] | None,
    profile: str,
    report_unit: Unit,
) -> Plan:
    from script.reproduce.tables import urepa_report

    if not (imagenet_root / "ILSVRC" / "Data" / "CLS-LOC" / "train").is_dir():
        raise UserError(
            f"--imagenet_root {imagenet_root}: no ILSVRC/Data/CLS-LOC/train under it (ImageNet in the ILSVRC "
            "layout; --profile tiny uses the synthetic tiny ImageNet)"
        )
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown:
        raise UserError(f"--settings {' '.join(unknown)}: unknown; settings: {', '.join(CONFIGS)}")
    builder = URepaPlan(s, imagenet_root, out, chosen, counts)
    units = builder.build()
    report_unit.deps = tuple(u.name for u in units)
    units.append(report_unit)
    info = {
        "settings": list(chosen),
        "final_steps": builder.final_steps,
        "changes": {k: v[2] for k, v in CONFIGS.items()},
        "groups": {k: v[1] for k, v in CONFIGS.items()},
    }
    return Plan("urepa", out, s, units, urepa_report, profile=profile, info=info)
