"""Synthetic U-REPA data for the tests: the in-memory dataset (datasets/synthetic_aligned.py, factory
``synthetic_aligned``) and the same samples written as real LMDB caches."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from datasets.synthetic_aligned import SyntheticAlignedDataset, make_synthetic_aligned_dataset

# the synthetic dataset lives in the repo (the registered ``synthetic_aligned`` factory); the old names stay
FakeAlignedDataset = SyntheticAlignedDataset
make_dataset = make_synthetic_aligned_dataset


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
