"""Figures meant for people: labelled image grids and metric-vs-step plots (matplotlib, written atomically).

Both take a ``note`` that is printed in the title, e.g. ``"random weights — values meaningless"``, so a picture
made from a demo's random networks cannot be mistaken for a result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from utils.checkpoint import atomic_write
from utils.images import to_pil

RANDOM_WEIGHTS_NOTE = "random weights — values meaningless"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike, dpi: int) -> Path:
    plt = _pyplot()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return Path(path)


def _full_title(title: str, note: str) -> str:
    return "\n".join(t for t in (title, f"({note})" if note else "") if t)


def save_labelled_grid(
    images: torch.Tensor | Sequence[torch.Tensor | Image.Image],
    path: str | os.PathLike,
    ncols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    note: str = "",
    value_range: tuple[float, float] = (-1.0, 1.0),
    cell_inches: float = 1.4,
    dpi: int = 100,
) -> Path:
    """Images in rows of ``ncols``, with a label left of each row, above each column, and a title.

    ``images`` is a [B,C,H,W] tensor in ``value_range`` or a list of tensors / PIL images, row-major.
    """
    pils = [im if isinstance(im, Image.Image) else to_pil(im, value_range) for im in images]
    if not pils or ncols < 1:
        raise ValueError("save_labelled_grid: need at least one image and ncols >= 1")
    nrows = -(-len(pils) // ncols)
    if row_labels is not None and len(row_labels) != nrows:
        raise ValueError(f"{len(row_labels)} row labels for {nrows} rows")
    if col_labels is not None and len(col_labels) != ncols:
        raise ValueError(f"{len(col_labels)} column labels for {ncols} columns")
    plt = _pyplot()
    left = 1.6 if row_labels else 0.1
    top = 0.35 * (len(_full_title(title, note).splitlines()) + (1 if col_labels else 0)) + 0.1
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(left + ncols * cell_inches, top + nrows * cell_inches),
        squeeze=False,
    )
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():  # a thin frame: a white mask stays visible on the white page
            spine.set_visible(i < len(pils))
            spine.set_color("0.6")
            spine.set_linewidth(0.5)
        if i < len(pils):
            image = pils[i]
            ax.imshow(image, cmap="gray" if image.mode == "L" else None, vmin=0, vmax=255)
    for c, label in enumerate(col_labels or []):
        axes[0, c].set_title(label, fontsize=8)
    for r, label in enumerate(row_labels or []):
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    full_title = _full_title(title, note)
    if full_title:
        fig.suptitle(full_title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi)


def plot_metric_vs_step(
    results: Sequence[dict],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("fid", "sfid"),
    title: str = "",
    note: str = "",
) -> Path:
    """One panel per metric, one line per ``run``, x = training ``step`` (results: dicts with run, step, ...).

    The y axis shows plain values (no offset such as ``1e-17+2.099e-13``); a run with one step is a point.
    """
    return _save(metric_vs_step_figure(results, metrics, title, note), path, dpi=120)


def metric_vs_step_figure(
    results: Sequence[dict], metrics: Sequence[str] = ("fid", "sfid"), title: str = "", note: str = ""
):
    """The matplotlib figure of :func:`plot_metric_vs_step` (not saved)."""
    from matplotlib.ticker import ScalarFormatter

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    runs = sorted({r["run"] for r in results})
    for ax, metric in zip(axes[0], metrics):
        for run in runs:
            pts = sorted((r["step"], r[metric]) for r in results if r["run"] == run and metric in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=run)
        formatter = ScalarFormatter(useOffset=False, useMathText=True)
        formatter.set_powerlimits((-3, 4))
        ax.yaxis.set_major_formatter(formatter)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    full_title = _full_title(title, note)
    if full_title:
        fig.suptitle(full_title)
    fig.tight_layout()
    return fig
