"""Evaluate U-REPA SD-1.5 checkpoints: EMA sampling with interval CFG, FID/sFID, alignment, side-by-side grids.

    python eval/evaluate_sd15.py --checkpoints outputs/sd15_repa_A/checkpoint-* \
        --baseline outputs/sd15_repa_ablation_lambda0/checkpoint-60000 \
        --ref_dir /data/ILSVRC/Data/CLS-LOC/val --num_ref 10000 --num_samples 10000 \
        --inception_path ~/weights/inception-2015-12-05.pt --out_dir outputs/eval_A

Writes to --out_dir: ``<run>/checkpoint-<step>.json`` (FID, sFID, settings), ``fid_vs_step.png`` over every JSON
there (aligned and baseline curves in one plot; eval/watch_sd15.py adds each new checkpoint while training runs),
``<run>/samples-<step>-<settings>/NNNNNN.png`` (the FID samples, each written as made, with per-batch Inception
features in ``features-*/``), ``grid_<run>_<step>.png`` and ``comparison_grid.png`` (fixed seeds, one labelled row per model, one
column per class), and with ``--align_csv ...``: ``alignment.json`` (SVCCA of U-Net mid features vs DINO tokens)
and ``tsne_<run>.png``. Every input (checkpoints, reference folder, caches, weights) is checked before any model
is loaded, and all missing ones are reported together (exit code 2).

Several GPUs / nodes: ``accelerate launch --config_file configs/accelerate/8gpu_ddp.yaml eval/evaluate_sd15.py ...``
shares the FID sampling and its Inception features out by fixed batches (eval/sharding.py): sample i's noise is
seeded by (seed, i), so 1 and N processes write the same files and the same FID; a killed job, run again with the
same flags, continues where it stopped. The statistics, FID/sFID, grids and alignment run once, on the main process.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import time
from typing import Any

import torch

from eval.fid import FEATURES, feature_stats, fid_from_stats, reference_stats, to_uint8_range
from eval.manifest import (
    base_model_record,
    evaluation_manifest,
    result_manifest_name,
    weights_record,
    write_manifest,
)
from eval.sharding import batches_for_this_process, fixed_batches, process_state, sample_device
from train.urepa.checkpoint import load_checkpoint_config, load_trainable
from train.urepa.sampling import SAMPLERS, decode_latents, make_scheduler, sample_latents
from train.urepa.setup import build_aligned_model, load_scheduler_config, load_unet, load_vae, resolve_sd_dir
from utils.checkpoint import atomic_write, checkpoint_step
from utils.cli import raise_if_problems, run_cli
from utils.figures import RANDOM_WEIGHTS_NOTE, plot_metric_vs_step, save_labelled_grid
from utils.logging import get_logger, progress

logger = get_logger("evaluate_sd15")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="*", default=[], help="train_sd15.py checkpoint directories.")
    p.add_argument(
        "--baseline", nargs="*", default=[], help="Baseline (lambda 0) checkpoints, evaluated the same way."
    )
    p.add_argument("--out_dir", required=True, help="Where JSON results, plots and grids go.")
    p.add_argument(
        "--pretrained", default=None, help="SD-1.5 dir/hub id; default: the one in the checkpoint config."
    )
    p.add_argument(
        "--use_live_weights", action="store_true", help="Evaluate the live weights instead of the EMA."
    )
    g = p.add_argument_group("sampling")
    g.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="dpmsolver++",
        help="dpmsolver++ (fast), ddim, pndm or ddpm (models/schedulers.py).",
    )
    g.add_argument(
        "--num_steps",
        type=int,
        default=25,
        help="Sampling steps (the seed's setting: --sampler ddpm --num_steps 250).",
    )
    g.add_argument(
        "--cfg_scale", type=float, default=7.5, help="Classifier-free guidance scale (<= 1 disables CFG)."
    )
    g.add_argument("--guidance_low", type=float, default=0.0, help="CFG only where guidance_low <= t/T ...")
    g.add_argument(
        "--guidance_high",
        type=float,
        default=0.7,
        help="... <= guidance_high (REPA's interval; 1.0 = everywhere).",
    )
    g.add_argument("--batch_size", type=int, default=16, help="Images per sampling batch.")
    g.add_argument("--seed", type=int, default=0, help="Seed of the sampling noise (same for every model).")
    g.add_argument(
        "--mixed_precision",
        choices=("no", "bf16", "fp16"),
        default="no",
        help="Autocast of the U-Net and VAE while sampling (no = fp32, the reference; bf16 = ~4x the tensor-core "
        "throughput on an H100, docs/scaling.md). Part of the samples' settings key.",
    )
    g.add_argument(
        "--allow_tf32", action="store_true", help="TF32 matmuls/convolutions for the fp32 parts (Ampere+)."
    )
    g.add_argument(
        "--grid_classes",
        type=int,
        nargs="+",
        default=[1, 88, 207, 279, 360, 387, 417, 980],
        help="Class ids of the fixed-seed comparison grid.",
    )
    f = p.add_argument_group("FID / sFID")
    f.add_argument(
        "--num_samples", type=int, default=10_000, help="Generated images per checkpoint (0: no FID)."
    )
    f.add_argument("--ref_dir", default=None, help="Reference image folder, e.g. ILSVRC/Data/CLS-LOC/val.")
    f.add_argument(
        "--num_ref", type=int, default=10_000, help="Reference images (seeded subsample; 0 = all)."
    )
    f.add_argument(
        "--ref_resolution", type=int, default=None, help="Reference crop size; default: the sample size."
    )
    f.add_argument("--stats_cache", default=".cache/fid_stats", help="Where reference statistics are cached.")
    f.add_argument(
        "--inception_path",
        default=None,
        help="Inception weights file (inception-2015-12-05.pt or pytorch-fid .pth); default: known caches. "
        "'random' uses random weights (smoke tests only: the numbers mean nothing).",
    )
    f.add_argument(
        "--fid_mode",
        choices=("clean", "legacy_pytorch"),
        default=None,
        help="clean-fid mode (FID/sFID go through clean-fid's resizer and feature extractor); default: the mode "
        "the weight file serves (TorchScript inception-2015-12-05.pt: clean; pytorch-fid .pth: legacy_pytorch).",
    )
    f.add_argument(
        "--fid_num_workers", type=int, default=0, help="DataLoader workers reading the reference images."
    )
    a = p.add_argument_group("alignment (optional)")
    a.add_argument(
        "--align_csv", default=None, help="Sample CSV for the alignment analysis (e.g. a held-out subset)."
    )
    a.add_argument("--align_latent_dir", default=None, help="Latent cache for --align_csv.")
    a.add_argument("--align_dino_dir", default=None, help="DINO token cache for --align_csv.")
    a.add_argument(
        "--clip_embeddings",
        default=None,
        help="CLIP embeddings file [K+1,77,dim] (default: the checkpoint config's data.clip_embeddings).",
    )
    a.add_argument("--align_num", type=int, default=64, help="Images used for SVCCA / t-SNE.")
    a.add_argument(
        "--align_timestep", type=int, default=250, help="Noise level t (of 1000) at which features are read."
    )
    p.add_argument(
        "--device",
        default=None,
        help="Device of a one-process run (default: cuda if available); under accelerate launch each process's own.",
    )
    p.add_argument(
        "--figure_note",
        default="",
        help="Text added to the title of every grid (the demo marks its random-weight tiny models with it).",
    )
    args = p.parse_args(argv)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        p.error("--mixed_precision fp16 needs a GPU (use bf16 or no on a CPU)")
    if not args.checkpoints and not args.baseline:
        p.error("give --checkpoints and/or --baseline")
    if args.num_samples and not args.ref_dir:
        p.error("--ref_dir is required for FID/sFID (or pass --num_samples 0)")
    if not 0 <= args.guidance_low <= args.guidance_high <= 1:
        p.error("need 0 <= --guidance_low <= --guidance_high <= 1")
    return args


def check_inputs(args: argparse.Namespace) -> None:
    """Every missing input at once, before anything heavy is loaded (UserError -> exit code 2)."""
    problems = []
    for flag, ckpts in (("--checkpoints", args.checkpoints), ("--baseline", args.baseline)):
        for c in ckpts:
            if not Path(c).is_dir():
                problems.append(f"{flag} {c}: no such checkpoint directory")
            elif not (Path(c) / "urepa_config.yaml").is_file():
                problems.append(f"{flag} {c}: no urepa_config.yaml in it (not a train_sd15.py checkpoint?)")
    if args.num_samples and args.ref_dir and not Path(args.ref_dir).is_dir():
        problems.append(f"--ref_dir {args.ref_dir}: no such folder (or pass --num_samples 0 to skip FID)")
    if args.num_samples and args.inception_path not in (None, "random"):
        if not Path(args.inception_path).expanduser().is_file():
            problems.append(f"--inception_path {args.inception_path}: no such file")
    if args.align_csv:
        for flag, value, is_dir in (
            ("--align_csv", args.align_csv, False),
            ("--align_latent_dir", args.align_latent_dir, True),
            ("--align_dino_dir", args.align_dino_dir, True),
        ):
            if not value:
                problems.append(f"{flag} is required with --align_csv")
            elif not (Path(value).is_dir() if is_dir else Path(value).is_file()):
                problems.append(f"{flag} {value}: no such {'folder' if is_dir else 'file'}")
    if args.clip_embeddings and not Path(args.clip_embeddings).is_file():
        problems.append(f"--clip_embeddings {args.clip_embeddings}: no such file")
    raise_if_problems(problems)


def class_names(clip_embeddings: str | None, num_classes: int) -> list[str]:
    """Class names from the prompt table's metadata (prepare_clip_embeddings.py), else ``class <id>``."""
    names = [f"class {i}" for i in range(num_classes)]
    if clip_embeddings and str(clip_embeddings).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(clip_embeddings), framework="pt") as f:
            meta = f.metadata() or {}
        if "prompts" in meta:
            prompts = json.loads(meta["prompts"])
            prefix, _, suffix = json.loads(meta.get("template", '"{}"')).partition("{}")
            for i, prompt in enumerate(prompts[:num_classes]):
                name = prompt.removeprefix(prefix).removesuffix(suffix) if prefix or suffix else prompt
                names[i] = f"{i}: {name}"
    return names


