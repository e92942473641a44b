"""Train the DinoVQ tokenizer (accelerate; bf16; gradient accumulation; optional LPIPS and PatchGAN).

    accelerate launch train/dinovq/train.py --config configs/dinovq_fast.yaml \
        --set data.train_dir=/data/imagenet dino.source=facebook/dinov2-base
    python train/dinovq/train.py --config configs/dinovq_tiny_demo.yaml --resume_from_checkpoint latest
    python train/dinovq/train.py --config configs/dinovq_high_quality.yaml --init_from tokenizers/dinovq --ema

Without GAN one AdamW optimizer updates the tokenizer; with ``model.use_gan`` a second one updates the
discriminator (``model.loss_fn.discriminator``), as in the seed's loop: generator pass, then discriminator pass
on the generator's (detached) reconstructions; the discriminator pass is skipped before ``disc_start``.
Ground-truth DINO tokens come from the DINOv2 adapter on the fly, or from a DINO-token LMDB cache
(``--dino_cache``) keyed by sample id.

``--ema`` keeps an exponential moving average of the generator's parameters (LlamaGen's ``--ema``; decay
``train.ema_decay``), saved in every checkpoint. At ``max_steps`` the run writes the tokenizer folder
``OUTPUT_DIR/dinovq/`` (EMA weights when ``--ema``; ``DinoVQModel.from_pretrained`` loads it; any
``checkpoint-N``: train/dinovq/export.py). ``--init_from DIR`` starts from an exported tokenizer's weights
(fine-tuning: step 0, fresh optimizers and discriminator), unlike ``--resume_from_checkpoint``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import json
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from models.dinovq import DinoVQModel
from train.core import (
    CoreConfig,
    Optim,
    StepContext,
    Task,
    compile_module,
    epoch_stream,
    loader_kwargs,
    make_accelerator,
    make_adamw,
    make_lr_scheduler,
    prepare_model,
    run_training,
)
from train.core.config import perf_settings
from train.core.ema import ParamEMA
from train.core.trackers import log_table
from train.dinovq.config_schema import DinoVQConfig
from train.dinovq.data import (
    EpochShuffleSampler,
    ImageDataset,
    find_images,
    read_subset_csv,
    split_holdout,
)
from train.dinovq.evaluate import evaluate_reconstruction
from train.dinovq.export import EMA_FILE, save_tokenizer
from utils.cli import UserError, run_cli
from utils.config import add_config_args, load_config
from utils.images import save_image_grid
from utils.logging import get_logger
from utils.weights import MissingWeightsError

logger = get_logger("dinovq.train")


def get_optimizer(
    params, lr: float, wd: float, betas: tuple[float, float] = (0.9, 0.99), perf: CoreConfig | None = None
) -> torch.optim.AdamW:
    """The seed's ``get_optimizer``: AdamW; biases, norms and position embeddings get no weight decay.
    ``perf``: the core settings (``fused_adamw``)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("get_optimizer: no trainable parameters")
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] != 1]
    no_decay = [p for p in params if not (p.ndim >= 2 and p.shape[0] != 1)]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return make_adamw([g for g in groups if g["params"]], perf, lr=lr, betas=betas)


