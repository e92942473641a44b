"""Train the DinoVQ tokenizer (accelerate; bf16; gradient accumulation; optional LPIPS and PatchGAN).

    accelerate launch train/dinovq/train.py --config configs/dinovq_fast.yaml \
        --set data.train_dir=/data/imagenet dino.source=facebook/dinov2-base
    python train/dinovq/train.py --config configs/dinovq_tiny_demo.yaml --resume_from_checkpoint latest

Without GAN one AdamW optimizer updates the tokenizer; with ``model.use_gan`` a second one updates the
discriminator (``model.loss_fn.discriminator``), as in the seed's loop: generator pass, then discriminator pass
on the generator's (detached) reconstructions; the discriminator pass is skipped before ``disc_start``.
Ground-truth DINO tokens come from the DINOv2 adapter on the fly, or from a DINO-token LMDB cache
(``--dino_cache``) keyed by sample id.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from models.dinovq import DinoVQModel  # noqa: E402
from train.dinovq.data import (  # noqa: E402
    EpochShuffleSampler,
    ImageDataset,
    find_images,
    read_subset_csv,
    split_holdout,
)
from train.dinovq.evaluate import evaluate_reconstruction  # noqa: E402
from utils.checkpoint import atomic_save_state, checkpoint_step, prune_checkpoints, resolve_resume_path  # noqa: E402
from utils.config import add_config_args, load_config, save_config  # noqa: E402
from utils.images import save_image_grid  # noqa: E402
from utils.logging import get_logger, progress  # noqa: E402
from utils.seed import seed_everything  # noqa: E402
from utils.weights import MissingWeightsError  # noqa: E402

logger = get_logger("dinovq.train")


def get_optimizer(
    params, lr: float, wd: float, betas: tuple[float, float] = (0.9, 0.99)
) -> torch.optim.AdamW:
    """The seed's ``get_optimizer``: AdamW; biases, norms and position embeddings get no weight decay."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("get_optimizer: no trainable parameters")
    decay = [p for p in params if p.ndim >= 2 and p.shape[0] != 1]
    no_decay = [p for p in params if not (p.ndim >= 2 and p.shape[0] != 1)]
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_lambda(kind: str, warmup: int, total: int):
    if kind not in ("constant", "cosine"):
        raise ValueError(f"train.lr_scheduler must be 'constant' or 'cosine', got {kind!r}")

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress_ = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress_))

    return f