class LoadedModel:
    """A checkpoint's aligned U-Net with EMA weights, its VAE, scheduler and prompt table."""

    def __init__(self, ckpt: Path, args: argparse.Namespace, run: str) -> None:
        from train.urepa.data import load_clip_embeddings

        self.ckpt, self.run = ckpt, run
        self.step = checkpoint_step(ckpt)
        self.cfg = load_checkpoint_config(ckpt)
        self.sd_dir = sd_dir = resolve_sd_dir(args.pretrained or self.cfg["model"]["pretrained"])
        unet = load_unet(sd_dir)
        align = float(self.cfg["loss"]["align_coeff"]) > 0
        D, grid = int(self.cfg["model"]["D"]), tuple(self.cfg["model"]["grid"])
        self.model = build_aligned_model(self.cfg["model"], unet, D, grid, align=align, verbose=False)
        load_trainable(self.model, ckpt, use_ema=not args.use_live_weights)
        self.model.to(args.device).eval()
        self.vae = load_vae(sd_dir).to(args.device).eval()
        self.scheduler = make_scheduler(
            load_scheduler_config(sd_dir), args.sampler, self.cfg["loss"]["prediction"]
        )
        clip_path = args.clip_embeddings or self.cfg["data"].get("clip_embeddings")
        self.table = load_clip_embeddings(clip_path)
        self.num_classes = self.table.shape[0] - 1
        size = int(unet.config.sample_size)
        self.latent_shape = (int(unet.config.in_channels), size, size)
        self.resolution = size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def generate(self, classes: torch.Tensor, args: argparse.Namespace, offset: int) -> torch.Tensor:
        """Images in [-1,1]; sample i uses noise seeded by (seed, offset + i) so every model sees the same noise."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
        device_type = torch.device(args.device).type
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            return self._generate(classes, args, offset)

    def _generate(self, classes: torch.Tensor, args: argparse.Namespace, offset: int) -> torch.Tensor:
        dev = args.device
        noise = torch.stack(
            [
                torch.randn(
                    self.latent_shape,
                    generator=torch.Generator().manual_seed(args.seed * 1_000_003 + offset + i),
                )
                for i in range(len(classes))
            ]
        ).to(dev)
        cond = self.table[classes].to(dev, torch.float32)
        null = self.table[-1].to(dev, torch.float32)
        latents = sample_latents(
            lambda x, t, c: self.model(x, t, c, return_tokens=False)[0],
            cond,
            null,
            self.scheduler,
            self.latent_shape,
            num_steps=args.num_steps,
            cfg_scale=args.cfg_scale,
            guidance_low=args.guidance_low,
            guidance_high=args.guidance_high,
            generator=torch.Generator(device="cpu").manual_seed(args.seed + offset),
            noise=noise,
        )
        return decode_latents(self.vae, latents)


def load_inception_for(args: argparse.Namespace):
    """clean-fid's Inception (``models.inception.CleanFIDInception``) and an id for the statistics cache."""
    import tempfile

    from models.inception import TORCHSCRIPT_FILENAME, load_inception, write_random_torchscript_inception

    if args.inception_path == "random":
        logger.warning("--inception_path random: random Inception weights, FID/sFID values are meaningless")
        with tempfile.TemporaryDirectory() as tmp:  # loaded into memory, the file is not needed afterwards
            path = write_random_torchscript_inception(Path(tmp) / TORCHSCRIPT_FILENAME)
            return load_inception(path, device=args.device, mode=args.fid_mode), "random"
    net = load_inception(args.inception_path, device=args.device, mode=args.fid_mode)  # MissingWeightsError
    return net, net.id


