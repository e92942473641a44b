"""GPU-hour estimates of the units, from FLOPs counted on the meta device.

How a unit's estimate is made (also printed by ``--dry_run`` and in docs/reproduce.md):

1. **Counted FLOPs per sample** (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions, attention;
   no weights, the meta device, the paper-size models at the paper's resolution). The sampling side is
   ``script/bench/sampling_flops.py``'s count (SD-1.5 U-Net variants, the dual U-Net pair, the VAE decoder, the
   FID Inception) and its sampler walk (U-Net evaluations per sample from each sampler's own timesteps and
   guidance rule). Training steps and the DINOv2 term come from ``script/bench/bench_dinov2_loss.py``'s count
   (U-Net LoRA step, the perceptual term forward + backward) and from the counts below (the dual pair, the U-REPA
   step, the cache encoders, the downstream networks), forward + backward the same way.
2. **Per unit**: FLOPs per sample x samples (steps x batch for training, images for generation and metrics).
3. **GPU-hours** = FLOPs / (peak x utilisation) / 3600 with the figures of ``sampling_flops.py``: an H100 SXM at
   989 TFLOP/s dense bf16 x 23 % (the MFU measured for ``train_sd15.py``); fp32 units (the seed's
   ``--mixed_precision no``, ``generate.py``'s default fp32) at the H100's 67 TFLOP/s fp32 peak x 23 % instead,
   an upper bound (cuDNN may run fp32 convolutions as TF32).

Not counted: data loading, model loading, checkpoints, PNG writing, mask extraction, the CPU-only units (subset
sampling, stand-in masks). The counts are cached in ``.cache/reproduce/flop_counts.json`` (minutes to count on a
shared CPU; ``--flop_counts FILE`` reads another file).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

from utils.checkpoint import atomic_write
from utils.cli import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
COUNTS_VERSION = 1
DEFAULT_CACHE = REPO_ROOT / ".cache" / "reproduce" / "flop_counts.json"
# H100 SXM dense peaks, TFLOP/s (docs/scaling.md): bf16/fp16 tensor cores, TF32 tensor cores, fp32 CUDA cores
FP32_PEAK_TFLOPS = 67.0
TF32_PEAK_TFLOPS = 495.0

# every count a plan uses; a --flop_counts file must hold them all
COUNT_KEYS = (
    "unet",  # SD-1.5 U-Net forward, 512 px (sampling_flops)
    "unet_urepa_lora32",  # U-REPA config A U-Net forward (sampling_flops)
    "dual_unet_pair",  # stage-2 dual U-Net, one (blend, fg) pair, forward (sampling_flops)
    "vae_decode",  # SD-VAE decoder 64 -> 512 (sampling_flops)
    "inception_299",  # FID / IS Inception forward (sampling_flops)
    "train_unet_lora32",  # U-Net + LoRA rank 32 (attention), forward + backward (bench_dinov2_loss)
    "dinov2_term_default",  # DINOv2 term, fast impl, sample fraction 0.5, per sample (bench_dinov2_loss)
    "dinov2_term_reference",  # the seed trainer's term (--dinov2_loss_impl reference)
    "train_dual_pair_lora32",  # dual U-Net pair, LoRA rank 32, official interaction, forward + backward
    "train_urepa",  # SD15UNetAligned (LoRA rank 32 on the whitelist, mid head), forward + backward
    "vae_encode_512",  # SD-VAE encoder 512 -> 64
    "dinov2_vitl14_224",  # DINOv2 ViT-L/14 forward at 224 px (the U-REPA token cache)
    "vgg16_256",  # LPIPS VGG-16 features at 256 px (IC-LPIPS)
    "draem_256_step",  # DRAEM segmentation U-Net (base width 64), 256 px, forward + backward
    "draem_256_fwd",
    "resnet34_256_step",  # ResNet-34, 256 px, forward + backward
    "resnet34_256_fwd",
)


@functools.cache
def load_script(rel_path: str) -> ModuleType:
    """A repository script as a module (loaded once)."""
    path = REPO_ROOT / rel_path
    spec = importlib.util.spec_from_file_location("reproduce_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up there
    spec.loader.exec_module(module)
    return module


def _fwd_bwd(fn) -> int:
    """FLOPs of ``fn()`` (outputs: a tensor or a tuple of tensors) plus the backward of a scalar loss on them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sum(o.float().square().mean() for o in outs if torch.is_tensor(o)).backward()
    return counter.get_total_flops()


