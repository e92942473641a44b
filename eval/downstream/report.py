"""Writing a job's results: metrics.json, metrics.csv and the figures (atomically)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.checkpoint import atomic_write

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"


def write_json(path: Path, data: dict[str, Any]) -> Path:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def localization_figure(
    path: Path,
    images: torch.Tensor,
    masks: torch.Tensor,
    maps: torch.Tensor,
    titles: list[str],
    suptitle: str,
) -> Path:
    """One row per test image: image | ground truth | anomaly map (0..1) | map over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n + 0.6), squeeze=False, layout="constrained")
    for row in range(n):
        img = images[row].permute(1, 2, 0).numpy()
        cells = (
            (img, {}, titles[row]),
            (masks[row].numpy(), {"cmap": "gray", "vmin": 0, "vmax": 1}, "ground truth"),
            (maps[row].numpy(), {"cmap": "jet", "vmin": 0, "vmax": 1}, "anomaly map"),
        )
        for col, (data, kw, title) in enumerate(cells):
            axes[row, col].imshow(data, **kw)
            axes[row, col].set_title(title, fontsize=7)
        axes[row, 3].imshow(img)
        axes[row, 3].imshow(maps[row].numpy(), cmap="jet", vmin=0, vmax=1, alpha=0.45)
        axes[row, 3].set_title("overlay", fontsize=7)
        for ax in axes[row]:
            ax.axis("off")
    fig.suptitle(suptitle, fontsize=8)
    return _save_figure(fig, path)


def confusion_figure(path: Path, confusion: np.ndarray, labels: list[str], suptitle: str) -> Path:
    """Confusion matrix (rows: true defect type, columns: predicted), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    fig, ax = plt.subplots(figsize=(2.0 + 0.7 * k, 1.6 + 0.7 * k), layout="constrained")
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = confusion.max() if confusion.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(int(confusion[i, j])),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if confusion[i, j] > top / 2 else "black",
            )
    ax.set_title(suptitle, fontsize=8)
    return _save_figure(fig, path)
