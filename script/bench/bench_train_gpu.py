"""Training throughput on one GPU: train_sd15.py (U-REPA, batch 48/64) and the anomaly stages 1/2 at 512 px,
baseline vs each throughput option of the training core (train/core/perf.py), in one run.

    python script/bench/bench_train_gpu.py --json docs/bench_logs/train_gpu_<gpu>_<date>.json     # everything
    python script/bench/bench_train_gpu.py --preset quick --time_budget_s 540                        # ~10 min
    python script/bench/bench_train_gpu.py --tiny                    # CPU smoke run on the tiny assets

It runs the trainers themselves (``train_sd15.main``, ``train/stage1-full/train.py``, ``train/stage2-dual/
train.py``), in this process one after the other, each with ``log_step_times`` on. No weights or images are
needed: random-init models with the real SD-1.5 configs (U-Net 860M, VAE, CLIP ViT-L/14 text encoder) and a
random DINOv2 ViT-B/14 are written once to ``--work_dir``, with real-size U-REPA caches (latent [4,64,64],
DINOv2 ViT-L tokens [256,1024]) and a synthetic MVTec class. ``--tiny`` uses the repo's tiny assets instead.

Per run: samples/s over the last ``--timed_steps`` steps (the first ``--warmup_steps``, with compilation,
cuDNN autotuning and allocator growth, are not counted); the step-time breakdown (data wait, forward,
backward, optimizer: the core's StepTimer, CUDA events); peak GPU memory; and the MFU estimate:
FLOPs per step x steps/s / the GPU's dense bf16 peak. The FLOP count is measured, not modelled: the core counts
one step's matmul / convolution / attention FLOPs (forward and backward, everything the step function runs:
U-Net, VAE encode, text encoder, DINOv2 loss) with ``torch.utils.flop_counter`` on the first step of every
eager run; compiled runs reuse the eager count of the same trainer and batch (same math).

Options (each alone, then combined; docs/throughput.md): tf32, channels_last, fused_adamw, no_lora_cast
(skip_lora_input_cast), sdpa_* (attention kernel order), loader (pinned memory, prefetch, workers), compile
(torch.compile of the U-Net, and of the DINOv2 loss encoder in the anomaly stages), all, all_eager; for the
anomaly stages also bf16 (mixed precision: this one changes the math; the seed trains them in fp32).
A run that fails (out of memory, a kernel the GPU lacks) is reported with its error and the next one runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------ options

# settings of train/core/config.py CoreConfig (PERF_FIELDS); "workers" is the anomaly stages' loader workers
OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "tf32": {"allow_tf32": True},
    "channels_last": {"channels_last": True},
    "fused_adamw": {"fused_adamw": True},
    "no_lora_cast": {"skip_lora_input_cast": True},
    "sdpa_flash": {"sdpa_backend": ["flash", "efficient", "math"]},
    "sdpa_efficient": {"sdpa_backend": ["efficient", "flash", "math"]},
    "sdpa_cudnn": {"sdpa_backend": ["cudnn", "flash", "efficient", "math"]},
    "loader": {"dataloader_pin_memory": True, "dataloader_prefetch_factor": 4, "workers": 4},
    "compile": {"compile": ["model", "dinov2"]},
    "all_eager": {
        "allow_tf32": True,
        "channels_last": True,
        "fused_adamw": True,
        "skip_lora_input_cast": True,
        "dataloader_pin_memory": True,
        "dataloader_prefetch_factor": 4,
        "workers": 4,
    },
    "all": {
        "allow_tf32": True,
        "channels_last": True,
        "fused_adamw": True,
        "skip_lora_input_cast": True,
        "dataloader_pin_memory": True,
        "dataloader_prefetch_factor": 4,
        "workers": 4,
        "compile": ["model", "dinov2"],
    },
    "bf16": {"mixed_precision": "bf16"},  # anomaly stages only: a precision change, not a same-math option
}
EAGER_OPTIONS = [k for k, v in OPTIONS.items() if "compile" not in v]
PRESETS = {
    "full": {
        "trainers": ["sd15", "stage1", "stage2"],
        "options": ["baseline", "all", "all_eager", "compile"]
        + [k for k in OPTIONS if k not in ("baseline", "all", "all_eager", "compile")],
    },
    # one 15-minute GPU session (with --time_budget_s): sd15 at batch 48 only; baseline and all first
    "quick": {
        "trainers": ["sd15", "stage1", "stage2"],
        "options": ["baseline", "all", "all_eager", "compile", "no_lora_cast", "channels_last"],
        "sd15_batch": [48],
    },
}

# dense bf16 tensor-core peak per GPU (no sparsity), TFLOP/s; matched against torch.cuda.get_device_name()
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("A10", 125.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


# ------------------------------------------------------------------------------------------------ assets


def write_sd15_pipeline(root: Path) -> Path:
    """A diffusers SD-1.5 folder with random weights and SD-1.5's real configs (U-Net, VAE, CLIP-L text)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from preprocessing.clip_bpe_tokenizer import CLIP_VOCAB_SIZE, write_clip_tokenizer
    from preprocessing.tiny_sd15 import SD15_SCHEDULER_CONFIG
    from script.bench.bench_urepa_step import SD15_UNET_CONFIG

    torch.manual_seed(0)
    UNet2DConditionModel(**SD15_UNET_CONFIG).save_pretrained(root / "unet")
    AutoencoderKL(  # stable-diffusion-v1-5/stable-diffusion-v1-5 vae/config.json
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ).save_pretrained(root / "vae")
    text = CLIPTextConfig(  # openai/clip-vit-large-patch14 text tower (SD-1.5's text_encoder/config.json)
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
    )
    CLIPTextModel(text).save_pretrained(root / "text_encoder")
    write_clip_tokenizer(root / "tokenizer")
    PNDMScheduler(**SD15_SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.42.1",
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
                "safety_checker": [None, None],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    return root


@dataclass
class Assets:
    sd15: Path
    dinov2: Path
    dinov2_variant: str
    dinov2_resolution: int
    dinov2_layers: list[int]
    mvtec: Path
    resolution: int  # anomaly stages' image side
    caches: Path


def build_assets(work: Path, tiny: bool, num_samples: int) -> Assets:
    from preprocessing.synthetic_mvtec import MVTecCounts, write_synthetic_mvtec
    from script.bench.bench_urepa_data import write_synthetic_caches

    caches = work / "caches"
    caches.mkdir(parents=True, exist_ok=True)
    if tiny:
        from preprocessing.make_tiny_assets import ensure_tiny_assets

        t = ensure_tiny_assets(REPO / ".cache" / "tiny")
        write_synthetic_caches(
            caches, num_samples, latent_shape=(4, 8, 8), dino_grid=(2, 2), dino_dim=64, clip_shape=(6, 77, 32)
        )
        return Assets(t["sd15"], t["dinov2_official"], "tiny14", 28, [1, 3], t["mvtec"], 64, caches)
    from models.dinov2_encoder import DINOv2Encoder, save_official_checkpoint

    sd15 = write_sd15_pipeline(work / "sd15")
    torch.manual_seed(1)
    dinov2 = save_official_checkpoint(
        DINOv2Encoder(variant="vitb14", resolution=224, input_range="-1_1"),
        work / "dinov2_vitb14_pretrain.pth",
    )
    # 64 hazelnut images (the real class has 391): targets of the DINOv2 loss are cached after 64 samples
    mvtec = write_synthetic_mvtec(work / "mvtec", size=256, counts=MVTecCounts(train_good=64, test_good=2))
    write_synthetic_caches(caches, num_samples)
    return Assets(sd15, dinov2, "vitb14", 224, [3, 6, 9, 11], mvtec, 512, caches)


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Run:
    trainer: str  # sd15 | stage1 | stage2
    batch: int
    option: str
    result: dict[str, Any] = field(default_factory=dict)


def _reset_process_state(tf32: tuple[str, str]) -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch._dynamo.reset()  # no recompilation limit carried over from the previous run's modules
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = tf32
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _load_main(rel: str):
    spec = importlib.util.spec_from_file_location(
        "bench_" + rel.replace("/", "_").replace("-", "_")[:-3], REPO / rel
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _yaml(value: Any) -> str:
    return (
        json.dumps(value)
        if isinstance(value, list)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def sd15_argv(a: Assets, out: Path, batch: int, opts: dict[str, Any], args) -> list[str]:
    sets = [
        f"output_dir={out}",
        f"model.pretrained={a.sd15}",
        f"data.csv={a.caches / 'train.csv'}",
        f"data.latent_dir={a.caches / 'lat'}",
        f"data.dino_dir={a.caches / 'dino'}",
        f"data.clip_embeddings={a.caches / 'clip.pt'}",
        f"data.num_workers={args.sd15_workers}",
        f"train.batch_size={batch}",
        f"train.max_steps={args.warmup_steps + args.timed_steps}",
        f"train.log_every={args.timed_steps}",
        "train.checkpointing_steps=0",
        "train.sample_every=0",
        "train.resume_from_checkpoint=null",
        f"train.mixed_precision={args.sd15_precision}",
        "perf.log_step_times=true",
    ]
    if args.tiny:
        sets += ["model.lora.rank=4", "model.lora.alpha=4", "ema.decay=0.9"]
    for k, v in opts.items():
        if k == "workers":
            continue  # config A already reads with 8 workers
        if k == "compile":
            v = [t for t in v if t != "dinov2"]  # DINO tokens come from the cache
        if k == "mixed_precision":
            sets.append(f"train.mixed_precision={v}")
            continue
        sets.append(f"perf.{k}={_yaml(v)}")
    return ["--config", str(REPO / "configs" / "sd15_repa_A.yaml"), "--set", *sets]


def anomaly_argv(a: Assets, out: Path, stage: int, batch: int, opts: dict[str, Any], args) -> list[str]:
    """The seed document's command (fp32, rank 32, text-encoder LoRA, DINOv2 ViT-B/14 loss on layers 3 6 9 11)."""
    argv = [
        "--pretrained_model_name_or_path", str(a.sd15), "--instance_data_dir", str(a.mvtec),
        "--mvtec_name", "hazelnut", "--output_dir", str(out), "--resolution", str(a.resolution),
        "--train_batch_size", str(batch), "--learning_rate", "2e-5", "--rank", str(4 if args.tiny else 32),
        "--train_text_encoder", "--use_dinov2_loss", "--dinov2_loss_weight", "0.1",
        "--dinov2_model_name", a.dinov2_variant, "--dinov2_loss_type", "l2",
        "--dinov2_feature_layers", *map(str, a.dinov2_layers), "--dinov2_weights", str(a.dinov2),
        "--dinov2_resolution", str(a.dinov2_resolution),
        "--max_train_steps", str(args.warmup_steps + args.timed_steps), "--log_every", str(args.timed_steps),
        "--checkpointing_steps", "100000", "--report_to", "none", "--log_step_times",
        "--mixed_precision", opts.get("mixed_precision", args.anomaly_precision),
    ]  # fmt: skip
    if stage == 2:
        argv += ["--mvtec_anamaly_name", "hole", "--instance_prompt_blend", "a vfx with sks"]
        argv += ["--instance_prompt_fg", "sks"]
    else:
        argv += ["--instance_prompt", "a vfx"]
    for k, v in opts.items():
        if k == "mixed_precision":
            continue
        if k == "workers":
            argv += ["--dataloader_num_workers", str(v)]
        elif isinstance(v, bool):
            argv += [f"--{k}"] if v else []
        elif isinstance(v, list):
            argv += [f"--{k}", *v]
        else:
            argv += [f"--{k}", str(v)]
    return argv


def run_one(run: Run, a: Assets, work: Path, args, tf32_default: tuple[str, str]) -> dict[str, Any]:
    opts = OPTIONS[run.option]
    out = work / "runs" / f"{run.trainer}_b{run.batch}_{run.option}"
    shutil.rmtree(out, ignore_errors=True)
    _reset_process_state(tf32_default)
    t0 = time.perf_counter()
    try:
        if run.trainer == "sd15":
            import train_sd15

            train_sd15.main(sd15_argv(a, out, run.batch, opts, args))
        else:
            stage = 1 if run.trainer == "stage1" else 2
            script = "train/stage1-full/train.py" if stage == 1 else "train/stage2-dual/train.py"
            _load_main(script)(anomaly_argv(a, out, stage, run.batch, opts, args))
    except Exception as err:  # noqa: BLE001 - a benchmark reports a failed configuration and goes on
        oom = isinstance(err, torch.OutOfMemoryError)
        traceback.print_exc()
        return {"error": "OOM" if oom else f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        if out.exists():
            for ckpt in out.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)  # keep the logs, drop the weights
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    last = rows[-1]
    r = {
        "steps_per_s": last.get("steps_per_s"),
        "samples_per_s": last["steps_per_s"] * run.batch if last.get("steps_per_s") else None,
        "loss": last.get("loss"),
        "wall_s": time.perf_counter() - t0,
        "flops_per_step": rows[0].get("flops_per_step"),
        **{k: last.get(k) for k in ("time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s")},
    }
    if torch.cuda.is_available():
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return r


# ------------------------------------------------------------------------------------------------ report


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def report(runs: list[Run], peak: float | None) -> str:
    lines = [
        "| trainer | batch | option | samples/s | vs baseline | step (s) | data | forward | backward | optimizer "
        "| peak GiB | GFLOP/sample | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r.trainer, r.batch): r.result for r in runs if r.option == "baseline"}
    for r in runs:
        res = r.result
        if "error" in res or "skipped" in res:
            lines.append(
                f"| {r.trainer} | {r.batch} | {r.option} | {res.get('error') or res['skipped']} |" + " |" * 9
            )
            continue
        b = base.get((r.trainer, r.batch), {})
        speed = (
            res["samples_per_s"] / b["samples_per_s"]
            if b.get("samples_per_s") and res["samples_per_s"]
            else None
        )
        step = 1.0 / res["steps_per_s"] if res["steps_per_s"] else None
        flops = res.get("flops_per_step") or res.get("flops_per_step_from_baseline")
        mfu = flops * res["steps_per_s"] / (peak * 1e12) if (flops and peak and res["steps_per_s"]) else None
        lines.append(
            f"| {r.trainer} | {r.batch} | {r.option} | {_fmt(res['samples_per_s'], '.1f')} | "
            f"{_fmt(speed, '.2f')}{'x' if speed else ''} | {_fmt(step, '.3f')} | {_fmt(res['time_data_s'], '.3f')} | "
            f"{_fmt(res['time_forward_s'], '.3f')} | {_fmt(res['time_backward_s'], '.3f')} | "
            f"{_fmt(res['time_optimizer_s'], '.3f')} | {_fmt(res.get('peak_gib'), '.1f')} | "
            f"{_fmt(flops / r.batch / 1e9 if flops else None, '.1f')} | "
            f"{_fmt(100 * mfu if mfu else None, '.1f')}{'%' if mfu else ''} |"
        )
    counts = {}
    for r in runs:
        f = r.result.get("flops_per_step")
        if f and (r.trainer, r.batch) not in counts:
            counts[(r.trainer, r.batch)] = f
    if counts:
        lines.append("")
    for (trainer, batch), f in counts.items():
        lines.append(
            f"FLOPs used for MFU, {trainer} batch {batch}: {f / 1e9:.5g} GFLOP per optimizer step = "
            f"{f / batch / 1e9:.5g} GFLOP per sample (torch.utils.flop_counter on the first eager step: matmuls, "
            "convolutions, attention; forward + backward)"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="Trainers and options to run.")
    p.add_argument(
        "--trainers", nargs="+", choices=["sd15", "stage1", "stage2"], help="Override the preset's."
    )
    p.add_argument(
        "--options", nargs="+", choices=list(OPTIONS), help="Override the preset's (baseline first)."
    )
    p.add_argument("--sd15_batch", type=int, nargs="+", default=None, help="train_sd15 batch sizes (48 64).")
    p.add_argument("--stage1_batch", type=int, default=None, help="Stage-1 batch (the seed's 8).")
    p.add_argument("--stage2_batch", type=int, default=None, help="Stage-2 batch (the seed's 4).")
    p.add_argument("--warmup_steps", type=int, default=None, help="Untimed steps first (default 10; tiny 2).")
    p.add_argument("--timed_steps", type=int, default=None, help="Timed steps (default 10; tiny 2).")
    p.add_argument("--sd15_precision", default="bf16", choices=["no", "bf16", "fp16"], help="config A: bf16.")
    p.add_argument(
        "--anomaly_precision", default="no", choices=["no", "bf16", "fp16"], help="The seed's stages: no."
    )
    p.add_argument("--sd15_workers", type=int, default=None, help="train_sd15 loader workers (config A: 8).")
    p.add_argument("--peak_tflops", type=float, default=None, help="Dense bf16 peak of the GPU (MFU).")
    p.add_argument(
        "--time_budget_s",
        type=float,
        default=None,
        help="Start no new run after this many seconds (results so far are reported).",
    )
    p.add_argument(
        "--tiny", action="store_true", help="Tiny models on CPU (exercises the script; not a benchmark)."
    )
    p.add_argument("--work_dir", default=None, help="Models, caches and run folders (default: a temp dir).")
    p.add_argument("--keep_work_dir", action="store_true", help="Do not delete the temp work dir.")
    p.add_argument("--json", default=None, help="Also write the results here.")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("bench_train_gpu.py needs a CUDA GPU; use --tiny to exercise it on CPU")
    preset = PRESETS[args.preset]
    trainers = args.trainers or preset["trainers"]
    options = args.options or (
        preset["options"] if not args.tiny else [o for o in preset["options"] if o in EAGER_OPTIONS]
    )
    if "baseline" in options:
        options = ["baseline"] + [o for o in options if o != "baseline"]
    args.warmup_steps = args.warmup_steps or (2 if args.tiny else 10)
    args.timed_steps = args.timed_steps or (2 if args.tiny else 10)
    args.sd15_workers = args.sd15_workers if args.sd15_workers is not None else (0 if args.tiny else 8)
    sd15_batches = args.sd15_batch or ([2] if args.tiny else preset.get("sd15_batch", [48, 64]))
    batches = {"sd15": sd15_batches, "stage1": [args.stage1_batch or (2 if args.tiny else 8)]}
    batches["stage2"] = [args.stage2_batch or (1 if args.tiny else 4)]
    if args.tiny:
        args.sd15_precision = "no"
        torch.set_num_threads(min(4, os.cpu_count() or 1))

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_train_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    need = max(sd15_batches) * (args.warmup_steps + args.timed_steps) + 64
    assets = build_assets(work, args.tiny, need)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})"
    peak = args.peak_tflops or (peak_tflops(device) if cuda else None)
    import accelerate
    import diffusers
    import peft

    header = (
        f"device: {device}; torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"accelerate {accelerate.__version__}; dense bf16 peak for MFU: {peak or 'unknown'} TFLOP/s; "
        f"assets in {time.perf_counter() - t_start:.0f} s; steps: {args.warmup_steps} warm-up + "
        f"{args.timed_steps} timed; sd15 {args.sd15_precision}, anomaly stages {args.anomaly_precision}"
    )
    print(header, flush=True)
    tf32_default = (
        (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
        if hasattr(torch.backends.cuda.matmul, "fp32_precision")
        else ("", "")
    )
    # option-major order: when the time budget ends the run, every trainer has its baseline and "all"
    runs = [
        Run(t, b, o)
        for o in options
        for t in trainers
        for b in batches[t]
        if not (o == "bf16" and t == "sd15")  # config A is bf16 already
    ]
    for run in runs:
        if args.time_budget_s and time.perf_counter() - t_start > args.time_budget_s:
            run.result = {"skipped": "time budget"}
            continue
        run.result = run_one(run, assets, work, args, tf32_default)
        print(
            json.dumps({"trainer": run.trainer, "batch": run.batch, "option": run.option, **run.result}),
            flush=True,
        )
    for run in runs:  # compiled runs: the eager FLOP count of the same trainer and batch (same math)
        if run.result.get("steps_per_s") and not run.result.get("flops_per_step"):
            same = [
                r.result.get("flops_per_step")
                for r in runs
                if (r.trainer, r.batch) == (run.trainer, run.batch)
                and r.result.get("flops_per_step")
                and OPTIONS[r.option].get("mixed_precision") == OPTIONS[run.option].get("mixed_precision")
            ]
            if same:
                run.result["flops_per_step_from_baseline"] = same[0]
    order = {t: i for i, t in enumerate(trainers)}
    table = report(sorted(runs, key=lambda r: (order[r.trainer], r.batch)), peak)
    print("\n" + header + "\n\n" + table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "header": header,
                    "runs": [
                        {"trainer": r.trainer, "batch": r.batch, "option": r.option, **r.result} for r in runs
                    ],
                },
                indent=2,
            )
        )
    if not args.work_dir and not args.keep_work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