def _fwd(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_flops() -> dict[str, float]:
    """Every count of COUNT_KEYS (minutes on a shared CPU: the SD-1.5 graphs are walked on the meta device)."""
    import torch
    import torchvision
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from models.dinov2_encoder import DINOv2Encoder
    from models.draem_segmentation import DiscriminativeSubNetwork
    from models.dual_lora import DualLoRAUNet
    from models.sd15_unet_aligned import SD15UNetAligned

    sampling = load_script("script/bench/sampling_flops.py")
    counts: dict[str, float] = dict(sampling.model_flops())
    bench = load_script("script/bench/bench_dinov2_loss.py")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its own table
        dino = bench.section_flops(SimpleNamespace(resolution=512, crop_size=256), ["fast_p05", "reference"])
    counts["train_unet_lora32"] = dino["unet_step"]
    counts["dinov2_term_default"] = dino["fast_p05"]
    counts["dinov2_term_reference"] = dino["reference"]
    from script.bench.bench_urepa_step import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    with torch.device("meta"):
        x = torch.zeros(1, 4, 64, 64)
        t = torch.tensor([500])
        ehs = torch.zeros(1, 77, 768)
        dual = DualLoRAUNet(
            UNet2DConditionModel(**SD15_UNET_CONFIG).requires_grad_(False),
            rank=32,
            interaction_preset="official",
        )
        counts["train_dual_pair_lora32"] = _fwd_bwd(lambda: dual(x, x, t, ehs, ehs))
        aligned = SD15UNetAligned(
            UNet2DConditionModel(**SD15_UNET_CONFIG).requires_grad_(False),
            align_layers=["mid"],
            D=1024,
            grid=(16, 16),
            lora_config={"rank": 32},
            verbose=False,
        )
        counts["train_urepa"] = _fwd_bwd(lambda: aligned(x, t, ehs))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        counts["vae_encode_512"] = _fwd(lambda: vae.encode(torch.zeros(1, 3, 512, 512)))
        vitl = DINOv2Encoder(variant="vitl14", resolution=224).model
        counts["dinov2_vitl14_224"] = _fwd(lambda: vitl(torch.zeros(1, 3, 224, 224)))
        vgg = torchvision.models.vgg16().features
        counts["vgg16_256"] = _fwd(lambda: vgg(torch.zeros(1, 3, 256, 256)))
        draem = DiscriminativeSubNetwork(base_width=64)
        img = torch.zeros(1, 3, 256, 256)
        counts["draem_256_step"] = _fwd_bwd(lambda: draem(img))
        counts["draem_256_fwd"] = _fwd(lambda: draem(img))
        resnet = torchvision.models.resnet34(num_classes=8)
        counts["resnet34_256_step"] = _fwd_bwd(lambda: resnet(img))
        counts["resnet34_256_fwd"] = _fwd(lambda: resnet(img))
    return {k: float(v) for k, v in counts.items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "diffusers", "peft")}


def load_counts(path: str | Path | None = None) -> dict[str, float]:
    """The FLOP counts: ``path`` if given (must hold every key), else the cache, counted and cached when absent."""
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--flop_counts {path}: unreadable ({err})") from None
        counts = data.get("counts", data)
        missing = [k for k in COUNT_KEYS if k not in counts]
        if missing:
            raise UserError(f"--flop_counts {path}: missing counts {', '.join(missing)}")
        return {k: float(counts[k]) for k in COUNT_KEYS}
    cache = DEFAULT_CACHE
    key = {"version": COUNTS_VERSION, **_versions()}
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key and all(k in data.get("counts", {}) for k in COUNT_KEYS):
            return data["counts"]
    print(
        f"counting FLOPs on the meta device (once, cached in {cache}; minutes on a small CPU) ...", flush=True
    )
    counts = count_flops()
    with atomic_write(cache) as tmp:
        tmp.write_text(json.dumps({"key": key, "counts": counts}, indent=1))
    return counts


def throughput_tflops(precision: str) -> float:
    """Assumed sustained TFLOP/s of one GPU for a unit running in ``precision``."""
    sampling = load_script("script/bench/sampling_flops.py")
    peak = {"bf16": sampling.H100_BF16_PEAK_TFLOPS, "fp16": sampling.H100_BF16_PEAK_TFLOPS}.get(precision)
    if peak is None:
        peak = {"tf32": TF32_PEAK_TFLOPS, "fp32": FP32_PEAK_TFLOPS}[precision]
    return peak * sampling.ASSUMED_UTILISATION


def gpu_hours(flops: float | None, precision: str) -> float | None:
    if flops is None:
        return None
    return flops / (throughput_tflops(precision) * 1e12) / 3600


@functools.cache
def unet_evals(sampler: str, steps: int, cfg: bool, low: float = 0.0, high: float = 1.0) -> int:
    """U-Net evaluations per sample (sampling_flops.unet_evals: the sampler's own timesteps, guidance rule)."""
    return load_script("script/bench/sampling_flops.py").unet_evals(sampler, steps, cfg, low, high)


HOW = (
    "GPU-hours = counted FLOPs (torch FlopCounterMode on the meta device, SD-1.5-size models at the paper's "
    "resolution; per sample x samples) / (assumed throughput x 3600). Assumed throughput: H100 SXM peak x 23 % "
    "(the MFU measured for train_sd15.py, docs/throughput.md): 989 TFLOP/s for bf16/fp16 units, 67 TFLOP/s for "
    "fp32 units (an upper bound on their time: cuDNN may run fp32 convolutions as TF32). Data loading, model "
    "loading, checkpoints and CPU-only units are not counted."
)