def schedule_name(kind: str, warmup: int) -> str:
    """``train.lr_scheduler`` -> a ``diffusers.optimization.get_scheduler`` name (both spellings accepted)."""
    if kind == "constant":
        return "constant_with_warmup" if warmup > 0 else "constant"
    from diffusers.optimization import SchedulerType

    valid = [t.value for t in SchedulerType]
    if kind not in valid:
        raise ValueError(f"train.lr_scheduler must be one of {valid}, got {kind!r}")
    return kind


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(parser)
    parser.add_argument("--output_dir", default=None, help="Run directory (overrides train.output_dir).")
    parser.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (newest checkpoint-N in the output dir; fresh start if none) or a checkpoint directory.",
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "bf16", "fp16"],
        default=None,
        help="Autocast precision (overrides train.mixed_precision); bf16 recommended on Ampere+.",
    )
    parser.add_argument(
        "--max_steps", type=int, default=None, help="Optimizer steps (overrides train.max_steps)."
    )
    parser.add_argument(
        "--stop_at_step",
        type=int,
        default=None,
        help="Stop after this optimizer step with a checkpoint, keeping the schedule of max_steps "
        "(time-limited jobs: resume later with --resume_from_checkpoint latest).",
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start fresh in an output dir that already holds a run (its checkpoints and logs are deleted).",
    )
    parser.add_argument(
        "--allow_config_change",
        action="store_true",
        help="Resume although settings the checkpoint would override changed (learning rate, schedule, batch "
        "size, ...); the new values apply and the change is logged (docs/training_core.md, Guarantees).",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        default=None,
        help="Keep an EMA of the generator weights (sets train.ema; decay train.ema_decay, default 0.9999); "
        "checkpoints hold it and the final export uses it.",
    )
    parser.add_argument(
        "--init_from",
        default=None,
        help="Fine-tune: start from this exported tokenizer folder (config.json + model.safetensors) at step 0 "
        "with fresh optimizers (and a fresh discriminator). Sets train.init_from. Not a resume.",
    )
    parser.add_argument(
        "--dino_cache",
        default=None,
        help="DINO-token LMDB cache directory (overrides dino.cache); records keyed by sample id.",
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides, schema=DinoVQConfig)
    for key, section, value in (
        ("output_dir", "train", args.output_dir),
        ("resume_from_checkpoint", "train", args.resume_from_checkpoint),
        ("mixed_precision", "train", args.mixed_precision),
        ("max_steps", "train", args.max_steps),
        ("cache", "dino", args.dino_cache),
        ("ema", "train", args.ema),
        ("init_from", "train", args.init_from),
    ):
        if value is not None:
            cfg[section][key] = value
    for section in ("model", "data", "dino", "train", "eval"):
        if section not in cfg:
            raise KeyError(f"config {args.config} has no '{section}' section")
    if not cfg["train"].get("output_dir"):
        raise ValueError("train.output_dir is not set (config or --output_dir)")
    return cfg


def load_items(data_cfg: dict[str, Any]) -> tuple[list, list]:
    if data_cfg.get("train_csv"):
        train = read_subset_csv(data_cfg["train_csv"])
    elif data_cfg.get("train_dir"):
        train = find_images(data_cfg["train_dir"])
    else:
        raise ValueError("set data.train_dir (image folder / ImageNet root) or data.train_csv")
    if data_cfg.get("val_csv"):
        return train, read_subset_csv(data_cfg["val_csv"])
    if data_cfg.get("val_dir"):
        return train, find_images(data_cfg["val_dir"])
    return split_holdout(train, int(data_cfg.get("val_size", 0)))


class DinoTargets:
    """Ground-truth DINO patch tokens for a batch: the frozen adapter on the fly, or the LMDB cache."""

    def __init__(self, dino_cfg: dict[str, Any], device: torch.device):
        self.device = device
        self.cache = None
        self.encoder = None
        if dino_cfg.get("cache"):
            from datasets.lmdb_cache import LMDBCacheReader

            self.cache = LMDBCacheReader(dino_cfg["cache"])
            meta = self.cache.metadata
            self.dim = int(meta.get("D") or self.cache.shape[-1])
        else:
            from models.dinov2_encoder import DINOv2Encoder

            self.encoder = DINOv2Encoder.from_pretrained(
                dino_cfg.get("source"),
                variant=dino_cfg["variant"],
                resolution=int(dino_cfg["resolution"]),
                input_range="-1_1",
            ).to(device)
            self.dim = self.encoder.embed_dim

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, ids: list[str]) -> torch.Tensor:
        if self.encoder is not None:
            return self.encoder(images).patch_tokens.float()
        missing = [k for k in ids if k not in self.cache]
        if missing:
            raise KeyError(
                f"DINO cache {self.cache.path} has no record for ids {missing[:5]} (of {len(ids)})"
            )
        return torch.stack([self.cache.get(k) for k in ids]).to(self.device, torch.float32)


