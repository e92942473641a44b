"""U-REPA fine-tuning of Stable Diffusion 1.5 on cached SD-VAE latents + DINOv2 tokens.

    accelerate launch train_sd15.py --config configs/sd15_repa_A.yaml [--set key=value ...]
    accelerate launch --multi_gpu --num_processes 2 train_sd15.py --config configs/sd15_repa_tiny.yaml   # CPU too

Loss: L = L_diff + lambda * (L_token + w * L_manifold) (losses/urepa.py); LoRA (or a partial full fine-tune)
on mid_block / down_blocks.3 / up_blocks.0 (the U-Net's lowest-resolution stage); AdamW + warmup/cosine; EMA of the trained weights; bf16;
gradient clipping; NaN/Inf steps skipped (abort after ``train.max_consecutive_nonfinite``);
checkpoints with exact resume (``train.resume_from_checkpoint: latest``); scalars and sample grids to every --report_to tracker (TensorBoard by default).
The loop itself is the shared training core (train/core/, docs/training_core.md); this file wires
config -> data -> model -> loss -> core.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))

import argparse
from typing import Any

import torch

from datasets.sd15_aligned import SD15AlignedDataset, make_batched_loader
from losses.urepa import URepaLoss
from train.core import (
    CoreConfig,
    NonFiniteLossError,
    Optim,
    StepContext,
    Task,
    epoch_stream,
    make_accelerator,
    make_adamw,
    make_lr_scheduler,
    prepare_model,
    run_training,
    weight_dtype_of,
)
from train.core.config import perf_settings
from train.core.ema import ParamEMA
from train.core.perf import loader_kwargs as perf_loader_kwargs
from train.urepa.checkpoint import EMA_FILE, save_extra_state
from train.urepa.config_schema import URepaConfig
from train.urepa.data import (
    apply_cfg_dropout,
    build_dataset,
    cfg_dropout_mask,
    dataset_metadata,
    embedding_table,
    grid_from_metadata,
)
from train.urepa.setup import (
    build_aligned_model,
    load_scheduler_config,
    load_unet,
    load_vae,
    resolve_sd_dir,
)
from utils.cli import UserError, run_cli
from utils.config import add_config_args, load_config
from utils.logging import get_logger

logger = get_logger("train_sd15")

__all__ = ["NonFiniteLossError", "main"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="U-REPA on SD-1.5: train a LoRA (or whitelisted blocks) with token + manifold alignment "
        "to cached DINOv2 tokens. All settings live in the YAML config; override any of them with --set.",
    )
    add_config_args(parser)
    return parser.parse_args(argv)


def core_config(cfg: dict[str, Any]) -> CoreConfig:
    """The ``train:`` section (plus ``output_dir`` and ``seed``) as the training core's settings."""
    t = cfg["train"]
    return CoreConfig(
        output_dir=str(cfg["output_dir"]) if cfg.get("output_dir") else "",
        max_steps=int(t["max_steps"]),
        seed=int(cfg["seed"]),
        mixed_precision=str(t["mixed_precision"]),
        gradient_accumulation_steps=t.get("gradient_accumulation_steps", 1),
        checkpointing_steps=int(t["checkpointing_steps"] or 0),
        checkpoints_total_limit=t.get("checkpoints_total_limit"),
        resume_from_checkpoint=t.get("resume_from_checkpoint"),
        overwrite_output_dir=bool(t.get("overwrite_output_dir", False)),
        allow_config_change=bool(t.get("allow_config_change", False)),
        report_to=t.get("report_to", "tensorboard"),
        log_every=int(t["log_every"]),
        max_consecutive_nonfinite=int(t["max_consecutive_nonfinite"]),
        stop_at_step=t.get("stop_at_step"),
        project_name="sd15_urepa",
        **perf_settings(cfg.get("perf")),  # throughput options (docs/throughput.md)
    )


