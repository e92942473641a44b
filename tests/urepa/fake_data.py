"""Synthetic stand-in for SD15AlignedDataset (same item format), used through ``data.factory``."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
import torch.nn.functional as F


class FakeAlignedDataset(torch.utils.data.Dataset):
    """Deterministic random items: latent [4,s,s], L2-normalised DINO tokens, prompt embeddings, class id."""

    def __init__(
        self,
        layers=("mid",),
        n: int = 8,
        D: int = 64,
        grid=(2, 2),
        dim: int = 32,
        latent_size: int = 8,
        num_classes: int = 4,
        nan_indices=(),
        seed: int = 0,
    ):
        g = torch.Generator().manual_seed(seed)
        self.layers = tuple(layers)
        self.grid = tuple(grid)
        # fp16-representable values, so that LMDB caches of this data (write_lmdb_caches) hold it exactly
        self.latents = torch.randn(n, 4, latent_size, latent_size, generator=g).half().float()
        for i in nan_indices:
            self.latents[i, 0, 0, 0] = float("nan")
        self.tokens = F.normalize(torch.randn(n, grid[0] * grid[1], D, generator=g), dim=-1).half().float()
        self.clip_embeddings = torch.randn(num_classes + 1, 77, dim, generator=g).half().float()
        self.class_ids = torch.arange(n) % num_classes
        self.metadata = {"D": D, "grid": list(grid), "encoder": "fake", "count": n}

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        c = int(self.class_ids[i])
        return dict(
            latent=self.latents[i],
            dino_tokens={layer: self.tokens[i] for layer in self.layers},
            encoder_hidden_states=self.clip_embeddings[c],
            class_id=c,
        )


def make_dataset(layers=("mid",), **kwargs) -> FakeAlignedDataset:
    return FakeAlignedDataset(layers=layers, **kwargs)


def write_lmdb_caches(root: Path, **kwargs) -> dict[str, str]:
    """The same samples as ``FakeAlignedDataset(**kwargs)``, written as the real caches (CSV, latent and DINO
    LMDBs, CLIP embeddings file) that SD15AlignedDataset reads; returns the ``data.*`` config entries."""
    from datasets.lmdb_cache import LMDBCacheWriter

    ds = FakeAlignedDataset(**kwargs)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"n{int(c):08d}_{i}" for i, c in enumerate(ds.class_ids)]
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "img_path", "class_id", "synset"])
        w.writerows([sid, f"/x/{sid}.JPEG", int(c), f"n{int(c):08d}"] for sid, c in zip(ids, ds.class_ids))
    s = ds.latents.shape[-1]
    n_tok, D = ds.tokens.shape[1:]
    lat_meta = {
        "kind": "vae_latent",
        "encoder": "AutoencoderKL",
        "latent_shape": [4, s, s],
        "shape": [4, s, s],
        "content": "mean",
        "scaled": True,
        "scaling_factor": 0.18215,
        "dtype": "float16",
        "resolution": 8 * s,
    }
    dino_meta = {
        "kind": "dino_tokens",
        "encoder": "fake",
        "D": int(D),
        "num_tokens": int(n_tok),
        "grid": list(ds.grid),
        "shape": [int(n_tok), int(D)],
        "dtype": "float16",
        "normalized": True,
        "resolution": 14 * ds.grid[0],
        "patch": 14,
    }
    with (
        LMDBCacheWriter(root / "latents", lat_meta, shard_size=5) as lw,
        LMDBCacheWriter(root / "dino", dino_meta, shard_size=5) as dw,
    ):
        for i, sid in enumerate(ids):
            lw.put(sid, ds.latents[i].half())
            dw.put(sid, ds.tokens[i].half())
    torch.save(
        {"embeddings": ds.clip_embeddings.half(), "null_index": ds.clip_embeddings.shape[0] - 1},
        root / "clip.pt",
    )
    return {
        "csv": str(root / "train.csv"),
        "latent_dir": str(root / "latents"),
        "dino_dir": str(root / "dino"),
        "clip_embeddings": str(root / "clip.pt"),
    }
