"""The settings every trainer shares, with one set of names and defaults.

Argparse trainers (stages 1/2, latent head) get them as diffusers-style flags through :func:`add_core_args`;
YAML trainers (``train_sd15.py``, DinoVQ) fill :class:`CoreConfig` from their ``train:`` section.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import PurePath
from typing import Any, Literal

from pydantic import PositiveInt

from train.core.trackers import REPORT_TO_HELP, report_to_arg, resolve_report_to
from utils.cli import UserError
from utils.config import ConfigSection

PRECISIONS = ("no", "fp16", "bf16")
# Throughput settings (mechanisms in train/core/perf.py, docs/throughput.md). None of them changes the math.
COMPILE_TARGETS = (
    "model",
    "dinov2",
)  # model: the trained network (U-Net ...); dinov2: the frozen DINOv2 of a loss
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
PERF_FIELDS = (
    "compile",
    "compile_mode",
    "channels_last",
    "fused_adamw",
    "allow_tf32",
    "sdpa_backend",
    "skip_lora_input_cast",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "log_step_times",
)


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
    allow_config_change: bool = False  # resume although settings the resumed state would ignore changed
    report_to: str | None = "tensorboard"  # resolved: comma-separated installed trackers, or None
    logging_dir: str = "logs"
    log_every: int = 1
    max_consecutive_nonfinite: int = 5
    stop_at_step: int | None = None
    project_name: str = "train"
    allow_tf32: bool = False
    # throughput (train/core/perf.py); the defaults are the plain PyTorch behaviour
    compile: tuple[str, ...] = ()  # subset of COMPILE_TARGETS
    compile_mode: str | None = None  # torch.compile mode; None: its default
    channels_last: bool = False
    fused_adamw: bool = False
    sdpa_backend: tuple[str, ...] = ()  # SDPA kernels allowed, in priority order; (): PyTorch's choice
    skip_lora_input_cast: bool = False
    dataloader_pin_memory: bool = False
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: int | None = None
    log_step_times: bool = False

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
        need(
            not _escapes(self.logging_dir),
            f"logging_dir {self.logging_dir!r} must be a folder inside output_dir (a relative path without "
            "'..'): --overwrite_output_dir deletes it",
        )
        self.report_to = resolve_report_to(self.report_to)  # unknown / not installed: UserError (exit 2)
        self.compile = _names(self.compile, COMPILE_TARGETS, "compile")
        self.sdpa_backend = _names(self.sdpa_backend, SDPA_BACKENDS, "sdpa_backend")
        need(
            self.compile_mode is None or self.compile_mode in COMPILE_MODES,
            f"compile_mode must be one of {COMPILE_MODES} (or unset), got {self.compile_mode!r}",
        )
        need(
            self.dataloader_prefetch_factor is None
            or (isinstance(self.dataloader_prefetch_factor, int) and self.dataloader_prefetch_factor >= 1),
            f"dataloader_prefetch_factor must be an integer >= 1 (or unset), got {self.dataloader_prefetch_factor!r}",
        )


def _escapes(relative: str) -> bool:
    """Whether a path meant to lie inside a run's folder is absolute or climbs out of it with ``..``."""
    path = PurePath(relative)
    return path.is_absolute() or ".." in path.parts


def _names(value: Any, valid: tuple[str, ...], key: str) -> tuple[str, ...]:
    """A list setting from a flag (list), YAML (list or one string) or code (tuple), checked against ``valid``."""
    if value is None or value == "" or value is False:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    bad = [v for v in items if v not in valid]
    if bad:
        raise ValueError(f"{key}: unknown value(s) {bad}; valid: {list(valid)}")
    if len(set(items)) != len(items):
        raise ValueError(f"{key}: duplicate values in {list(items)}")
    return items


class PerfSection(ConfigSection):
    """The ``perf:`` section of the YAML trainers' configs (``train_sd15.py``, DinoVQ): the throughput flags of
    :func:`add_perf_args` under the same names, checked by the config schema."""

    compile: list[Literal[COMPILE_TARGETS]] = []
    compile_mode: Literal[COMPILE_MODES] | None = None
    channels_last: bool = False
    fused_adamw: bool = False
    allow_tf32: bool = False
    sdpa_backend: list[Literal[SDPA_BACKENDS]] = []
    skip_lora_input_cast: bool = False
    dataloader_pin_memory: bool = False
    dataloader_persistent_workers: bool = False
    dataloader_prefetch_factor: PositiveInt | None = None
    log_step_times: bool = False


