"""Experiment trackers through accelerate: the names ``--report_to`` accepts, the check that each named tracker
is installed, and images and tables sent to every active tracker (scalars go through ``accelerator.log``).

``--report_to`` takes what ``Accelerator(log_with=...)`` takes: one name or a comma-separated list of
``tensorboard``, ``wandb``, ``comet_ml``, ``mlflow``, ``aim``, ``clearml``, ``dvclive``, ``swanlab``,
``trackio``, or ``all`` (every installed one) or ``none``. accelerate itself skips a named tracker whose
package is missing with a debug message (a run that tracks nothing and exits 0); here that is a user error
(exit code 2) before anything is built.

accelerate's trackers have no common image or table call (TensorBoard, W&B, ClearML and Aim have
``log_images`` with different value types; W&B and ClearML have ``log_table``; Comet and MLflow have neither).
:func:`log_images` and :func:`log_table` call each active tracker the way its own API takes images and tables;
a tracker without such an API gets a one-time warning (the PNG / CSV on disk is the record).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from utils.cli import UserError
from utils.logging import get_logger

logger = get_logger(__name__)

# accelerate.utils.LoggerType's values, without importing accelerate at flag-definition time
TRACKERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio")
REPORT_TO_HELP = (
    "Experiment trackers (accelerate's log_with): one of, or a comma-separated list of, "
    f"{', '.join(TRACKERS)}; 'all' = every installed one; 'none' = no tracker. A named tracker that is not "
    "installed is an error."
)
# the import name of each tracker's package where it differs from the tracker name
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX")}
_warned: set[tuple[str, str]] = set()


def _installed(name: str) -> bool:
    return any(importlib.util.find_spec(pkg) is not None for pkg in _PACKAGES.get(name, (name,)))


def resolve_report_to(value: str | Sequence[str] | None) -> str | None:
    """``--report_to`` -> a comma-separated list of installed trackers, or None for no tracking.

    Raises :class:`UserError` for an unknown name or a named tracker whose package is not installed.
    ``all`` resolves to the installed trackers (None when there is none, with a warning).
    """
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    if not names or names == ["none"] or names == ["None"]:
        return None
    unknown = [n for n in names if n not in (*TRACKERS, "all")]
    if unknown or "none" in names:
        raise UserError(
            f"--report_to: unknown tracker(s) {unknown or ['none']} ('none' stands alone); "
            f"valid: {', '.join(TRACKERS)}, all, none"
        )
    if "all" in names:
        found = [n for n in TRACKERS if _installed(n)]
        if not found:
            logger.warning("--report_to all: no tracker package is installed; nothing is tracked")
        return ",".join(found) or None
    missing = [n for n in names if not _installed(n)]
    if missing:
        raise UserError(
            f"--report_to {','.join(names)}: {', '.join(missing)} is not installed "
            f"(pip install {' '.join(missing)}), or choose another tracker (tensorboard is in requirements.txt) "
            "or --report_to none"
        )
    return ",".join(dict.fromkeys(names))


def report_to_arg(value: str) -> str | None:
    """argparse ``type=`` of ``--report_to``: the same check at parse time (exit code 2 before any work)."""
    import argparse

    try:
        return resolve_report_to(value)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--report_to ")) from None


def tracker_list(report_to: str | None) -> list[str] | None:
    """The resolved ``report_to`` as accelerate's ``log_with`` list."""
    return report_to.split(",") if report_to else None


def _warn_once(tracker: str, what: str) -> None:
    if (tracker, what) not in _warned:
        _warned.add((tracker, what))
        logger.warning(
            "%s are not sent to %s (no such API in its accelerate tracker); see the files on disk",
            what,
            tracker,
        )


def _grid(images: torch.Tensor, nrow: int) -> np.ndarray:
    """[N,C,H,W] in [0, 1] -> one HWC uint8 grid (torchvision's make_grid, 2-pixel padding)."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=max(1, nrow), padding=2)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def log_images(accelerator, tag: str, images: torch.Tensor, step: int, nrow: int = 8) -> None:
    """Send ``images`` ``[N,C,H,W]`` in [0, 1] to every active tracker under ``tag`` (main process only)."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    images = images.detach().float().clamp(0, 1).cpu()
    for tracker in accelerator.trackers:
        name = tracker.name
        if name == "tensorboard":
            tracker.log_images({tag: images.numpy()}, step=step, dataformats="NCHW")
        elif name == "wandb":
            tracker.log_images(
                {tag: [(im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for im in images]}, step
            )
        elif name in ("clearml", "aim"):
            tracker.log_images({tag: _grid(images, nrow)}, step=step)
        elif name == "comet_ml":
            tracker.tracker.log_image(_grid(images, nrow), name=tag, step=step)
        elif name == "mlflow":
            import mlflow

            mlflow.log_image(_grid(images, nrow), key=tag.replace("/", "_"), step=step)
        else:
            _warn_once(name, "images")


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_table(
    accelerator, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
) -> None:
    """Send a table (an evaluation's metrics per scope) to every active tracker (main process only).

    TensorBoard gets it as a Markdown text (its Text tab renders tables); W&B and ClearML through their
    ``log_table``; Comet as a CSV table asset; MLflow as a JSON table artifact.
    """
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    columns, rows = list(columns), [list(r) for r in rows]
    for tracker in accelerator.trackers:
        tname = tracker.name
        if tname == "tensorboard":
            tracker.writer.add_text(name, _markdown_table(columns, rows), global_step=step)
            tracker.writer.flush()
        elif tname in ("wandb", "clearml"):
            tracker.log_table(name, columns=columns, data=rows, step=step)
        elif tname == "comet_ml":
            tracker.tracker.log_table(f"{name.replace('/', '_')}.csv", tabular_data=rows, headers=columns)
        elif tname == "mlflow":
            import mlflow

            data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
            mlflow.log_table(data=data, artifact_file=f"{name.replace('/', '_')}.json")
        else:
            _warn_once(tname, "tables")