def core_config(cfg: dict[str, Any], args: argparse.Namespace) -> CoreConfig:
    t = cfg["train"]
    return CoreConfig(
        output_dir=str(t["output_dir"]),
        max_steps=int(t["max_steps"]),
        seed=int(t.get("seed", 0)),
        mixed_precision=str(t.get("mixed_precision", "no")),
        gradient_accumulation_steps=int(t.get("gradient_accumulation_steps", 1)),
        checkpointing_steps=int(t.get("checkpointing_steps", 1000)),
        checkpoints_total_limit=t.get("checkpoints_total_limit"),
        resume_from_checkpoint=t.get("resume_from_checkpoint"),
        overwrite_output_dir=bool(args.overwrite_output_dir),
        allow_config_change=bool(args.allow_config_change),
        log_every=int(t.get("log_every", 10)),
        report_to=t.get("report_to", "tensorboard"),
        max_consecutive_nonfinite=int(t.get("max_consecutive_nonfinite", 5)),
        stop_at_step=args.stop_at_step,
        project_name="dinovq",
        **perf_settings(cfg.get("perf")),  # throughput options (docs/throughput.md)
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    cfg = build_config(args)
    tcfg, mcfg, dcfg, ecfg = cfg["train"], dict(cfg["model"]), cfg["data"], cfg["eval"]
    core = core_config(cfg, args)
    # the discriminator gets no gradient in the generator pass and vice versa
    accelerator = make_accelerator(core, find_unused_parameters=True)
    seed, device, output_dir = core.seed, accelerator.device, Path(core.output_dir)

    targets = DinoTargets(cfg["dino"], device)
    if mcfg.get("dino_dim") in (None, "auto"):
        mcfg["dino_dim"] = targets.dim
    elif int(mcfg["dino_dim"]) != targets.dim:
        raise ValueError(f"model.dino_dim={mcfg['dino_dim']} but the DINO targets have dim {targets.dim}")
    model = DinoVQModel(**mcfg)
    if tcfg.get("init_from"):
        init_from_tokenizer(model, tcfg["init_from"])
    img_size = model.img_size
    # perf.compile [model]: the three transformers (the quantizer and losses stay eager); [dinov2]: the targets'
    for m in (model.encoder, model.pixel_decoder, model.dino_decoder):
        prepare_model(m, core)
    if targets.encoder is not None:
        compile_module(targets.encoder, core, "dinov2")

    train_items, val_items = load_items(dcfg)
    augment = bool(dcfg.get("augment", True)) and targets.cache is None
    train_ds = ImageDataset(
        train_items, img_size, augment=augment, seed=seed, min_size=dcfg["min_image_size"]
    )
    sampler = EpochShuffleSampler(len(train_ds), seed=seed)
    bs = int(tcfg["batch_size"])
    if len(train_ds) < bs * accelerator.num_processes:
        raise ValueError(
            f"{len(train_ds)} training images < one global batch "
            f"(batch_size {bs} x {accelerator.num_processes} processes)"
        )
    nw = int(dcfg.get("num_workers", 0))
    # Own generators: creating a DataLoader iterator draws a worker base seed, which must not advance the
    # global torch RNG (used by the quantizer's dead-code restarts) differently in resumed and full runs.
    train_dl = DataLoader(
        train_ds,
        batch_size=bs,
        sampler=sampler,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        **loader_kwargs(core, nw, epoch_state=True),  # augmentation is drawn per epoch (set_epoch)
    )
    val_dl = (
        DataLoader(
            ImageDataset(val_items, img_size, augment=False),
            batch_size=bs,
            num_workers=nw,
            generator=torch.Generator().manual_seed(seed),
        )
        if val_items
        else None
    )

    max_steps, warmup = core.max_steps, int(tcfg.get("warmup_steps", 0))
    gen_opt = get_optimizer(
        model.generator_parameters(), float(tcfg["lr"]), float(tcfg["weight_decay"]), perf=core
    )
    gen_sched = make_lr_scheduler(
        schedule_name(str(tcfg.get("lr_scheduler", "constant")), warmup),
        gen_opt,
        warmup_steps=warmup,
        max_steps=max_steps,
        num_processes=accelerator.num_processes,
    )
    objs = [model, gen_opt, gen_sched, train_dl]
    if model.use_gan:
        disc_opt = get_optimizer(
            model.loss_fn.discriminator.parameters(),
            float(tcfg.get("disc_lr", tcfg["lr"])),
            float(tcfg["weight_decay"]),
            perf=core,
        )
        disc_sched = make_lr_scheduler(
            "constant", disc_opt, warmup_steps=0, max_steps=max_steps, num_processes=accelerator.num_processes
        )
        objs += [disc_opt, disc_sched]
    prepared = accelerator.prepare(*objs)
    model, gen_opt, gen_sched, train_dl = prepared[:4]
    raw = accelerator.unwrap_model(model)
    max_norm = float(tcfg.get("max_grad_norm") or 0.0)
    optims = [Optim("generator", gen_opt, gen_sched, list(raw.generator_parameters()), max_norm)]
    disc_params: list[torch.nn.Parameter] = []
    if raw.use_gan:
        disc_params = list(raw.loss_fn.discriminator.parameters())
        # the discriminator updates only once disc_start is reached (its LR schedule starts then too)
        optims.append(
            Optim("discriminator", prepared[4], prepared[5], disc_params, max_norm, active=disc_active(raw))
        )

    ema = None
    if tcfg.get("ema"):
        ema = ParamEMA(raw, decay=float(tcfg["ema_decay"]), include=is_generator_param)
        register_ema_hook(accelerator, ema)

    lpips_fn, inception = build_eval_nets(raw, ecfg, device, accelerator.is_main_process)
    last_metrics: dict[str, float] = {}

    def step_fn(micro: list[dict], ctx: StepContext) -> dict[str, torch.Tensor]:
        logs: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            imgs = batch["image"].to(device)
            with ctx.micro_step(i):
                out = train_micro_step(accelerator, ctx, model, raw, imgs, batch["id"], targets, disc_params)
            for k, v in out.items():
                logs[k] = logs.get(k, 0.0) + torch.as_tensor(v).detach().float() / len(micro)
        logs["loss"] = logs["total_loss"]
        if raw.use_gan and raw.last_adaptive_weight is not None:
            logs["adaptive_weight"] = raw.last_adaptive_weight
        return logs

    def on_step_end(step: int) -> None:
        nonlocal last_metrics
        every = int(tcfg.get("eval_every", 1000))
        if val_dl is not None and accelerator.is_main_process and (step % every == 0 or step == max_steps):
            last_metrics = run_eval(raw, val_dl, lpips_fn, inception, device, ecfg, output_dir, step)
            accelerator.log({f"eval/{k}": v for k, v in last_metrics.items()}, step=step)
            log_table(
                accelerator, "eval/metrics", ["step", *last_metrics], [[step, *last_metrics.values()]], step
            )

    def on_epoch(epoch: int) -> None:
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)

    def save_final() -> None:
        info = {
            "weights": "ema" if ema is not None else "live",
            "step": core.max_steps,
            "source": str(output_dir),
        }
        path = save_tokenizer(raw, output_dir / "dinovq", info, ema_shadow=ema.shadow if ema else None)
        logger.info("tokenizer exported to %s (%s weights)", path, info["weights"])

    t0 = time.time()
    run_training(
        accelerator,
        core,
        Task(
            step_fn=step_fn,
            batches=lambda start: epoch_stream(accelerator, train_dl, start, on_epoch),
            optims=optims,
            train_modules=[model],
            on_step_end=on_step_end,
            save_final=save_final,
            after_update=(lambda step: ema.update(raw)) if ema is not None else None,
            state_extra=(lambda: {"ema_num_updates": ema.num_updates}) if ema is not None else None,
            load_state_extra=(lambda extra, path: load_ema(ema, extra, path)) if ema is not None else None,
            tracker_config={**cfg, "model": mcfg},  # recorded as config.yaml by the core
            step_logs=("eval_log.jsonl",),
        ),
    )
    if accelerator.is_main_process:
        logger.info("done in %.1fs; outputs in %s", time.time() - t0, output_dir)
    return last_metrics


