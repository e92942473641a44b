"""Shared machinery of the image -> LMDB cache builders (VAE latents, DINOv2 tokens, or both in one pass).

A job reads the sample CSV (`id,img_path,class_id,synset`), keeps its part (`rows[shard_index::num_shards]`),
drops ids every target cache already holds (resume), decodes each remaining image once in DataLoader workers,
applies each target's transform to the same decoded picture, runs the encoders batch by batch and commits each
batch to each target's cache. Unreadable images are logged, recorded in the cache metadata and counted in the
summary. See docs/urepa_preprocessing.md.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from datasets.lmdb_cache_format import estimate_cache_bytes, format_bytes, record_nbytes
from datasets.lmdb_cache_writer import LMDBCacheWriter
from datasets.sample_csv import SampleRow, read_sample_csv
from utils.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_IMAGE_SIZE, UnreadableImageError, read_image
from utils.logging import get_logger, progress
from utils.weights import SD15_LOCAL_DIR, MissingWeightsError, resolve_hf_path, sd15_how_to_get

logger = get_logger("preprocessing")

SD15_HOW_TO_GET = sd15_how_to_get()
MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_image_path(row: SampleRow, image_root: Path) -> Path:
    p = Path(row.img_path)
    return p if p.is_absolute() else image_root / p


# ------------------------------------------------------------------------------------------- job sharding
def default_shard() -> tuple[int, int]:
    """(num_shards, shard_index) from `accelerate launch` / torchrun (WORLD_SIZE, RANK), else (1, 0)."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def select_shard(rows: Sequence[SampleRow], num_shards: int, shard_index: int) -> list[SampleRow]:
    """Every num_shards-th row starting at shard_index: K jobs cover every row exactly once."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= --shard_index < --num_shards, got {shard_index} and {num_shards}")
    return list(rows[shard_index::num_shards])


def writer_id(num_shards: int, shard_index: int) -> str:
    return f"part{shard_index:03d}-of-{num_shards:03d}"


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------ encoders
def vae_transform(resolution: int) -> Callable:
    """Shorter side to `resolution` (bicubic, antialiased by PIL), center crop, [-1, 1]."""
    return transforms.Compose(
        [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def dino_resize_for(resolution: int) -> int:
    """The official eval transform's resize for a crop of `resolution` (224 -> 256)."""
    return int(round(resolution * 256 / 224))