def sample_folder(lm: LoadedModel, args, out_dir: Path) -> Path:
    """``<run>/samples-<step>-<key>``: the key covers every setting the samples depend on (not their number:
    a later run with more samples reuses the first ones), so changed flags never mix with old samples.

    On a CPU that includes torch's intra-op thread count: PyTorch picks CPU kernels by it (an fp32 1x1
    convolution of a batch below 16 runs oneDNN with several threads, its native kernel with one: ``use_mkldnn``
    in ATen's Convolution.cpp; the channels-last GroupNorm kernel splits its sums by thread), so the same batch
    comes out a few float32 rounding steps apart at another thread count (docs/scaling.md).
    """
    import hashlib

    settings = [
        str(lm.ckpt.resolve()),
        "live" if args.use_live_weights else "ema",
        args.sampler,
        args.num_steps,
        args.cfg_scale,
        args.guidance_low,
        args.guidance_high,
        args.seed,
        args.batch_size,
        args.mixed_precision,
        args.allow_tf32,
    ]
    if torch.device(args.device).type == "cpu":
        settings.append(f"cpu_threads={torch.get_num_threads()}")
    key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:8]
    return out_dir / lm.ckpt.parent.name / f"samples-{lm.step}-{key}"


def _batch_features_path(folder: Path, inception_id: str, mode: str, batch: list[int]) -> Path:
    return folder / f"features-{mode}-{inception_id[:12]}" / f"{batch[0]:06d}.npz"


