"""The run's recorded settings (``<output_dir>/config.yaml``) and the resume check against them.

A fresh run records its full config (the trainer's flags or resolved YAML). A resumed run compares the new
config with the recorded one: the checkpoint restores the optimizer's learning rate, the LR schedule's base
values, the sampler position (in batches of the old size) and the trained weights' shapes, so a changed
learning rate, schedule, batch size, LoRA rank/alpha... would be silently ignored or half-applied. Such a
change is refused (exit 2, naming each key with its old and new value) unless ``--allow_config_change``
(YAML trainers: ``train.allow_config_change``) is given; then the new values are applied
(:func:`apply_new_hyperparameters`) and the change is logged and recorded.

Keys that only steer this invocation (where logs go, how often to log/save/validate, throughput options,
when to stop) may change freely; ``max_steps`` may grow (the LR schedule is rebuilt for the new length,
as in the diffusers examples) and is logged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import yaml

from train.core.config import PERF_FIELDS
from utils.cli import UserError

CONFIG_NAME = "config.yaml"

# leaf names (the last part of a dotted key) that may differ between a run and its resumption
FREE_KEYS = frozenset(
    {
        "output_dir",
        "resume_from_checkpoint",
        "overwrite_output_dir",
        "allow_config_change",
        "stop_at_step",
        "report_to",
        "logging_dir",
        "log_every",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "max_consecutive_nonfinite",
        "dataloader_num_workers",
        "num_workers",
        "validation_prompt",
        "validation_steps",
        "num_validation_images",
        "validation_inference_steps",
        "num_figure_images",
        "eval_every",
        "eval_batch_size",
        "skip_eval",
        "sample_every",
        "sample_classes",
        "verify_checksums",
        "config",  # the YAML file's path; its content is what is compared
        "overrides",
        *PERF_FIELDS,
    }
)
FREE_SECTIONS = frozenset({"perf", "eval", "sampling"})  # YAML sections that steer evaluation / speed only
LOGGED_KEYS = frozenset({"max_steps", "max_train_steps"})  # applied by the rebuilt schedule; logged


class ConfigChangedError(UserError):
    """Resuming with settings that the checkpoint's state would override (exit 2)."""


def plain(value: Any) -> Any:
    """``value`` as YAML-safe plain data (paths and other objects become strings)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def record_config(output_dir: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write ``config.yaml`` (atomically) into the run folder."""
    from utils.checkpoint import atomic_write

    path = Path(output_dir) / CONFIG_NAME
    with atomic_write(path) as tmp:
        tmp.write_text(yaml.safe_dump(plain(config), sort_keys=False))
    return path


def recorded_config(checkpoint: Path) -> tuple[dict[str, Any] | None, Path]:
    """The ``config.yaml`` of the run a checkpoint belongs to (its parent folder), or None if it has none."""
    path = checkpoint.parent / CONFIG_NAME
    if not path.is_file():
        return None, path
    return yaml.safe_load(path.read_text()) or {}, path


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (recorded, new) for every setting that differs (a missing key counts as ``None``)."""
    a, b = flatten(plain(old)), flatten(plain(new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_free(key: str) -> bool:
    parts = key.split(".")
    return parts[-1] in FREE_KEYS or parts[0] in FREE_SECTIONS


def check_resume_config(
    old: dict[str, Any] | None, new: dict[str, Any], where: Path, allow: bool, logger
) -> dict[str, tuple[Any, Any]]:
    """Refuse (or, with ``allow``, log) the changes of ``new`` against the recorded ``old``.

    Returns the changes that matter (empty: nothing to apply).
    """
    if old is None:
        logger.warning(f"{where} is missing: cannot check that the resumed settings match the run's")
        return {}
    changes = changed_keys(old, new)
    for key in [k for k in changes if k.rsplit(".", 1)[-1] in LOGGED_KEYS]:
        logger.info(f"resume: {key} changed from {changes[key][0]!r} to {changes[key][1]!r}")
    strict = {k: v for k, v in changes.items() if not is_free(k) and k.rsplit(".", 1)[-1] not in LOGGED_KEYS}
    if not strict:
        return {}
    listing = "\n".join(f"  - {k}: {a!r} -> {b!r}" for k, (a, b) in strict.items())
    if not allow:
        raise ConfigChangedError(
            f"the resumed run was started with other settings ({where}); the checkpoint's optimizer, LR "
            f"schedule, data position and weights would silently keep the old ones:\n{listing}\n"
            "Resume with the recorded settings, start a new run in another output_dir, or pass "
            "--allow_config_change (YAML trainers: train.allow_config_change=true) to apply the new values."
        )
    logger.warning(f"resume with changed settings (--allow_config_change), the new values apply:\n{listing}")
    return strict


def apply_new_hyperparameters(optims: list[Any], before: list[dict[str, Any]]) -> None:
    """Put the new run's optimizer hyperparameters and LR-schedule base values back after a resume.

    ``accelerator.load_state`` restores the checkpoint's ``param_groups`` (learning rate, betas, weight
    decay) and the scheduler's ``base_lrs``; the new config's values, captured by :func:`hyperparameters`
    before loading, replace them, and the current LR is recomputed from the (new) schedule at the resumed
    step. The LR schedule's shape comes from the new config already (its lambdas are not in the state).
    """
    for o, saved in zip(optims, before, strict=True):
        opt = getattr(o.optimizer, "optimizer", o.optimizer)
        sched = getattr(o.lr_scheduler, "scheduler", o.lr_scheduler)
        for group, hp in zip(opt.param_groups, saved["groups"], strict=True):
            group.update(hp)
        if saved["base_lrs"] is not None:
            sched.base_lrs = list(saved["base_lrs"])
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is not None:
            lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, lambdas, strict=True)]
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr
            sched._last_lr = lrs


def hyperparameters(optims: list[Any]) -> list[dict[str, Any]]:
    """Each optimizer's group settings (all but params and the current lr) and the schedule's base LRs."""
    out = []
    for o in optims:
        opt = getattr(o.optimizer, "optimizer", o.optimizer)
        sched = getattr(o.lr_scheduler, "scheduler", o.lr_scheduler)
        groups = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
        out.append({"groups": groups, "base_lrs": list(getattr(sched, "base_lrs", []) or []) or None})
    return out