def perf_settings(section: dict[str, Any] | None, where: str = "perf") -> dict[str, Any]:
    """The throughput keys of a YAML section (``perf:`` in ``train_sd15.py`` / DinoVQ configs) as
    :class:`CoreConfig` arguments; a missing section means the defaults, an unknown key is an error."""
    if not section:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - set(PERF_FIELDS))
    if unknown:
        raise ValueError(
            f"config section {where!r}: unknown key(s) {unknown}; valid keys: {list(PERF_FIELDS)}"
        )
    return dict(section)


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
        "--allow_config_change",
        action="store_true",
        help="Resume although a setting that the checkpoint's state would override changed since the run "
        "started (learning rate, LR schedule, batch size, LoRA rank/alpha, ...; listed in the refusal). The new "
        "values are applied (the optimizer and LR schedule take the new learning rate) and the change is logged.",
    )
    g.add_argument(
        "--report_to",
        type=report_to_arg,
        default="tensorboard",
        help=REPORT_TO_HELP + " Default: tensorboard.",
    )
    g.add_argument(
        "--logging_dir",
        default="logs",
        help="TensorBoard dir, relative to --output_dir and inside it (absolute paths and '..' are refused).",
    )
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
    add_perf_args(parser)


def add_perf_args(parser: argparse.ArgumentParser) -> None:
    """The throughput flags (train/core/perf.py; docs/throughput.md). Off by default; none changes the math."""
    g = parser.add_argument_group("throughput (same math, faster; docs/throughput.md)")
    g.add_argument(
        "--compile",
        nargs="+",
        choices=COMPILE_TARGETS,
        default=[],
        help="torch.compile these networks: model = the trained network (the U-Net in stages 1/2 and "
        "train_sd15.py; DinoVQ's transformers; the latent head's student), dinov2 = the frozen DINOv2 of the "
        "DINOv2 loss / targets. The first steps are slow (compilation).",
    )
    g.add_argument(
        "--compile_mode", choices=COMPILE_MODES, default=None, help="torch.compile mode (default: torch's)."
    )
    g.add_argument(
        "--channels_last",
        action="store_true",
        help="Frozen conv weights (U-Net, VAE) in channels-last memory format (faster cuDNN convolutions "
        "under bf16/fp16); trained weights keep the default layout.",
    )
    g.add_argument(
        "--fused_adamw",
        action="store_true",
        help="AdamW with fused=True (one kernel for all parameters); falls back to the default with a note "
        "where the device has no fused kernel.",
    )
    g.add_argument(
        "--allow_tf32", action="store_true", help="TF32 for fp32 matmuls and convolutions on Ampere+ GPUs."
    )
    g.add_argument(
        "--sdpa_backend",
        nargs="+",
        choices=SDPA_BACKENDS,
        default=[],
        help="Attention kernels allowed inside the training step, in priority order (e.g. flash efficient "
        "math; end with math to keep a fallback for inputs the others do not take). Default: PyTorch's choice.",
    )
    g.add_argument(
        "--skip_lora_input_cast",
        action="store_true",
        help="peft LoRA layers skip their input cast to the fp32 LoRA dtype (under bf16/fp16 autocast the "
        "cast is undone by autocast, so results are equal; saves a copy of every LoRA layer's input).",
    )
    g.add_argument(
        "--dataloader_pin_memory",
        action="store_true",
        help="Pinned host memory for batches and non-blocking copies to the GPU.",
    )
    g.add_argument(
        "--dataloader_persistent_workers",
        action="store_true",
        help="Keep loader workers alive between epochs (refused where the dataset draws per-epoch state).",
    )
    g.add_argument(
        "--dataloader_prefetch_factor",
        type=int,
        default=None,
        help="Batches each loader worker prepares ahead (torch default: 2). Needs workers > 0.",
    )
    g.add_argument(
        "--log_step_times",
        action="store_true",
        help="Log each step's data wait / forward / backward / optimizer time and the FLOPs of one step "
        "(counted with torch.utils.flop_counter on the first step; not with --compile).",
    )


def core_config_from_args(args: argparse.Namespace, project_name: str, **override: Any) -> CoreConfig:
    """:class:`CoreConfig` from the flags of :func:`add_core_args` (``max_train_steps`` -> ``max_steps``)."""
    names = {f.name for f in fields(CoreConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["max_steps"] = args.max_train_steps
    values["project_name"] = project_name
    values.update(override)
    return CoreConfig(**values)