def dino_transform(resolution: int) -> Callable:
    """DINOv2's eval transform up to ToTensor: Resize(256, bicubic), CenterCrop(224), [0, 1].

    The ImageNet mean/std normalisation is applied by the adapter (input_range "0_1"); the crop already has the
    adapter's resolution, so the adapter does not resize again.
    """
    return transforms.Compose(
        [
            transforms.Resize(
                dino_resize_for(resolution), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
        ]
    )


class CacheEncoder:
    """What a cache target needs: a name, an image transform, a batch encoder and the cache metadata."""

    name: str
    transform: Callable
    metadata: dict[str, Any]

    @property
    def record_shape(self) -> tuple[int, ...]:
        return tuple(self.metadata["shape"])

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def resolve_vae_dir(name_or_path: str, subfolder: str = "vae") -> tuple[Path, str | None]:
    """(pipeline-or-vae directory, subfolder or None) for AutoencoderKL.from_pretrained, offline."""
    root = resolve_hf_path(name_or_path, "Stable Diffusion VAE", SD15_HOW_TO_GET)
    if subfolder and (root / subfolder / "config.json").is_file():
        vae_dir, sub = root / subfolder, subfolder
    elif (root / "config.json").is_file():
        vae_dir, sub = root, None
    else:
        raise MissingWeightsError(
            f"Stable Diffusion VAE not found: neither {root / subfolder / 'config.json'} nor {root / 'config.json'} "
            f"exists. {SD15_HOW_TO_GET}"
        )
    weights = [
        f
        for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
        if (vae_dir / f).is_file()
    ]
    if not weights:
        raise MissingWeightsError(
            f"Stable Diffusion VAE weights not found: {vae_dir} has config.json but no "
            f"diffusion_pytorch_model.safetensors (or .bin). {SD15_HOW_TO_GET}"
        )
    return root, sub


class VAELatentEncoder(CacheEncoder):
    """SD VAE posterior of a [-1, 1] image, stored *scaled*: ``(mean - shift) * scaling_factor`` -- what the
    U-Net consumes. With ``store_moments`` the record is ``[2, C, h, w]`` = (scaled mean, scaled std), so a
    latent sample ``mean + std * eps`` is already scaled too."""

    name = "latent"

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        resolution: int = 512,
        dtype: str = "float16",
        store_moments: bool = False,
        subfolder: str = "vae",
        device: torch.device | str = "cpu",
        model_dtype: str = "float32",
        vae: Any = None,
    ) -> None:
        self.device = torch.device(device)
        self.model_dtype = MODEL_DTYPES[model_dtype]
        if vae is None:  # `vae` is for benchmarks with random weights; real runs load the pipeline's VAE
            from diffusers import AutoencoderKL

            root, sub = resolve_vae_dir(pretrained_model_name_or_path, subfolder)
            vae = AutoencoderKL.from_pretrained(str(root), subfolder=sub, torch_dtype=self.model_dtype)
        else:
            root, sub = Path(pretrained_model_name_or_path), None
            vae = vae.to(self.model_dtype)
        self.vae = vae.to(self.device).eval()
        self.vae.requires_grad_(False)
        cfg = self.vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if resolution % factor:
            raise ValueError(
                f"--resolution {resolution} must be a multiple of the VAE downsampling factor {factor}"
            )
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.store_moments = store_moments
        self.transform = vae_transform(resolution)
        side = resolution // factor
        latent = [int(cfg.latent_channels), side, side]
        self.metadata = {
            "kind": "vae_latent",
            "encoder": "AutoencoderKL",
            "vae_path": str(Path(root).resolve() / (sub or "")),
            "resolution": resolution,
            "transform": f"resize shorter side {resolution} bicubic, center crop {resolution}, [-1, 1]",
            "latent_shape": latent,
            "shape": [2, *latent] if store_moments else latent,
            "content": "mean_std" if store_moments else "mean",
            "moments": store_moments,
            "scaled": True,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "dtype": dtype,
        }
        self.out_dtype = MODEL_DTYPES[dtype]

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images.to(self.device, self.model_dtype)).latent_dist
        mean = (posterior.mean.float() - self.shift_factor) * self.scaling_factor
        if not self.store_moments:
            return mean.to(self.out_dtype).cpu()
        std = posterior.std.float() * self.scaling_factor
        return torch.stack([mean, std], dim=1).to(self.out_dtype).cpu()


def _describe_source(weights: str | None) -> str:
    """Weights recorded in the metadata: an absolute path for local files (a resume from another working
    directory must not look like a different encoder), the hub id otherwise."""
    if weights is None:
        return "torch.hub cache"
    path = Path(weights).expanduser()
    return str(path.resolve()) if path.exists() else str(weights)