def is_generator_param(name: str) -> bool:
    """The EMA covers the tokenizer (encoder, quantizer projections, decoders), not the discriminator."""
    return not name.startswith("loss_fn.")


def init_from_tokenizer(model: DinoVQModel, path: str) -> None:
    """Load an exported tokenizer's weights into ``model`` (built from this run's config): same architecture
    required; the discriminator (not part of an export) keeps its fresh initialisation."""
    from models.dinovq import ARCHITECTURE_KEYS

    exported = DinoVQModel.from_pretrained(path)
    ours, theirs = model.export_config(), exported.export_config()
    diffs = [
        f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
        for k in ARCHITECTURE_KEYS
        if ours.get(k) != theirs.get(k)
    ]
    if diffs:
        raise UserError(
            f"--init_from {path}: a different architecture than this config's model: " + "; ".join(diffs)
        )
    missing, unexpected = model.load_state_dict(exported.tokenizer_state_dict(), strict=False)
    missing = [k for k in missing if is_generator_param(k)]
    if missing or unexpected:  # the architectures agree, so this is a damaged export
        raise UserError(f"--init_from {path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    logger.info("initialised the tokenizer from %s (discriminator fresh)", path)


def register_ema_hook(accelerator, ema: ParamEMA) -> None:
    """Each checkpoint gets the EMA weights as safetensors (the update count goes to trainer_state.json)."""
    from utils.checkpoint import save_safetensors_atomic

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_safetensors_atomic(ema.shadow, Path(output_dir) / EMA_FILE)

    accelerator.register_save_state_pre_hook(save_hook)


def load_ema(ema: ParamEMA, extra: dict[str, Any], ckpt: Path) -> None:
    from safetensors.torch import load_file

    path = Path(ckpt) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} missing: {ckpt} was written without --ema; resume without --ema, or start a new run"
        )
    shadow = load_file(str(path))
    ema.load_state_dict(
        {"decay": ema.decay, "num_updates": int(extra.get("ema_num_updates", 0)), "shadow": shadow}
    )


