"""U-REPA data-path benchmarks, measured side by side in one run.

1. Loader vs raw LMDB: `SD15AlignedDataset` (latent + DINO tokens + CLIP row + CFG draw, through a DataLoader)
   against raw sequential `txn.get` of the same two records per sample from the same shards. Records have the
   real sizes: latent [4, 64, 64] fp16 (32 KiB) and DINOv2 ViT-L tokens [256, 1024] fp16 (512 KiB). Target >= 0.8x.
   In the same interleaved rounds: the train_sd15.py loader with per-record checksum verification on and off
   (`--checksum` picks the caches' algorithm: xxh3_64, crc32). Target: checksums cost <= 5 %.
2. One-pass cache building vs model-only: `run_cache_job` (JPEG decode in DataLoader workers, both transforms,
   both encoders, LMDB commits) against the encoders alone on the same pre-decoded batches. Models have the real
   architectures with random weights (no weights needed): SD-1.5's AutoencoderKL and DINOv2 (`--dino_variant`).
   Target >= 0.9x.

    python script/bench/bench_urepa_data.py                       # both, CPU-sized defaults
    python script/bench/bench_urepa_data.py --skip_build --num_records 2000
    python script/bench/bench_urepa_data.py --skip_build --checksum crc32 --loader_workers 0
    python script/bench/bench_urepa_data.py --skip_build --loader_workers 0 --cpu_time   # on a shared machine
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import csv
import os
import random
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datasets.lmdb_cache import LMDBCacheReader
from datasets.lmdb_cache_format import DEFAULT_CHECKSUM, shared_readonly_env
from datasets.lmdb_cache_writer import LMDBCacheWriter
from datasets.sample_csv import read_sample_csv
from datasets.sd15_aligned import SD15AlignedDataset, make_batched_loader


def write_synthetic_caches(
    root: Path,
    n: int,
    latent_shape: tuple[int, int, int] = (4, 64, 64),
    dino_grid: tuple[int, int] = (16, 16),
    dino_dim: int = 1024,
    clip_shape: tuple[int, int, int] = (1001, 77, 768),
    checksum: str | None = DEFAULT_CHECKSUM,
) -> Path:
    """``n`` random samples in the U-REPA cache layout; the defaults are the real record sizes (SD-1.5 latents at
    512 px, DINOv2 ViT-L/14 tokens at 224 px, CLIP ViT-L text embeddings of 1000 classes + the null prompt)."""
    classes = clip_shape[0] - 1
    ids = [f"n{i % classes:08d}_{i}" for i in range(n)]
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "img_path", "class_id", "synset"])
        w.writerows([sid, f"{sid}.JPEG", i % classes, f"n{i % classes:08d}"] for i, sid in enumerate(ids))
    lat_meta = {
        "kind": "vae_latent",
        "encoder": "AutoencoderKL",
        "latent_shape": list(latent_shape),
        "shape": list(latent_shape),
        "content": "mean",
        "scaled": True,
        "scaling_factor": 0.18215,
        "dtype": "float16",
        "resolution": latent_shape[-1] * 8,
    }
    num_tokens = dino_grid[0] * dino_grid[1]
    dino_meta = {
        "kind": "dino_tokens",
        "encoder": "dinov2_vitl14",
        "D": dino_dim,
        "num_tokens": num_tokens,
        "grid": list(dino_grid),
        "shape": [num_tokens, dino_dim],
        "dtype": "float16",
        "normalized": True,
        "resolution": dino_grid[0] * 14,
        "patch": 14,
    }
    g = torch.Generator().manual_seed(0)
    with (
        LMDBCacheWriter(root / "lat", lat_meta, commit_every=64, checksum=checksum) as lw,
        LMDBCacheWriter(root / "dino", dino_meta, commit_every=64, checksum=checksum) as dw,
    ):
        for sid in ids:
            lw.put(sid, torch.randn(*latent_shape, generator=g).half())
            tokens = torch.randn(num_tokens, dino_dim, generator=g)
            dw.put(sid, torch.nn.functional.normalize(tokens, dim=-1).half())
    clip = torch.randn(*clip_shape, generator=g).half()  # seeded like the rest: the same caches every time
    torch.save({"embeddings": clip, "null_index": classes}, root / "clip.pt")
    return root


def raw_sequential(root: Path, ids: list[str], batch_size: int, keep_batch: bool) -> float:
    """samples/s of reading both records of every id, in CSV order, as bytes (`txn.get`).

    keep_batch=False drops each record right away (its buffer stays cache-hot: an upper bound no loader can
    reach, since a loader must hand over a whole batch); keep_batch=True holds a batch's records until the
    batch is complete, the least any loader has to do.
    """
    lat, dino = LMDBCacheReader(root / "lat"), LMDBCacheReader(root / "dino")
    lat_shard, dino_shard = lat.locate(ids), dino.locate(ids)
    lat_envs = [shared_readonly_env(p) for p in lat.shard_paths]
    dino_envs = [shared_readonly_env(p) for p in dino.shard_paths]
    start = CLOCK()
    batch: list[bytes] = []
    for sid, a, b in zip(ids, lat_shard, dino_shard):
        key = sid.encode()
        with lat_envs[a].begin() as txn:
            x = txn.get(key)
        with dino_envs[b].begin() as txn:
            y = txn.get(key)
        if keep_batch:
            batch += [x, y]
            if len(batch) == 2 * batch_size:
                batch = []
    return len(ids) / (CLOCK() - start)


TRAIN_LOADER = "make_batched_loader(compact=True)"


# Wall time by default; --cpu_time: CPU time of the main thread (torch on 1 thread), which other processes on a
# shared machine disturb far less (meaningful with 0 loader workers only: workers' time is not counted).
CLOCK = time.perf_counter


def loader_rate(loader: DataLoader) -> float:
    start = CLOCK()
    n = 0
    for batch in loader:
        n += batch["latent"].shape[0]
    return n / (CLOCK() - start)


def bench_loader(args: argparse.Namespace, work: Path) -> None:
    root = work / "loader"
    root.mkdir()
    t = time.perf_counter()
    write_synthetic_caches(root, args.num_records, checksum=args.checksum)
    print(
        f"wrote {args.num_records} synthetic records (latent 32 KiB + tokens 512 KiB each, checksum "
        f"{args.checksum}) in {time.perf_counter() - t:.1f} s"
    )
    ids = [r.id for r in read_sample_csv(root / "train.csv")]
    ds = SD15AlignedDataset(
        root / "train.csv", root / "lat", root / "dino", root / "clip.pt", cfg_dropout=0.1
    )
    # the same caches with checksums verified on every read / never (lengths are always checked); `ds` above
    # verifies each sample once per run (the default), so from the second round on it is in steady state
    variants = {
        mode: SD15AlignedDataset(
            root / "train.csv",
            root / "lat",
            root / "dino",
            root / "clip.pt",
            cfg_dropout=0.1,
            verify_checksums=mode,
        )
        for mode in ("always", "off")
    }
    bs = args.batch_size
    raw_sequential(root, ids, bs, False)  # warm the page cache for both sides
    for _batch in make_batched_loader(ds, bs, shuffle=False, drop_last=False, compact=True, num_workers=0):
        pass  # verify_checksums=once: every sample verified before the rounds (steady state)
    loaders = {}
    for workers in args.loader_workers:
        kw = {"num_workers": workers, "prefetch_factor": 4 if workers else None}
        loaders[("DataLoader + default collate", workers)] = DataLoader(
            ds, batch_size=bs, shuffle=False, **kw
        )
        loaders[("make_batched_loader", workers)] = make_batched_loader(
            ds, bs, shuffle=False, drop_last=False, **kw
        )
        loaders[(f"{TRAIN_LOADER}, as train_sd15.py (verify_checksums=once)", workers)] = make_batched_loader(
            ds, bs, shuffle=False, drop_last=False, compact=True, **kw
        )
        for mode, variant in variants.items():
            loaders[(f"{TRAIN_LOADER}, verify_checksums={mode}", workers)] = make_batched_loader(
                variant, bs, shuffle=False, drop_last=False, compact=True, **kw
            )
    # Rounds: each round measures the raw reads and every loader once, so drifts in machine load and memory
    # state hit all of them alike; medians over the rounds are reported.
    runs: dict = {"drop": [], "keep": [], **{k: [] for k in loaders}}
    for round_ in range(args.repeats):
        runs["drop"].append(raw_sequential(root, ids, bs, False))
        runs["keep"].append(raw_sequential(root, ids, bs, True))
        order = list(loaders)
        random.Random(round_).shuffle(order)  # no loader always runs right after the same one
        for key in order:
            runs[key].append(loader_rate(loaders[key]))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    raw_drop, raw_keep = med["drop"], med["keep"]
    print(
        "\n## Loader vs raw sequential LMDB reads (same records, page cache warm, batch "
        f"{bs}, {args.num_records} samples, median of {args.repeats} interleaved rounds)"
    )
    print(
        f"raw reads, record dropped at once: {raw_drop:.0f} samples/s; raw reads, batch held: {raw_keep:.0f} "
        f"samples/s (rounds: {[round(x) for x in runs['keep']]})"
    )
    print("| loader | workers | samples/s | vs raw (batch held) | vs raw (dropped at once) |")
    print("|---|---|---|---|---|")
    for (name, workers), got in ((k, med[k]) for k in loaders):
        print(f"| {name} | {workers} | {got:.0f} | {got / raw_keep:.2f}x | {got / raw_drop:.2f}x |")
    print(
        f"\n## Checksum cost ({args.checksum}) in the train_sd15.py loader, against verify_checksums=off: same "
        "rounds, medians; 'paired' = median over rounds of (1 - rate/rate_off) measured back to back. 'once' is "
        "the steady state after each sample was verified (round 1 verified them); 'always' = the first epoch"
    )
    print("| workers | off (samples/s) | once | cost | paired | always | cost | paired |")
    print("|---|---|---|---|---|---|---|---|")
    for workers in args.loader_workers:
        off = runs[(f"{TRAIN_LOADER}, verify_checksums=off", workers)]
        row = [f"{workers}", f"{np.median(off):.0f}"]
        for mode in ("as train_sd15.py (verify_checksums=once)", "verify_checksums=always"):
            on = runs[(f"{TRAIN_LOADER}, {mode}", workers)]
            paired = float(np.median([1 - a / b for a, b in zip(on, off)]))
            row += [
                f"{np.median(on):.0f}",
                f"{100 * (1 - np.median(on) / np.median(off)):.1f} %",
                f"{100 * paired:.1f} %",
            ]
        print("| " + " | ".join(row) + " |")


def write_jpegs(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        # ImageNet-typical 500x375 photo-like JPEG (smooth noise, so it compresses like a photo)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        path = root / f"img_{i}.JPEG"
        img.save(path, quality=90)
        rows.append([f"img_{i}", str(path), 0, "n0"])
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "img_path", "class_id", "synset"])
        w.writerows(rows)
    return root / "train.csv"


def bench_build(args: argparse.Namespace, work: Path) -> None:
    from diffusers import AutoencoderKL

    from models.dinov2_encoder import DINOv2Encoder
    from preprocessing.cache_jobs import (
        DecodedImages,
        DinoTokenEncoder,
        VAELatentEncoder,
        collate_images,
        run_cache_job,
    )

    root = work / "build"
    root.mkdir()
    csv_path = write_jpegs(root, args.num_images)
    rows = read_sample_csv(csv_path)
    torch.manual_seed(0)
    vae = AutoencoderKL(  # SD-1.5's vae/config.json
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    vae_enc = VAELatentEncoder("sd15-random-weights", resolution=args.vae_resolution, vae=vae)
    dino = DINOv2Encoder(variant=args.dino_variant, resolution=args.dino_resolution, input_range="0_1")
    dino_enc = DinoTokenEncoder(
        "random-weights", variant=args.dino_variant, resolution=args.dino_resolution, encoder=dino
    )
    encoders = [vae_enc, dino_enc]

    # model-only: the same batches, decoded and transformed beforehand
    decoded = DecodedImages(rows, root, [e.transform for e in encoders])
    batches = [
        collate_images([decoded[j] for j in range(i, min(i + args.build_batch, len(rows)))])
        for i in range(0, len(rows), args.build_batch)
    ]
    for e, x in zip(encoders, batches[0].images):  # warm-up
        e.encode(x[:2])
    start = time.perf_counter()
    for b in batches:
        for e, x in zip(encoders, b.images):
            e.encode(x)
    model_rate = len(rows) / (time.perf_counter() - start)

    writers = [LMDBCacheWriter(root / name, e.metadata) for name, e in (("lat", vae_enc), ("dino", dino_enc))]
    start = time.perf_counter()
    run_cache_job(
        rows,
        list(zip(encoders, writers)),
        root,
        batch_size=args.build_batch,
        num_workers=args.build_workers,
        show_progress=False,
    )
    job_rate = len(rows) / (time.perf_counter() - start)
    print(
        f"\n## One-pass cache building vs model-only ({args.num_images} JPEGs 500x375; VAE SD-1.5 architecture at "
        f"{args.vae_resolution} px, DINOv2 {args.dino_variant} at {args.dino_resolution} px, random weights, "
        f"batch {args.build_batch}, {args.build_workers} decode workers)"
    )
    print("| model-only (img/s) | one-pass build_caches job (img/s) | ratio (target >= 0.9) |")
    print("|---|---|---|")
    print(f"| {model_rate:.2f} | {job_rate:.2f} | {job_rate / model_rate:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--num_records", type=int, default=1000, help="Synthetic cache records for the loader bench."
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Loader batch size.")
    parser.add_argument(
        "--loader_workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers to try."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Repeats per measurement (median reported).")
    parser.add_argument(
        "--checksum",
        choices=["xxh3_64", "crc32"],
        default=DEFAULT_CHECKSUM,
        help="Per-record checksum of the loader bench's caches (on/off compared in the same rounds).",
    )
    parser.add_argument("--num_images", type=int, default=32, help="JPEGs for the cache-building bench.")
    parser.add_argument("--build_batch", type=int, default=8, help="Encoder batch size in the build bench.")
    parser.add_argument("--build_workers", type=int, default=1, help="Decode workers in the build bench.")
    parser.add_argument("--vae_resolution", type=int, default=256, help="VAE input side in the build bench.")
    parser.add_argument("--dino_variant", default="vitb14", help="DINOv2 architecture in the build bench.")
    parser.add_argument(
        "--dino_resolution", type=int, default=224, help="DINO input side in the build bench."
    )
    parser.add_argument(
        "--cpu_time",
        action="store_true",
        help="Time the loader bench in CPU time of the main thread, torch on 1 thread (shared machines; use "
        "--loader_workers 0).",
    )
    parser.add_argument("--skip_loader", action="store_true")
    parser.add_argument("--skip_build", action="store_true")
    parser.add_argument(
        "--workdir", default=None, help="Scratch directory (default: a temporary one, removed)."
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.cpu_time else time.perf_counter
    # --cpu_time counts this thread only: keep torch's work on it (no intra-op threads)
    torch.set_num_threads(1 if args.cpu_time else max(1, os.cpu_count() or 1))
    work = Path(tempfile.mkdtemp(prefix="bench_urepa_", dir=args.workdir))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, scratch {work}, "
        f"load average {os.getloadavg()[0]:.1f} (other processes share these CPUs)"
    )
    try:
        if not args.skip_loader:
            bench_loader(args, work)
        if not args.skip_build:
            bench_build(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
