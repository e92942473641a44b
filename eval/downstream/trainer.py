"""What the two downstream trainers share on top of the training core: flags, Adam + step-decay LR, weight
files as safetensors through accelerate's save/load hooks, and the core task.

The references train both networks with ``Adam(lr=1e-4)`` and ``MultiStepLR`` at 80 % and 90 % of training
(gamma 0.2), stepped per epoch; here the milestones are fractions of ``--max_train_steps``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from train.anomaly.loop import make_dataloader
from train.core import CoreConfig, Optim, StepContext, Task, run_training
from utils.checkpoint import atomic_write, save_safetensors_atomic
from utils.logging import get_logger

logger = get_logger(__name__)

WEIGHTS_NAME = "model.safetensors"
MODEL_CONFIG_NAME = "model_config.json"


def add_optimisation_args(parser: argparse.ArgumentParser, *, batch_size: int) -> None:
    g = parser.add_argument_group("optimisation (references: Adam 1e-4, LR x0.2 at 80% and 90%)")
    g.add_argument("--train_batch_size", type=int, default=batch_size, help="Batch size per device.")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="Adam learning rate.")
    g.add_argument(
        "--lr_milestones",
        type=float,
        nargs="*",
        default=[0.8, 0.9],
        help="Fractions of --max_train_steps after which the LR is multiplied by --lr_gamma (none: constant).",
    )
    g.add_argument("--lr_gamma", type=float, default=0.2, help="LR factor at each milestone.")
    g.add_argument(
        "--max_grad_norm", type=float, default=0.0, help="Gradient clipping norm (0: none, the references')."
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")


def check_optimisation_args(args: argparse.Namespace) -> None:
    if args.train_batch_size < 1:
        raise ValueError(f"--train_batch_size must be >= 1, got {args.train_batch_size}")
    if not all(0.0 < m < 1.0 for m in args.lr_milestones):
        raise ValueError(f"--lr_milestones must be fractions in (0, 1), got {args.lr_milestones}")


def step_decay_scheduler(
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    milestones: list[float],
    gamma: float,
    num_processes: int,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LR x ``gamma`` after each milestone step ``round(m * max_steps)``.

    A prepared scheduler is stepped ``num_processes`` times per optimizer step (accelerate's convention, as in
    ``train.core.make_lr_scheduler``), so the milestones are counted in those units.
    """
    steps = sorted(round(m * max_steps) * num_processes for m in milestones)

    def factor(count: int) -> float:
        return gamma ** sum(count >= s for s in steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def register_weight_hooks(accelerator, model_type: type) -> None:
    """accelerate's checkpoints hold the model as ``model.safetensors`` (never pickled)."""
    from safetensors.torch import load_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            m = next(m for m in models if isinstance(accelerator.unwrap_model(m), model_type))
            save_safetensors_atomic(accelerator.unwrap_model(m).state_dict(), Path(output_dir) / WEIGHTS_NAME)
        while weights:  # our file replaces accelerate's own model dump
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            m = accelerator.unwrap_model(models.pop())
            if isinstance(m, model_type):
                m.load_state_dict(load_file(str(Path(input_dir) / WEIGHTS_NAME)), strict=True)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_model(model: torch.nn.Module, output_dir: str | Path, config: dict[str, Any]) -> Path:
    """Final weights (safetensors) + the JSON needed to rebuild the model."""
    out = Path(output_dir)
    save_safetensors_atomic(model.state_dict(), out / WEIGHTS_NAME)
    with atomic_write(out / MODEL_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
    return out / WEIGHTS_NAME


def load_weights(model: torch.nn.Module, model_dir: str | Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    path = Path(model_dir) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"trained weights not found: {path} (train first, or point at its --output_dir)"
        )
    model.load_state_dict(load_file(str(path)), strict=True)
    return model


def train_model(
    accelerator,
    args: argparse.Namespace,
    cfg: CoreConfig,
    model: torch.nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    model_config: dict[str, Any],
) -> torch.nn.Module:
    """Train ``model`` on ``dataset`` with ``loss_fn(model, batch) -> (loss, logs)`` through the core.

    Returns the unwrapped model holding the final weights (also when the run was already complete and was
    only resumed from its last checkpoint). The trackers stay open: the caller logs its evaluation with
    :func:`log_evaluation` and then calls ``accelerator.end_training()``.
    """
    model_type = type(model)
    register_weight_hooks(accelerator, model_type)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    scheduler = step_decay_scheduler(
        optimizer, args.max_train_steps, args.lr_milestones, args.lr_gamma, accelerator.num_processes
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    device = accelerator.device

    def step_fn(micro: list[dict], ctx: StepContext) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            batch = {k: v.to(device) for k, v in batch.items()}
            with ctx.micro_step(i):
                loss, logs = loss_fn(model, batch)
                ctx.backward(loss)
            for k, v in {**logs, "loss": loss}.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / len(micro)
        return totals

    def batches(start_micro: int):
        return iter(
            make_dataloader(dataset, args, accelerator.process_index, accelerator.num_processes, start_micro)
        )

    def save_final() -> None:
        path = save_model(accelerator.unwrap_model(model), args.output_dir, model_config)
        logger.info("final weights: %s", path)

    params = [p for p in model.parameters() if p.requires_grad]
    task = Task(
        step_fn=step_fn,
        batches=batches,
        optims=[Optim("model", optimizer, scheduler, params, args.max_grad_norm)],
        train_modules=[model],
        save_final=save_final,
        tracker_config=vars(args),
    )
    run_training(accelerator, cfg, task, end_training=False)  # the caller logs its evaluation, then ends
    return accelerator.unwrap_model(model)


def log_evaluation(
    accelerator, name: str, columns: list[str], rows: list[list[Any]], step: int, scalars: dict[str, float]
) -> None:
    """An evaluation's table and its headline numbers to every active tracker (``--report_to``)."""
    from train.core.trackers import log_table

    if accelerator.is_main_process and accelerator.trackers:
        accelerator.log({f"{name}/{k}": v for k, v in scalars.items()}, step=step)
        log_table(accelerator, name, columns, rows, step)