def resolve_dims(cfg: dict[str, Any], dataset: Any) -> tuple[int, tuple[int, int]]:
    """DINO token width and grid: config values if given, else the cache metadata."""
    model_cfg = cfg["model"]
    meta = dataset_metadata(dataset)
    D = model_cfg.get("D") or (meta or {}).get("D")
    grid = model_cfg.get("grid") or (grid_from_metadata(meta) if meta else None)
    if not D or not grid:
        raise ValueError("cannot determine DINO token width/grid: set model.D and model.grid or use a cache")
    if isinstance(grid, int):
        grid = (grid, grid)
    if meta and model_cfg.get("D") and int(meta["D"]) != int(model_cfg["D"]):
        raise ValueError(
            f"model.D={model_cfg['D']} but the DINO cache {cfg['data'].get('dino_dir')} has D={meta['D']}"
        )
    return int(D), (int(grid[0]), int(grid[1]))


def build_data(cfg: dict[str, Any], accelerator, core: CoreConfig):
    """Dataset (LMDB caches or a registered factory), the prompt-embedding table and the training loader."""
    align = float(cfg["loss"]["align_coeff"]) > 0
    dataset = build_dataset(
        cfg["data"],
        tuple(cfg["model"]["align_layers"]) if align else (),
        cfg["model"].get("D"),
        core.seed,
    )
    D, grid = resolve_dims(cfg, dataset)
    table = embedding_table(dataset, cfg["data"].get("clip_embeddings"))
    cfg["model"]["D"], cfg["model"]["grid"] = D, list(grid)  # resolved: checkpoints are self-describing
    batch_size = int(cfg["train"]["batch_size"])
    global_batch = batch_size * accelerator.num_processes * core.gradient_accumulation_steps
    if len(dataset) < global_batch:
        raise UserError(
            f"dataset has {len(dataset)} samples, fewer than one global batch "
            f"({batch_size} x {accelerator.num_processes} processes x "
            f"{core.gradient_accumulation_steps} accumulation steps)"
        )
    loader_kwargs = dict(
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        # the dataset's per-epoch draws (set_epoch) must reach fresh workers: no persistent workers
        **perf_loader_kwargs(core, int(cfg["data"].get("num_workers", 0)), epoch_state=True),
    )
    if isinstance(dataset, SD15AlignedDataset):
        # Workers read whole batches straight into the batch tensors (one copy per record; measured in
        # docs/urepa_preprocessing.md). Same sampler, so accelerate shards, seeds and skips it as usual.
        loader = make_batched_loader(dataset, seed=None, compact=True, **loader_kwargs)
    else:  # data.factory datasets (tests, synthetic runs)
        loader = torch.utils.data.DataLoader(dataset, **loader_kwargs)
    return dataset, table, loader, D, grid


def build_model(cfg: dict[str, Any], accelerator, D: int, grid: tuple[int, int], table: torch.Tensor):
    """Aligned U-Net (LoRA / whitelisted blocks + heads) and the U-REPA criterion."""
    lcfg = cfg["loss"]
    sd_dir = resolve_sd_dir(cfg["model"]["pretrained"])
    unet = load_unet(sd_dir)
    align = float(lcfg["align_coeff"]) > 0
    model = build_aligned_model(cfg["model"], unet, D, grid, align=align, verbose=accelerator.is_main_process)
    if table.shape[-1] != unet.config.cross_attention_dim:
        raise ValueError(
            f"CLIP embeddings width {table.shape[-1]} != U-Net cross_attention_dim {unet.config.cross_attention_dim}"
        )
    from diffusers import DDPMScheduler

    criterion = URepaLoss(
        DDPMScheduler.from_config(load_scheduler_config(sd_dir)),
        prediction=lcfg["prediction"],
        align_coeff=float(lcfg["align_coeff"]),
        manifold_coeff=float(lcfg["manifold_coeff"]),
        manifold_upper_only=bool(lcfg.get("manifold_upper_only", False)),
    ).to(accelerator.device)
    weight_dtype = weight_dtype_of(accelerator)
    if weight_dtype != torch.float32:
        # diffusers' LoRA-example convention: frozen weights in the compute dtype (half their memory, no
        # per-step casts under autocast); the trained parameters stay fp32 for AdamW and the EMA.
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(weight_dtype)
    return model, criterion, sd_dir


def learning_rate(cfg: dict[str, Any]) -> float:
    """``optim.lr``; when unset (null), 2e-4 for LoRA and 1e-4 for (partial) full fine-tuning."""
    lr = cfg["optim"].get("lr")
    if lr is None:
        lr = 2e-4 if cfg["model"].get("finetune", "lora") == "lora" else 1e-4
    return float(lr)