def disc_active(raw):
    return lambda step: raw.loss_fn.disc_factor(step) > 0


def train_micro_step(accelerator, ctx, model, raw, imgs, ids, targets, disc_params) -> dict[str, Any]:
    """One micro-batch: generator pass, then the discriminator pass once ``disc_start`` is reached.

    During the generator pass the discriminator's parameters are frozen (as Lightning's ``toggle_optimizer``
    in taming): the adversarial term's gradient reaches the decoder but is not added to the
    discriminator's own gradient, which comes from the discriminator loss alone.
    """
    dino_gt = targets(imgs, list(ids))
    logs: dict[str, Any] = {}
    for p in disc_params:
        p.requires_grad_(False)
    try:
        with accelerator.autocast():
            out = model(imgs, dino_gt, update_type="generator", global_step=ctx.step)
        ctx.backward(out["total_loss"])
    finally:
        for p in disc_params:
            p.requires_grad_(True)
    logs.update(out)
    if disc_params and raw.loss_fn.disc_factor(ctx.step) > 0:
        with accelerator.autocast():
            d = model(
                imgs,
                None,
                update_type="discriminator",
                global_step=ctx.step,
                reconstructions=raw.last_reconstructions,
            )
        ctx.backward(d["disc_loss"])
        logs.update(d)
    if raw.last_indices is not None:
        idx = raw.last_indices.flatten()
        # on the device: idx.unique().numel() would wait for the GPU every step
        used = torch.zeros(raw.codebook_size, device=idx.device).index_fill_(0, idx, 1.0)
        logs["batch_codebook_usage"] = used.sum() / raw.codebook_size
    return logs


def build_eval_nets(raw, ecfg, device, is_main):
    lpips_fn = inception = None
    if not is_main:
        return None, None
    if ecfg.get("lpips", True):
        if raw.loss_fn.perceptual is not None:
            lpips_fn = raw.loss_fn.perceptual
        else:
            try:
                from losses.lpips_vgg import build_lpips_vgg

                lpips_fn = build_lpips_vgg(ecfg.get("vgg_ckpt_path"), device=device)
            except MissingWeightsError as err:
                logger.warning("evaluation LPIPS skipped: %s", err)
    if ecfg.get("rfid", True):
        try:
            from models.inception import load_inception

            net = load_inception(ecfg.get("inception_path"), device=device)
            inception = lambda x01: net(x01 * 255.0, outputs=("pool",))["pool"]  # noqa: E731
        except MissingWeightsError as err:
            logger.warning("rFID skipped (Inception weights not available): %s", err)
    return lpips_fn, inception


def run_eval(raw, val_dl, lpips_fn, inception, device, ecfg, output_dir, step) -> dict[str, float]:
    metrics, grid = evaluate_reconstruction(
        raw,
        val_dl,
        raw.codebook_size,
        lpips_fn=lpips_fn,
        inception=inception,
        device=device,
        max_images=ecfg.get("max_images"),
    )
    n = min(8, grid.shape[0] // 2)
    half = grid.shape[0] // 2
    pairs = torch.stack([grid[:n], grid[half : half + n]], dim=1).flatten(0, 1)  # original, recon, ...
    save_image_grid(pairs, output_dir / "samples" / f"recon-{step:07d}.png", nrow=2)
    logger.info("eval step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    with open(output_dir / "eval_log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    return metrics


if __name__ == "__main__":
    run_cli(main)  # user errors (paths, values): exit code 2 and a message, no traceback