class DinoTokenEncoder(CacheEncoder):
    """L2-normalised final-LayerNorm patch tokens of DINOv2 (registers excluded), through the repo adapter."""

    name = "dino"

    def __init__(
        self,
        weights: str | None,
        variant: str = "vitl14",
        resolution: int = 224,
        dtype: str = "float16",
        device: torch.device | str = "cpu",
        model_dtype: str = "float32",
        encoder: Any = None,
    ) -> None:
        from models.dinov2_encoder import DINOv2Encoder

        self.device = torch.device(device)
        self.model_dtype = MODEL_DTYPES[model_dtype]
        if encoder is None:
            encoder = DINOv2Encoder.from_pretrained(
                weights, variant=variant, resolution=resolution, input_range="0_1"
            )
        self.encoder = encoder.to(self.device, self.model_dtype).eval()
        grid = list(self.encoder.grid_size(resolution))
        n, d = grid[0] * grid[1], int(self.encoder.embed_dim)
        self.transform = dino_transform(resolution)
        self.metadata = {
            "kind": "dino_tokens",
            "encoder": f"dinov2_{variant}",
            "variant": variant,
            "weights": _describe_source(weights),
            "resolution": resolution,
            "resize": dino_resize_for(resolution),
            "transform": (
                f"resize shorter side {dino_resize_for(resolution)} bicubic, center crop {resolution}, "
                "ImageNet mean/std"
            ),
            "patch": int(self.encoder.patch_size),
            "grid": grid,
            "num_tokens": n,
            "D": d,
            "num_register_tokens": int(self.encoder.num_register_tokens),
            "layer": "final_norm",
            "normalized": True,
            "shape": [n, d],
            "dtype": dtype,
        }
        self.out_dtype = MODEL_DTYPES[dtype]

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(images.to(self.device, self.model_dtype)).patch_tokens
        # normalise in fp32: the norm of a bf16/fp16 token can overflow or lose the unit length
        return F.normalize(tokens.float(), dim=-1).to(self.out_dtype).cpu()


# -------------------------------------------------------------------------------------------- image loading
class DecodedImages(Dataset):
    """Decode each image once and apply every target's transform; unreadable files come back as reasons
    (missing, not an image, truncated, unsupported mode, more than ``max_pixels`` pixels, a shorter side below
    ``min_size``), each naming the file."""

    def __init__(
        self,
        rows: Sequence[SampleRow],
        image_root: Path,
        image_transforms: Sequence[Callable],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int = DEFAULT_MIN_IMAGE_SIZE,
    ) -> None:
        self.rows = list(rows)
        self.image_root = Path(image_root)
        self.image_transforms = list(image_transforms)
        self.max_pixels = int(max_pixels)
        self.min_size = int(min_size)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[str, tuple[torch.Tensor, ...] | None, str]:
        row = self.rows[index]
        path = resolve_image_path(row, self.image_root)
        try:
            image = read_image(path, "RGB", self.max_pixels, self.min_size)
        except UnreadableImageError as err:
            return row.id, None, str(err)
        return row.id, tuple(t(image) for t in self.image_transforms), ""


@dataclass
class ImageBatch:
    ids: list[str]
    images: list[torch.Tensor]  # one stacked tensor per target
    corrupt: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids) + len(self.corrupt)


def collate_images(items: list[tuple[str, tuple[torch.Tensor, ...] | None, str]]) -> ImageBatch:
    good = [(i, t) for i, t, _ in items if t is not None]
    corrupt = [(i, r) for i, t, r in items if t is None]
    ids = [i for i, _ in good]
    images = [torch.stack(parts) for parts in zip(*(t for _, t in good))] if good else []
    return ImageBatch(ids, images, corrupt)


# ------------------------------------------------------------------------------------------------- the job
@dataclass
class TargetStats:
    name: str
    path: Path
    written: int = 0
    already_cached: int = 0
    corrupt: int = 0


def print_storage_estimate(encoders: Sequence[CacheEncoder], total_rows: int, job_rows: int) -> None:
    for enc in encoders:
        shape, dtype = enc.metadata["shape"], enc.metadata["dtype"]
        per = record_nbytes(shape, dtype)
        print(
            f"[{enc.name}] record {shape} {dtype} = {format_bytes(per)}; whole CSV ({total_rows} images): "
            f"~{format_bytes(estimate_cache_bytes(total_rows, shape, dtype))} on disk; this job "
            f"({job_rows} images): ~{format_bytes(estimate_cache_bytes(job_rows, shape, dtype))}",
            flush=True,
        )