def build_optimizer(
    cfg: dict[str, Any], params: list[torch.nn.Parameter], core: CoreConfig, num_processes: int
):
    ocfg = cfg["optim"]
    optimizer = make_adamw(  # perf.fused_adamw
        params,
        core,
        lr=learning_rate(cfg),
        betas=tuple(ocfg["betas"]),
        weight_decay=float(ocfg["weight_decay"]),
        eps=float(ocfg["eps"]),
    )
    lr_scheduler = make_lr_scheduler(
        ocfg["lr_scheduler"],
        optimizer,
        warmup_steps=int(round(float(ocfg["warmup_ratio"]) * core.max_steps)),
        max_steps=core.max_steps,
        num_processes=num_processes,
    )
    return optimizer, lr_scheduler


def register_checkpoint_hooks(accelerator, model, ema: ParamEMA, cfg: dict[str, Any]) -> None:
    """Checkpoints hold the trained parameters and their EMA as safetensors; the frozen U-Net is not saved."""

    def save_hook(models, weights, output_dir):
        for m in models:
            if accelerator.is_main_process:
                save_extra_state(accelerator.unwrap_model(m), ema, cfg, output_dir)
            if weights:
                weights.pop()

    def load_hook(models, input_dir):
        from train.urepa.checkpoint import load_trainable

        while models:
            load_trainable(accelerator.unwrap_model(models.pop()), input_dir, use_ema=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def make_step_fn(cfg: dict[str, Any], accelerator, model, criterion: URepaLoss, prompt_table: torch.Tensor):
    """One optimizer step over its micro-batches. Random draws are made for the whole accumulated batch, in
    the order a single batch draws them: k micro-batches of b see exactly the dropout, noise and timesteps
    of one batch of k*b (tested)."""
    p_drop = float(cfg["data"]["cfg_dropout"])
    null_embedding = prompt_table[-1].float()

    def step_fn(micro: list[dict[str, Any]], ctx: StepContext) -> dict[str, torch.Tensor]:
        g = ctx.generator
        sizes = [int(b["latent"].shape[0]) for b in micro]
        total = sum(sizes)
        drop = cfg_dropout_mask(total, p_drop, g)
        noise = torch.randn((total, *micro[0]["latent"].shape[1:]), generator=g, device=g.device)
        timesteps = torch.randint(0, criterion.num_train_timesteps, (total,), generator=g, device=g.device)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for i, batch in enumerate(micro):
            part = slice(start, start + sizes[i])
            start += sizes[i]
            if "prompt_index" in batch:  # compact batches: prompt rows are looked up on the device
                ehs = prompt_table[batch["prompt_index"]].float()
            else:
                ehs = batch["encoder_hidden_states"].float()
            if drop is not None:
                ehs = apply_cfg_dropout(ehs, null_embedding, p_drop, mask=drop[part])
            with ctx.micro_step(i):
                terms = criterion(
                    model,
                    batch["latent"].float(),
                    batch["dino_tokens"],
                    ehs,
                    noise=noise[part],
                    timesteps=timesteps[part],
                )
                ctx.backward(terms["loss"])
            for k, v in terms.items():
                out[k] = out.get(k, 0.0) + v.detach() / len(micro)
        if accelerator.device.type == "cuda":
            out["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        return out

    return step_fn


@torch.no_grad()
def save_sample_grid(accelerator, model, ema, cfg, sd_dir, table, step, out_dir: Path) -> None:
    """EMA-weight samples for the configured classes, one PNG per call (main process only)."""
    from train.core.trackers import log_images
    from train.urepa.sampling import decode_latents, make_scheduler, sample_latents
    from utils.images import save_image_grid

    scfg = cfg["sampling"]
    unwrapped = accelerator.unwrap_model(model)
    vae = load_vae(sd_dir).to(accelerator.device).eval()
    classes = torch.tensor(cfg["train"]["sample_classes"], dtype=torch.long)
    if int(classes.max()) >= table.shape[0] - 1:
        raise ValueError(
            f"train.sample_classes {classes.tolist()} out of range for {table.shape[0] - 1} classes"
        )
    cond = table[classes].to(accelerator.device, torch.float32)
    null = table[-1].to(accelerator.device, torch.float32)
    scheduler = make_scheduler(load_scheduler_config(sd_dir), scfg["sampler"], cfg["loss"]["prediction"])
    size = int(unwrapped.unet.config.sample_size)
    g = torch.Generator().manual_seed(int(cfg["seed"]))
    was_training = unwrapped.training
    unwrapped.eval()
    with ema.average_parameters(unwrapped), accelerator.autocast():
        latents = sample_latents(
            lambda x, t, c: unwrapped(x, t, c, return_tokens=False)[0],
            cond,
            null,
            scheduler,
            (unwrapped.unet.config.in_channels, size, size),
            num_steps=int(scfg["num_steps"]),
            cfg_scale=float(scfg["cfg_scale"]),
            guidance_low=float(scfg["guidance_low"]),
            guidance_high=float(scfg["guidance_high"]),
            generator=g,
        )
    images = decode_latents(vae, latents.float())
    unwrapped.train(was_training)
    path = save_image_grid(images, out_dir / "samples" / f"step_{step:07d}.png", nrow=min(len(classes), 8))
    log_images(accelerator, "samples", (images + 1) / 2, step, nrow=min(len(classes), 8))
    logger.info(f"sample grid -> {path}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides, schema=URepaConfig)
    core = core_config(cfg)
    accelerator = make_accelerator(
        core, dataloader_config=_seedable_loader(core.seed)
    )  # seeds the RNGs before any module is built
    dataset, table, loader, D, grid = build_data(cfg, accelerator, core)
    model, criterion, sd_dir = build_model(cfg, accelerator, D, grid, table)
    prepare_model(model, core)  # perf.channels_last / skip_lora_input_cast / compile
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, lr_scheduler = build_optimizer(cfg, params, core, accelerator.num_processes)
    ema = ParamEMA(model, decay=float(cfg["ema"]["decay"]))
    if accelerator.is_main_process:
        logger.info(
            f"trainable parameters: {sum(p.numel() for p in params) / 1e6:.3f}M "
            f"(finetune={cfg['model'].get('finetune', 'lora')}, lr={learning_rate(cfg)}, align_layers="
            f"{list(model.align_layers)}, D={D}, grid={grid}, prediction={cfg['loss']['prediction']})"
        )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    # [K+1, 77, dim] prompt table in its stored dtype (118 MB fp16 for 1000 classes) and the null row, on the
    # device once rather than copied there every step
    prompt_table = table.to(accelerator.device)
    ema.shadow = {k: v.to(accelerator.device) for k, v in ema.shadow.items()}
    register_checkpoint_hooks(accelerator, model, ema, cfg)
    sample_every = int(cfg["train"].get("sample_every") or 0)

    def on_step_end(step: int) -> None:
        if sample_every and step % sample_every == 0 and accelerator.is_main_process:
            save_sample_grid(accelerator, model, ema, cfg, sd_dir, table, step, Path(core.output_dir))

    task = Task(
        step_fn=make_step_fn(cfg, accelerator, model, criterion, prompt_table),
        batches=lambda start: epoch_stream(accelerator, loader, start, getattr(dataset, "set_epoch", None)),
        optims=[Optim("model", optimizer, lr_scheduler, params, float(cfg["optim"]["max_grad_norm"]))],
        train_modules=[model],
        rng_device="accelerator",
        state_extra=lambda: {"ema_num_updates": ema.num_updates},
        load_state_extra=lambda extra, path: load_ema(ema, extra, path),
        after_update=lambda step: ema.update(accelerator.unwrap_model(model)),
        on_step_end=on_step_end,
        tracker_config=cfg,
    )
    return run_training(accelerator, core, task)


def _seedable_loader(seed: int):
    from accelerate import DataLoaderConfiguration

    return DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)


def load_ema(ema: ParamEMA, extra: dict[str, Any], ckpt: Path) -> None:
    """The EMA of a checkpoint: shadow weights from its safetensors file, the update count from its JSON."""
    from safetensors.torch import load_file

    path = Path(ckpt) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {ckpt} is not a complete train_sd15.py checkpoint")
    ema.load_state_dict(
        {
            "decay": ema.decay,
            "num_updates": int(extra.get("ema_num_updates", 0)),
            "shadow": load_file(str(path)),
        }
    )


if __name__ == "__main__":
    run_cli(main)  # user errors (paths, values): exit code 2 and a message, no traceback