class TrainState:
    """Optimizer step and data position, saved with ``accelerator.save_state`` (register_for_checkpointing)."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of ``epoch`` already consumed

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


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
        "--dino_cache",
        default=None,
        help="DINO-token LMDB cache directory (overrides dino.cache); records keyed by sample id.",
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    for key, section, value in (
        ("output_dir", "train", args.output_dir),
        ("resume_from_checkpoint", "train", args.resume_from_checkpoint),
        ("mixed_precision", "train", args.mixed_precision),
        ("max_steps", "train", args.max_steps),
        ("cache", "dino", args.dino_cache),
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    cfg = build_config(args)
    tcfg, mcfg, dcfg, ecfg = cfg["train"], dict(cfg["model"]), cfg["data"], cfg["eval"]

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    output_dir = Path(tcfg["output_dir"])
    accum = int(tcfg.get("gradient_accumulation_steps", 1))
    accelerator = Accelerator(
        gradient_accumulation_steps=accum,
        mixed_precision=tcfg.get("mixed_precision", "no"),
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        # the discriminator gets no gradient in the generator pass and vice versa
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    seed = int(tcfg.get("seed", 0))
    seed_everything(seed)
    device = accelerator.device

    targets = DinoTargets(cfg["dino"], device)
    if mcfg.get("dino_dim") in (None, "auto"):
        mcfg["dino_dim"] = targets.dim
    elif int(mcfg["dino_dim"]) != targets.dim:
        raise ValueError(f"model.dino_dim={mcfg['dino_dim']} but the DINO targets have dim {targets.dim}")
    model = DinoVQModel(**mcfg)
    img_size = model.img_size

    train_items, val_items = load_items(dcfg)
    augment = bool(dcfg.get("augment", True)) and targets.cache is None
    train_ds = ImageDataset(train_items, img_size, augment=augment, seed=seed)
    sampler = EpochShuffleSampler(len(train_ds), seed=seed)
    bs = int(tcfg["batch_size"])
    if len(train_ds) < bs:
        raise ValueError(f"{len(train_ds)} training images < batch_size {bs}")
    nw = int(dcfg.get("num_workers", 0))
    # Own generators: creating a DataLoader iterator draws a worker base seed, which must not advance the
    # global torch RNG (used by the quantizer's dead-code restarts) differently in resumed and full runs.
    train_dl = DataLoader(
        train_ds,
        batch_size=bs,
        sampler=sampler,
        num_workers=nw,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
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

    gen_opt = get_optimizer(model.generator_parameters(), float(tcfg["lr"]), float(tcfg["weight_decay"]))
    max_steps = int(tcfg["max_steps"])
    warmup = int(tcfg.get("warmup_steps", 0))
    gen_sched = torch.optim.lr_scheduler.LambdaLR(
        gen_opt, lr_lambda(tcfg.get("lr_scheduler", "constant"), warmup, max_steps)
    )
    objs = [model, gen_opt, gen_sched, train_dl]
    if model.use_gan:
        disc_opt = get_optimizer(
            model.loss_fn.discriminator.parameters(),
            float(tcfg.get("disc_lr", tcfg["lr"])),
            float(tcfg["weight_decay"]),
        )
        disc_sched = torch.optim.lr_scheduler.LambdaLR(disc_opt, lr_lambda("constant", 0, max_steps))
        objs += [disc_opt, disc_sched]
    prepared = accelerator.prepare(*objs)
    model, gen_opt, gen_sched, train_dl = prepared[:4]
    disc_opt = prepared[4] if model_use_gan(model, accelerator) else None
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    raw = accelerator.unwrap_model(model)

    resume = resolve_resume_path(output_dir, tcfg.get("resume_from_checkpoint"))
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("resumed from %s at step %d", resume, state.step)
        if state.step != checkpoint_step(resume):
            logger.warning("checkpoint name says step %d, state says %d", checkpoint_step(resume), state.step)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config({**cfg, "model": mcfg}, output_dir / "config.yaml")
        accelerator.init_trackers("dinovq")
    log_path = output_dir / "train_log.jsonl"

    lpips_fn, inception = build_eval_nets(raw, ecfg, device, accelerator.is_main_process)

    last_metrics: dict[str, float] = {}
    bar = progress(total=max_steps, desc="dinovq", disable=not accelerator.is_local_main_process, unit="step")
    bar.update(state.step)
    t0 = time.time()
    stop_at = min(max_steps, args.stop_at_step) if args.stop_at_step else max_steps
    while state.step < stop_at:
        # accelerate's DataLoaderShard re-sets the sampler's and dataset's epoch from its own pass counter
        # at every __iter__; set that counter so a resumed run continues with the right shuffle and crops.
        train_dl.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch)
        train_ds.set_epoch(state.epoch)
        skip = state.batch_in_epoch
        loader = train_dl
        if skip:
            loader = accelerator.skip_first_batches(train_dl, skip)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(state.epoch)
        for batch in loader:
            imgs = batch["image"].to(device)
            logs = train_micro_step(
                accelerator, model, raw, imgs, batch["id"], targets, state.step, gen_opt, disc_opt, tcfg
            )
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            gen_sched.step()
            if disc_opt is not None and raw.loss_fn.disc_factor(state.step) > 0:
                prepared[5].step()  # only once the discriminator has stepped (disc_start)
            state.step += 1
            bar.update(1)
            logs["lr"] = gen_sched.get_last_lr()[0]
            if raw.last_adaptive_weight is not None and raw.use_gan:
                logs["adaptive_weight"] = raw.last_adaptive_weight
            if state.step % int(tcfg.get("log_every", 10)) == 0 or state.step == max_steps:
                accelerator.log(logs, step=state.step)
                bar.set_postfix(loss=f"{logs['total_loss']:.4f}")
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": state.step, **logs}) + "\n")
            if state.step % int(tcfg.get("checkpointing_steps", 1000)) == 0 or state.step == stop_at:
                ckpt = output_dir / f"checkpoint-{state.step}"
                atomic_save_state(accelerator, ckpt)
                if accelerator.is_main_process:
                    prune_checkpoints(output_dir, tcfg.get("checkpoints_total_limit"))
                    logger.info("saved %s", ckpt)
            every = int(tcfg.get("eval_every", 1000))
            if (
                val_dl is not None
                and accelerator.is_main_process
                and (state.step % every == 0 or state.step == max_steps)
            ):
                last_metrics = run_eval(
                    raw, val_dl, lpips_fn, inception, device, ecfg, output_dir, state.step
                )
                accelerator.log({f"eval/{k}": v for k, v in last_metrics.items()}, step=state.step)
            if state.step >= stop_at:
                break
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info("done: %d steps in %.1fs; outputs in %s", state.step, time.time() - t0, output_dir)
    accelerator.end_training()
    return last_metrics


def model_use_gan(model, accelerator) -> bool:
    return accelerator.unwrap_model(model).use_gan


def train_micro_step(
    accelerator, model, raw, imgs, ids, targets, step, gen_opt, disc_opt, tcfg
) -> dict[str, float]:
    """One micro-batch: generator pass (+ discriminator pass once ``disc_start`` is reached)."""
    dino_gt = targets(imgs, list(ids))
    max_norm = tcfg.get("max_grad_norm")
    logs: dict[str, float] = {}
    with accelerator.accumulate(model):
        with accelerator.autocast():
            out = model(imgs, dino_gt, update_type="generator", global_step=step)
        accelerator.backward(out["total_loss"])
        if max_norm and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(raw.generator_parameters(), float(max_norm))
        gen_opt.step()
        gen_opt.zero_grad(set_to_none=True)
        logs.update({k: float(v.detach()) for k, v in out.items()})
        if disc_opt is not None and raw.loss_fn.disc_factor(step) > 0:
            with accelerator.autocast():
                d = model(
                    imgs,
                    None,
                    update_type="discriminator",
                    global_step=step,
                    reconstructions=raw.last_reconstructions,
                )
            accelerator.backward(d["disc_loss"])
            if max_norm and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(raw.loss_fn.discriminator.parameters(), float(max_norm))
            disc_opt.step()
            disc_opt.zero_grad(set_to_none=True)
            logs.update({k: float(v.detach()) for k, v in d.items()})
    if raw.last_indices is not None:
        idx = raw.last_indices.flatten()
        logs["batch_codebook_usage"] = float(idx.unique().numel()) / raw.codebook_size
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
            from eval.inception import load_inception

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
    main()