def _save_uint8_png(image: torch.Tensor, path: Path) -> None:
    """[3,H,W] float in [0,255] (already rounded) -> PNG holding exactly those values."""
    from PIL import Image

    arr = image.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    with atomic_write(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _load_uint8_png(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()


@torch.no_grad()
def make_fid_samples(lm: LoadedModel, args, inception, inception_id: str, folder: Path, state) -> None:
    """This process's share of the FID samples and their Inception features, written batch by batch.

    Sample i (class ``i % classes``, noise seeded by (seed, i)) is ``NNNNNN.png``; the batch's pool and spatial
    features go to ``features-*/<first index>.npz``, written after its images, so a batch is done when that
    file exists. A batch whose images exist but whose features do not (a kill in between, or a new Inception)
    gets its features from the PNGs, which hold the values the in-memory images had.
    """
    import numpy as np

    n = args.num_samples
    classes = torch.arange(n) % lm.num_classes  # class-balanced, as the ImageNet references
    first = {i: b for b in fixed_batches(n, args.batch_size) for i in b}

    def feats_of(i: int) -> Path:
        return _batch_features_path(folder, inception_id, inception.mode, first[i])

    feat_dir = feats_of(0).parent
    batches, existing = batches_for_this_process(
        n, args.batch_size, lambda i: feats_of(i).is_file(), state, [folder, feat_dir]
    )
    if existing and state.is_main_process:
        logger.info("%s@%d: resuming, %d of %d samples done", lm.run, lm.step, existing, n)
    for idx in progress(
        batches, desc=f"sampling {lm.run}@{lm.step}", unit="batch", disable=not state.is_local_main_process
    ):
        pngs = [folder / f"{i:06d}.png" for i in idx]
        if all(p.is_file() for p in pngs):
            images = torch.stack([_load_uint8_png(p) for p in pngs]).to(args.device)
        else:
            images = to_uint8_range(lm.generate(classes[idx], args, offset=idx[0]))
            for image, path in zip(images, pngs):
                if not path.is_file():
                    _save_uint8_png(image, path)
        out = inception(images, outputs=FEATURES)
        with atomic_write(feats_of(idx[0])) as tmp, open(tmp, "wb") as f:
            np.savez(f, index=np.asarray(idx), **{k: out[k].detach().cpu().numpy() for k in FEATURES})
    state.wait_for_everyone()


def union_stats(args, folder: Path, inception, inception_id: str) -> dict:
    """Statistics of every sample's features in index order (the same numbers from 1 or N processes)."""
    import numpy as np

    feats: dict[str, list] = {k: [] for k in FEATURES}
    for batch in fixed_batches(args.num_samples, args.batch_size):
        with np.load(_batch_features_path(folder, inception_id, inception.mode, batch)) as data:
            if data["index"].tolist() != batch:
                raise RuntimeError(f"{folder}: the features of batch {batch[0]} hold other indices")
            for k in FEATURES:
                feats[k].append(data[k])
    return {k: feature_stats(np.concatenate(v)) for k, v in feats.items()}


@torch.no_grad()
def alignment_features(lm: LoadedModel, args) -> tuple[Any, Any]:
    """Raw mid features on the DINO grid and the DINO tokens of --align_num cached images, [M, C] each."""
    from datasets.sd15_aligned import SD15AlignedDataset
    from eval.alignment import features_to_tokens
    from models.sd15_unet_aligned import capture_features

    ds = SD15AlignedDataset(
        args.align_csv,
        args.align_latent_dir,
        args.align_dino_dir,
        args.clip_embeddings or lm.cfg["data"]["clip_embeddings"],
        cfg_dropout=0.0,
        sample_posterior=False,
    )
    n = min(args.align_num, len(ds))
    batch = (
        ds.get_batch(list(range(n)))
        if hasattr(ds, "get_batch")
        else torch.utils.data.default_collate([ds[i] for i in range(n)])
    )
    dino = batch["dino_tokens"]["mid"].float()
    grid_side = int(round(dino.shape[1] ** 0.5))
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(lm.scheduler.config)
    x0 = batch["latent"].to(args.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    t = torch.full((n,), args.align_timestep, dtype=torch.long, device=args.device)
    with capture_features(lm.model.unet, ["mid"]) as feats:
        lm.model.unet(
            scheduler.add_noise(x0.float(), noise, t),
            t,
            encoder_hidden_states=batch["encoder_hidden_states"].to(args.device),
        )
    u = features_to_tokens(feats["mid"], (grid_side, dino.shape[1] // grid_side))
    return u.reshape(-1, u.shape[-1]).cpu().numpy(), dino.reshape(-1, dino.shape[-1]).numpy()


def write_json(obj: Any, path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    check_inputs(args)
    state = process_state()
    args.device = str(sample_device(args.device, state))
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    main_process = state.is_main_process  # grids, statistics, plots, alignment: once
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(Path(c), "aligned") for c in args.checkpoints] + [(Path(c), "baseline") for c in args.baseline]
    inception = ref = None
    inception_id = ""
    if args.num_samples:
        inception, inception_id = load_inception_for(args)
    summary: dict[str, Any] = {"results": [], "alignment": {}}
    grids, row_labels = [], []
    col_labels: list[str] = []
    # One bar over every model x stage: the stages (loading, FID's matrix square roots, t-SNE) take tens of
    # seconds each on a CPU and would otherwise pass in silence.
    stages = (
        ["load", "grid"]
        + (["FID/sFID"] if args.num_samples else [])
        + (["alignment"] if args.align_csv else [])
    )
    bar = progress(total=len(jobs) * len(stages), desc="evaluate", unit="stage", disable=not main_process)
    for ckpt, kind in jobs:
        run = f"{kind}:{ckpt.parent.name}"
        t0 = time.perf_counter()
        bar.set_postfix_str(f"{run}: load")
        lm = LoadedModel(ckpt, args, run)
        bar.update()
        bar.set_postfix_str(f"{run}@{lm.step}: grid")
        classes = torch.tensor([c % lm.num_classes for c in args.grid_classes])
        col_labels = [
            class_names(args.clip_embeddings or lm.cfg["data"].get("clip_embeddings"), lm.num_classes)[c]
            for c in classes
        ]
        row_labels.append(f"{kind}\n{ckpt.parent.name}\nstep {lm.step}")
        if main_process:
            images = lm.generate(classes, args, offset=10**9)  # fixed seeds shared by every model
            grids.append(images)
            save_labelled_grid(
                images,
                out_dir / f"grid_{kind}_{ckpt.parent.name}_{lm.step}.png",
                ncols=len(classes),
                row_labels=row_labels[-1:],
                col_labels=col_labels,
                title=f"{run} step {lm.step}: fixed seeds, one class per column",
                note=args.figure_note,
            )
        bar.update()
        result: dict[str, Any] = dict(
            run=run,
            checkpoint=str(ckpt),
            step=lm.step,
            weights="live" if args.use_live_weights else "ema",
            sampler=args.sampler,
            num_steps=args.num_steps,
            cfg_scale=args.cfg_scale,
            guidance_interval=[args.guidance_low, args.guidance_high],
            mixed_precision=args.mixed_precision,
            seed=args.seed,
        )
        if args.num_samples:
            bar.set_postfix_str(f"{run}@{lm.step}: FID/sFID")
            folder = sample_folder(lm, args, out_dir)
            make_fid_samples(lm, args, inception, inception_id, folder, state)  # every process, its batches
        if args.num_samples and main_process:
            if ref is None:
                ref = reference_stats(
                    args.ref_dir,
                    inception,
                    args.ref_resolution or lm.resolution,
                    args.num_ref or None,
                    args.stats_cache,
                    inception_id=inception_id,
                    num_workers=args.fid_num_workers,
                )
            result.update(
                fid_from_stats(union_stats(args, folder, inception, inception_id), ref),
                samples=str(folder),
                num_samples=args.num_samples,
                num_ref=args.num_ref,
                inception=inception_id,
                fid_mode=inception.mode,
            )
            bar.update()
        if args.align_csv and main_process:
            bar.set_postfix_str(f"{run}@{lm.step}: alignment (SVCCA, t-SNE)")
            from eval.alignment import svcca_score, tsne_plot

            u, d = alignment_features(lm, args)
            result["svcca_mid"] = svcca_score(u, d)
            tsne_plot(
                u,
                d,
                out_dir / f"tsne_{kind}_{ckpt.parent.name}_{lm.step}.png",
                title=f"{run} step {lm.step}: SVCCA {result['svcca_mid']:.3f}"
                + (f"\n({args.figure_note})" if args.figure_note else ""),
            )
            summary["alignment"][f"{run}@{lm.step}"] = result["svcca_mid"]
            bar.update()
        result["seconds"] = round(time.perf_counter() - t0, 1)
        if main_process:
            result_path = out_dir / ckpt.parent.name / f"checkpoint-{lm.step}.json"
            write_json(result, result_path)
            # <result>.manifest.json: the checkpoint's weight files (sha256), base model, flags, commit
            inputs = {
                "checkpoint": {"weights": weights_record(ckpt), "base_model": base_model_record(lm.sd_dir)}
            }
            manifest = evaluation_manifest(
                job="evaluate_sd15", flags=vars(args), inputs=inputs, outputs=[result_path]
            )
            write_manifest(result_path.parent, manifest, result_manifest_name(result_path))
            logger.info(
                json.dumps(
                    {k: v for k, v in result.items() if k in ("run", "step", "fid", "sfid", "svcca_mid")}
                )
            )
        summary["results"].append(result)
        del lm
        state.wait_for_everyone()
    bar.close()
    if not main_process:
        return summary
    save_labelled_grid(
        torch.cat(grids),
        out_dir / "comparison_grid.png",
        ncols=len(args.grid_classes),
        row_labels=row_labels,
        col_labels=col_labels,
        title="Same noise and class per column, one model per row",
        note=args.figure_note,
    )
    all_results = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*/checkpoint-*.json"))]
    with_fid = [r for r in all_results if "fid" in r]
    if with_fid:
        random = any(r.get("inception") == "random" for r in with_fid)
        plot_metric_vs_step(
            with_fid,
            out_dir / "fid_vs_step.png",
            title=f"FID / sFID ({with_fid[0].get('num_samples', '?')} samples per checkpoint)",
            note=("Inception with " + RANDOM_WEIGHTS_NOTE) if random else "",
        )
    if summary["alignment"]:
        write_json(summary["alignment"], out_dir / "alignment.json")
    return summary


if __name__ == "__main__":
    run_cli(main)
