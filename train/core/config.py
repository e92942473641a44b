"""The settings every trainer shares, with one set of names and defaults.

Argparse trainers (stages 1/2, latent head) get them as diffusers-style flags through :func:`add_core_args`;
YAML trainers (``train_sd15.py``, DinoVQ) fill :class:`CoreConfig` from their ``train:`` section.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from utils.cli import UserError

PRECISIONS = ("no", "fp16", "bf16")


class CoreConfigError(UserError, ValueError):
    """A bad value of a shared training setting (exit code 2 from an entry point, no traceback)."""


@dataclass
class CoreConfig:
    output_dir: str
    max_steps: int
    seed: int = 0
    mixed_precision: str | None = "no"  # None: the accelerate config's choice
    gradient_accumulation_steps: int = 1
    checkpointing_steps: int = 500  # 0: only the last step (and stop_at_step) is saved
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False
    report_to: str | None = "tensorboard"
    logging_dir: str = "logs"
    log_every: int = 1
    max_consecutive_nonfinite: int = 5
    stop_at_step: int | None = None
    project_name: str = "train"
    allow_tf32: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise CoreConfigError(msg)

        need(bool(self.output_dir), "output_dir is not set")
        need(
            isinstance(self.max_steps, int) and self.max_steps >= 1,
            f"max_steps must be >= 1, got {self.max_steps!r}",
        )
        need(
            self.mixed_precision is None or self.mixed_precision in PRECISIONS,
            f"mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}",
        )
        need(
            isinstance(self.gradient_accumulation_steps, int) and self.gradient_accumulation_steps >= 1,
            f"gradient_accumulation_steps must be an integer >= 1, got {self.gradient_accumulation_steps!r}",
        )
        need(
            self.checkpointing_steps >= 0,
            f"checkpointing_steps must be >= 0 (0: only the last step), got {self.checkpointing_steps}",
        )
        need(
            self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
            f"checkpoints_total_limit must be >= 1 (or unset to keep all), got {self.checkpoints_total_limit}",
        )
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(
            self.max_consecutive_nonfinite >= 1,
            f"max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}",
        )
        need(
            self.stop_at_step is None or self.stop_at_step >= 1,
            f"stop_at_step must be >= 1, got {self.stop_at_step}",
        )
        if self.report_to in ("none", "", "None"):
            self.report_to = None


def add_core_args(
    parser: argparse.ArgumentParser,
    *,
    checkpointing_steps: int = 500,
    log_every: int = 1,
    max_steps_help: str = "Total optimizer steps.",
    resume_help: str = "'latest' (newest checkpoint-N in --output_dir; a fresh start if there is none) "
    "or a checkpoint path.",
) -> None:
    """The core's flags, named as in the diffusers training examples."""
    g = parser.add_argument_group("training core (shared by every trainer)")
    g.add_argument("--output_dir", required=True, help="Where checkpoints, final weights and logs go.")
    g.add_argument("--max_train_steps", type=int, required=True, help=max_steps_help)
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seeds model initialisation (set before any module is built) and every step's random draws, "
        "which depend only on (seed, step, rank): a resumed run repeats the uninterrupted one.",
    )
    g.add_argument(
        "--mixed_precision",
        choices=PRECISIONS,
        default=None,
        help="Autocast / frozen-weight precision (default: the accelerate config's). fp16 needs a GPU; "
        "bf16 works on CPU too.",
    )
    g.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step."
    )
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument(
        "--checkpointing_steps",
        type=int,
        default=checkpointing_steps,
        help="Save checkpoint-<step>/ every N steps; the last step is always saved.",
    )
    g.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most N checkpoints (the newest; N=1 keeps one). Default: keep all.",
    )
    g.add_argument("--resume_from_checkpoint", default=None, help=resume_help)
    g.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start fresh in an --output_dir that already holds a run (its checkpoints and logs are deleted).",
    )
    g.add_argument(
        "--report_to", default="tensorboard", help="accelerate tracker: tensorboard, wandb, all, none."
    )
    g.add_argument("--logging_dir", default="logs", help="TensorBoard dir, relative to --output_dir.")
    g.add_argument(
        "--log_every", type=int, default=log_every, help="Steps between log lines (losses.jsonl, trackers)."
    )
    g.add_argument(
        "--max_consecutive_nonfinite",
        type=int,
        default=5,
        help="Non-finite steps are skipped and counted; stop after this many in a row.",
    )
    g.add_argument(
        "--stop_at_step",
        type=int,
        default=None,
        help="Stop after this step with a checkpoint, keeping the schedule of --max_train_steps "
        "(time-limited jobs: resume later with --resume_from_checkpoint latest).",
    )


def core_config_from_args(args: argparse.Namespace, project_name: str, **override: Any) -> CoreConfig:
    """:class:`CoreConfig` from the flags of :func:`add_core_args` (``max_train_steps`` -> ``max_steps``)."""
    names = {f.name for f in fields(CoreConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["max_steps"] = args.max_train_steps
    values["project_name"] = project_name
    values.update(override)
    return CoreConfig(**values)
