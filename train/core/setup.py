"""Accelerator, seeding, output-directory policy and LR schedules: the same for every trainer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from train.core import perf
from train.core.checkpoint import LOSS_LOG_NAME
from train.core.config import CoreConfig
from train.core.lock import RunLock
from train.core.trackers import tracker_list
from utils.checkpoint import list_checkpoints
from utils.cli import UserError


def check_precision(mixed_precision: str, cuda: bool) -> None:
    """fp16 autocast has no CPU kernels for most U-Net ops: fail up front instead of deep in the forward."""
    if mixed_precision == "fp16" and not cuda:
        raise UserError(
            "mixed_precision=fp16 needs a CUDA GPU, and none is visible. Use bf16 (works on CPU) or no."
        )


def check_output_dir(cfg: CoreConfig, is_main: bool) -> None:
    """Refuse to start a fresh run on top of an earlier one (diffusers examples' ``--overwrite_output_dir``)."""
    out = Path(cfg.output_dir)
    earlier = list_checkpoints(out) + [p for p in (out / LOSS_LOG_NAME,) if p.exists()]
    if not earlier or cfg.resume_from_checkpoint:
        return
    if not cfg.overwrite_output_dir:
        raise UserError(
            f"output_dir {out} already holds a run ({', '.join(p.name for p in earlier[:4])}). "
            "Continue it with --resume_from_checkpoint latest, start over with --overwrite_output_dir, "
            "or choose another output_dir."
        )
    if is_main:
        logs = (out / cfg.logging_dir).resolve()
        if not logs.is_relative_to(out.resolve()) or logs == out.resolve():  # e.g. a symlink out of the run
            raise UserError(
                f"logging_dir {cfg.logging_dir!r} resolves to {logs}, outside {out}: not deleting it. "
                "Use a folder inside output_dir."
            )
        for p in earlier:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        shutil.rmtree(out / cfg.logging_dir, ignore_errors=True)


def make_accelerator(cfg: CoreConfig, *, find_unused_parameters: bool = False, **kwargs: Any):
    """One process group on GPUs and on CPU; the global RNGs seeded before any module is built.

    ``cpu=True`` without a GPU is what makes ``accelerate launch --multi_gpu --num_processes 2`` form one
    gloo group on a CPU machine (without it every process is its own "main" process). Gradient accumulation
    is done by the core itself (it needs the whole accumulated batch's random draws), so accelerate's own
    counter stays at 1. With ``dataloader_pin_memory`` on a GPU, accelerate's batch copies are non-blocking.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    cuda = torch.cuda.is_available()
    if cfg.mixed_precision is not None:
        check_precision(cfg.mixed_precision, cuda)
    out = Path(cfg.output_dir)
    handlers = list(kwargs.pop("kwargs_handlers", []))
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    if cfg.dataloader_pin_memory and cuda:
        kwargs["dataloader_config"] = kwargs.get("dataloader_config") or DataLoaderConfiguration()
        kwargs["dataloader_config"].non_blocking = True
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=cfg.mixed_precision,
        log_with=tracker_list(cfg.report_to),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        kwargs_handlers=handlers,
        **kwargs,
    )
    check_precision(accelerator.mixed_precision, cuda)  # also when it came from the accelerate config
    if accelerator.is_main_process:
        # one writer per run folder, taken before anything in it is deleted or written (train/core/lock.py)
        lock = RunLock(out).acquire()
        try:
            check_output_dir(cfg, is_main=True)
        except BaseException:
            lock.release()
            raise
    else:
        check_output_dir(cfg, is_main=False)  # the same refusal on every rank; only the main one deletes
    accelerator.wait_for_everyone()
    perf.apply_global_settings(cfg)
    perf.reset_compiled()
    set_seed(cfg.seed)  # same on every rank: identical initial weights everywhere
    return accelerator


def weight_dtype_of(accelerator) -> torch.dtype:
    """The dtype frozen weights are cast to under mixed precision (diffusers' LoRA-example convention)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int, num_processes: int
):
    """``diffusers.optimization.get_scheduler`` with step counts in accelerate's units.

    A prepared scheduler is stepped ``num_processes`` times per optimizer step (accelerate's convention for
    ``split_batches=False``), so warm-up and length are scaled by it: the LR at step k is the 1-process LR
    at step k (tested on 2 processes).
    """
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=int(warmup_steps) * num_processes,
        num_training_steps=max(1, int(max_steps)) * num_processes,
    )