def run_cache_job(
    rows: Sequence[SampleRow],
    targets: Sequence[tuple[CacheEncoder, LMDBCacheWriter]],
    image_root: Path,
    batch_size: int = 32,
    num_workers: int = 4,
    desc: str = "caching",
    show_progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_IMAGE_SIZE,
) -> list[TargetStats]:
    """Fill every target cache for ``rows`` (already this job's shard); returns per-target statistics.

    Unreadable images (``max_pixels``: the decompression-bomb limit; ``min_size``: the smallest shorter side)
    are skipped, counted and listed in each cache's metadata (``corrupt``); they are retried on the next run.

    Batches are fixed slices of ``rows`` (``rows[k*batch_size:(k+1)*batch_size]``), whether or not a run was
    interrupted: a resumed build encodes every image in the same batch as an uninterrupted build (batched
    convolution kernels may round differently with other batch neighbours or sizes) and so writes the same
    bytes. A slice holding any missing record is encoded whole; only the missing records are written."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if max_pixels < 1:
        raise ValueError(f"--max_image_pixels must be >= 1, got {max_pixels}")
    if min_size < 1:
        raise ValueError(f"--min_image_size must be >= 1, got {min_size}")
    rows = list(rows)
    stats = [TargetStats(enc.name, w.path) for enc, w in targets]
    needed = []
    for row in rows:
        missing = [not w.has(row.id) for _, w in targets]
        for s, m in zip(stats, missing):
            s.already_cached += int(not m)
        needed.append(any(missing))
    slices = [range(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size)]
    batches = [list(sl) for sl in slices if any(needed[i] for i in sl)]
    todo = [i for b in batches for i in b]
    if sum(needed) < len(rows):
        print(
            f"resuming: {len(rows) - sum(needed)} of {len(rows)} images are already in every cache",
            flush=True,
        )
    dataset = DecodedImages(rows, image_root, [enc.transform for enc, _ in targets], max_pixels, min_size)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    start = time.perf_counter()
    bar = progress(total=len(todo), desc=desc, unit="img", disable=not show_progress)
    for batch in loader:
        for t, ((enc, writer), s) in enumerate(zip(targets, stats)):
            sel = [i for i, sid in enumerate(batch.ids) if not writer.has(sid)]
            if sel:
                out = enc.encode(batch.images[t])  # the whole slice: the same batch as an uninterrupted build
                for i in sel:
                    writer.put(batch.ids[i], out[i])
                s.written += len(sel)
            for sid, reason in batch.corrupt:
                if not writer.has(sid):
                    writer.mark_corrupt(sid, reason)
                    s.corrupt += 1
            writer.commit()
        for sid, reason in batch.corrupt:
            logger.warning("skipping unreadable image %s (%s)", sid, reason)
        bar.update(len(batch))
    bar.close()
    elapsed = time.perf_counter() - start
    rate = len(todo) / elapsed if elapsed > 0 else float("nan")
    for (_, writer), s in zip(targets, stats):
        meta = writer.close()
        print(
            f"[{s.name}] {s.path}: wrote {s.written}, already cached {s.already_cached}, unreadable {s.corrupt} "
            f"(cache total: {meta['count']} records, {meta['num_corrupt']} unreadable ids listed in "
            f"{s.path / 'metadata.json'})",
            flush=True,
        )
    print(f"{len(todo)} images in {elapsed:.1f} s ({rate:.2f} img/s)", flush=True)
    return stats


# ------------------------------------------------------------------------------------------------- argparse
def add_job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="Sample CSV (id,img_path,class_id,synset).")
    parser.add_argument(
        "--image_root",
        default=None,
        help="Base directory of relative img_path entries (default: the CSV's directory).",
    )
    parser.add_argument(
        "--batch_size", type=int, default=32, help="Images per encoder batch (and per commit)."
    )
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader workers decoding images.")
    parser.add_argument(
        "--num_shards",
        type=int,
        default=None,
        help="Split the CSV over this many parallel jobs (default: WORLD_SIZE under accelerate/torchrun, else 1).",
    )
    parser.add_argument(
        "--shard_index",
        type=int,
        default=None,
        help="Which part this job does, 0-based (default: RANK, else 0).",
    )
    parser.add_argument("--shard_size", type=int, default=10000, help="Records per LMDB shard.")
    parser.add_argument(
        "--limit", type=int, default=None, help="Only the first N rows of the CSV (smoke tests)."
    )
    parser.add_argument(
        "--device", default=None, help="Torch device (default: cuda:LOCAL_RANK if available, else cpu)."
    )
    parser.add_argument(
        "--model_dtype",
        choices=sorted(MODEL_DTYPES),
        default="float32",
        help="Compute dtype of the encoders (bfloat16/float16 are faster on GPUs; outputs are stored in --dtype).",
    )
    parser.add_argument(
        "--max_image_pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="Images whose header claims more pixels are skipped, counted and listed as unreadable "
        f"(decompression-bomb guard; default {DEFAULT_MAX_PIXELS:,}, PIL's own limit).",
    )
    parser.add_argument(
        "--min_image_size",
        type=int,
        default=DEFAULT_MIN_IMAGE_SIZE,
        help="Images whose shorter side has fewer pixels are skipped, counted and listed as unreadable with "
        f"their path (upscaled they would be nearly flat; default {DEFAULT_MIN_IMAGE_SIZE}).",
    )
    parser.add_argument("--no_progress", action="store_true", help="Disable the progress bar.")


def add_vae_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=SD15_LOCAL_DIR,
        help="SD-1.5 pipeline directory (or a hub id in the local HF cache); the VAE is read from its "
        "`vae/` subfolder, or from the directory itself if it is a VAE directory.",
    )
    parser.add_argument(
        "--vae_subfolder", default="vae", help="Subfolder of the VAE in the pipeline directory."
    )
    parser.add_argument(
        f"--{prefix}resolution",
        type=int,
        default=512,
        help="Resize + center-crop side for the VAE (512 -> latent 64x64).",
    )
    parser.add_argument(
        f"--{prefix}dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="Stored latent dtype.",
    )
    parser.add_argument(
        "--store_moments",
        action="store_true",
        help="Store the posterior (mean, std) as [2,4,h,w] so training can sample; default: the mean only.",
    )


def add_dino_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(
        "--dinov2_weights",
        default=None,
        help="DINOv2 weights: official .pth file, HF directory, HF hub id in the local cache, or omitted for the "
        "torch.hub cache ($TORCH_HOME/hub/checkpoints/dinov2_vitl14_pretrain.pth).",
    )
    parser.add_argument(
        "--variant", default="vitl14", help="DINOv2 variant (vits14, vitb14, vitl14, vitg14, *_reg)."
    )
    parser.add_argument(
        f"--{prefix}resolution",
        type=int,
        default=224,
        help="DINO crop side, a multiple of 14 (resize = round(res*256/224)); 224 -> 16x16 = 256 tokens.",
    )
    parser.add_argument(
        f"--{prefix}dtype",
        choices=["float16", "bfloat16", "float32"],
        default="float16",
        help="Stored token dtype.",
    )


def vae_encoder(args: argparse.Namespace, device: torch.device, prefix: str = "") -> VAELatentEncoder:
    """The VAE-latent encoder that the flags of :func:`add_vae_args` (same ``prefix``) describe."""
    return VAELatentEncoder(
        args.pretrained_model_name_or_path,
        resolution=getattr(args, f"{prefix}resolution"),
        dtype=getattr(args, f"{prefix}dtype"),
        store_moments=args.store_moments,
        subfolder=args.vae_subfolder,
        device=device,
        model_dtype=args.model_dtype,
    )


def dino_encoder(args: argparse.Namespace, device: torch.device, prefix: str = "") -> DinoTokenEncoder:
    """The DINOv2-token encoder that the flags of :func:`add_dino_args` (same ``prefix``) describe."""
    return DinoTokenEncoder(
        args.dinov2_weights,
        variant=args.variant,
        resolution=getattr(args, f"{prefix}resolution"),
        dtype=getattr(args, f"{prefix}dtype"),
        device=device,
        model_dtype=args.model_dtype,
    )


@dataclass(frozen=True)
class CacheKind:
    """One cache of the single-cache CLIs: its flags, its encoder, what its --output_dir holds."""

    label: str
    add_args: Callable[[argparse.ArgumentParser], None]
    make_encoder: Callable[[argparse.Namespace, torch.device], CacheEncoder]
    output_help: str


CACHE_KINDS = {
    "vae": CacheKind(
        label="VAE latents",
        add_args=add_vae_args,
        make_encoder=vae_encoder,
        output_help="Latent cache directory (LMDB shards + metadata.json).",
    ),
    "dino": CacheKind(
        label="DINOv2 tokens",
        add_args=add_dino_args,
        make_encoder=dino_encoder,
        output_help="Token cache directory (LMDB shards + metadata.json).",
    ),
}


def single_cache_parser(kind: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_job_args(parser)
    parser.add_argument("--output_dir", required=True, help=CACHE_KINDS[kind].output_help)
    CACHE_KINDS[kind].add_args(parser)
    return parser


def single_cache_main(kind: str, description: str, argv: list[str] | None = None) -> list[TargetStats]:
    """``main`` of encode_vae_latents.py (``kind="vae"``) and build_dino_cache.py (``"dino"``): one cache
    into --output_dir (build_caches.py builds both in one pass, from the same encoders and flags)."""
    spec = CACHE_KINDS[kind]
    args = single_cache_parser(kind, description).parse_args(argv)
    return run_cli_job(args, lambda device: [(spec.make_encoder(args, device), args.output_dir)], spec.label)


def job_rows(args: argparse.Namespace) -> tuple[list[SampleRow], list[SampleRow], int, int, Path]:
    """(all rows, this job's rows, num_shards, shard_index, image_root) from the common flags."""
    rows = read_sample_csv(args.csv)
    if args.limit is not None:
        rows = rows[: args.limit]
    env_shards, env_index = default_shard()
    num_shards = args.num_shards if args.num_shards is not None else env_shards
    shard_index = args.shard_index if args.shard_index is not None else env_index
    mine = select_shard(rows, num_shards, shard_index)
    image_root = Path(args.image_root) if args.image_root else Path(args.csv).resolve().parent
    return rows, mine, num_shards, shard_index, image_root


def resolve_device(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device) if args.device else default_device()


def run_cli_job(
    args: argparse.Namespace, make_encoders: Callable[[torch.device], list[tuple[Any, str]]], label: str
) -> list[TargetStats]:
    """What every cache CLI does once its flags are parsed: pick this job's rows, build the encoders
    (``make_encoders(device) -> [(encoder, output_dir)]``), print the storage estimate, open one writer per
    cache and run the job."""
    from utils.cli import USER_ERRORS, raise_if_problems

    problems: list[
        str | BaseException
    ] = []  # the CSV and the weights are both checked, then reported together
    try:
        rows, mine, num_shards, shard_index, image_root = job_rows(args)
    except (*USER_ERRORS, ValueError) as err:
        problems.append(err if isinstance(err, USER_ERRORS) else f"{args.csv}: {err}")
    try:
        encoders = make_encoders(resolve_device(args))
    except USER_ERRORS as err:
        problems.append(err)
    raise_if_problems(problems)
    print_storage_estimate([e for e, _ in encoders], len(rows), len(mine))
    wid = writer_id(num_shards, shard_index)
    targets = [
        (e, LMDBCacheWriter(d, e.metadata, shard_size=args.shard_size, writer_id=wid)) for e, d in encoders
    ]
    return run_cache_job(
        mine,
        targets,
        image_root,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        desc=f"{label} [{shard_index + 1}/{num_shards}]",
        show_progress=not args.no_progress,
        max_pixels=args.max_image_pixels,
        min_size=args.min_image_size,
    )
