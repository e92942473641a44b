"""Dataset wiring for U-REPA training: the cached SD15AlignedDataset, or a registered dataset factory.

``data.factory`` names an entry of :data:`DATASET_FACTORIES` (the repo's own factories), never a module
path: a YAML file cannot make the trainer import and call arbitrary code. A factory is called as
``factory(layers=<aligned layer names>, **data.factory_kwargs)`` and returns a dataset with
SD15AlignedDataset's item format. To add one, register it from Python before the trainer builds its data::

    from train.urepa.data import register_dataset_factory
    register_dataset_factory("my_data", make_my_dataset)

CFG label dropout is applied in the training loop (not in the dataset) with a generator seeded from the
step, so a resumed run drops exactly the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from datasets.synthetic_aligned import make_synthetic_aligned_dataset

# name -> function(layers=..., **factory_kwargs) -> dataset
DATASET_FACTORIES: dict[str, Callable[..., Any]] = {
    "synthetic_aligned": make_synthetic_aligned_dataset,  # random latents/tokens/prompts: smoke runs, tests
}


def register_dataset_factory(name: str, factory: Callable[..., Any]) -> None:
    """Make ``factory`` selectable as ``data.factory: <name>`` (an existing name is an error)."""
    if not name or ":" in name:
        raise ValueError(f"dataset factory names are plain words, got {name!r}")
    if name in DATASET_FACTORIES and DATASET_FACTORIES[name] is not factory:
        raise ValueError(f"dataset factory {name!r} is already registered ({DATASET_FACTORIES[name]})")
    DATASET_FACTORIES[name] = factory


def dataset_factory(name: str) -> Callable[..., Any]:
    """The registered factory ``name``, or an error listing the registered ones."""
    if name in DATASET_FACTORIES:
        return DATASET_FACTORIES[name]
    close = difflib.get_close_matches(name, list(DATASET_FACTORIES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    old = (
        " ('module:function' paths are no longer imported: register the function with "
        "train.urepa.data.register_dataset_factory)"
        if ":" in name
        else ""
    )
    raise ValueError(
        f"data.factory {name!r} is not a registered dataset factory{old}; {hint}registered: "
        f"{sorted(DATASET_FACTORIES)} (or null for the LMDB caches)"
    )


def load_clip_embeddings(path: str | os.PathLike) -> torch.Tensor:
    """The [K+1, 77, dim] prompt table (row -1 = null prompt) from a .pt/.pth or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP embeddings file not found: {path}. Build it with preprocessing/prepare_clip_embeddings.py"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        tensors = [v for k, v in obj.items() if torch.is_tensor(v) and v.ndim == 3]
        preferred = obj.get("embeddings")
        obj = preferred if torch.is_tensor(preferred) else (tensors[0] if len(tensors) == 1 else None)
    if not torch.is_tensor(obj) or obj.ndim != 3:
        raise ValueError(f"{path}: expected a [K+1, 77, dim] tensor (or a dict with 'embeddings')")
    return obj


def dataset_metadata(dataset: Any) -> dict[str, Any] | None:
    """DINO cache metadata of a built dataset (SD15AlignedDataset.dino.metadata, or ``.metadata``)."""
    dino = getattr(dataset, "dino", None)
    if dino is not None and hasattr(dino, "metadata"):
        return dict(dino.metadata)
    meta = getattr(dataset, "metadata", None)
    return dict(meta) if meta is not None else None


def embedding_table(dataset: Any, clip_path: str | os.PathLike | None) -> torch.Tensor:
    """[K+1, 77, dim] prompt table (null last) from the dataset, else from the file."""
    for attr in ("embeddings", "clip_embeddings"):
        table = getattr(dataset, attr, None)
        if torch.is_tensor(table):
            return table
    if clip_path is None:
        raise ValueError("no CLIP embedding table: set data.clip_embeddings")
    return load_clip_embeddings(clip_path)


def dino_cache_metadata(dino_dir: str | os.PathLike) -> dict[str, Any]:
    """Metadata record of the DINO token cache (encoder, D, grid, patch, resolution, dtype, count...)."""
    from datasets.lmdb_cache import LMDBCacheReader

    return dict(LMDBCacheReader(dino_dir).metadata)


def grid_from_metadata(meta: dict[str, Any]) -> tuple[int, int]:
    grid = meta["grid"]
    if isinstance(grid, int):
        return (grid, grid)
    return (int(grid[0]), int(grid[1]))


def build_dataset(
    data_cfg: dict[str, Any], align_layers: tuple[str, ...], D: int | None, seed: int = 0
) -> Any:
    """The training dataset. ``data.factory`` (a registered name, called with ``data.factory_kwargs``)
    replaces the cached dataset, e.g. for synthetic test data; otherwise SD15AlignedDataset."""
    layers = tuple(align_layers) or ("mid",)
    if data_cfg.get("factory"):
        return dataset_factory(data_cfg["factory"])(layers=layers, **(data_cfg.get("factory_kwargs") or {}))
    from datasets.sd15_aligned import SD15AlignedDataset

    expected = {"D": D} if D else None
    return SD15AlignedDataset(
        data_cfg["csv"],
        data_cfg["latent_dir"],
        data_cfg["dino_dir"],
        data_cfg["clip_embeddings"],
        cfg_dropout=0.0,  # done in the loop, reproducibly (see module docstring)
        expected=expected,
        layers=layers,
        seed=seed,
        on_bad_record=data_cfg["on_bad_record"],  # validated config: train/urepa/config_schema.py
        verify_checksums=data_cfg["verify_checksums"],
    )


def cfg_dropout_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor | None:
    """[n] bool, True where the prompt is replaced by the null prompt (probability p); None (no draw) if p <= 0."""
    if p <= 0:
        return None
    return torch.rand(n, generator=generator, device=generator.device) < p


def apply_cfg_dropout(
    encoder_hidden_states: torch.Tensor,
    null: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace each sample's prompt embedding by the null embedding with probability p (or where ``mask``)."""
    if mask is None:
        if generator is None:
            raise ValueError("apply_cfg_dropout needs a generator or a mask")
        mask = cfg_dropout_mask(encoder_hidden_states.shape[0], p, generator)
    if mask is None:
        return encoder_hidden_states
    drop = mask.to(encoder_hidden_states.device).view(-1, 1, 1)
    return torch.where(drop, null.to(encoder_hidden_states), encoder_hidden_states)
