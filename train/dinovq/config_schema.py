"""The DinoVQ tokenizer config (train/dinovq/train.py): every key, its type and its default, in one place.

``load_config(path, overrides, schema=DinoVQConfig)`` (utils/config.py) rejects unknown keys (naming the file
and the closest valid key), checks every value's type and range, and returns the dict with every key set.
Defaults are the "fast training" preset (configs/dinovq_fast.yaml); ``model`` holds DinoVQModel's keyword
arguments with the model's own defaults (tests/dinovq/test_config_schema.py keeps the two equal).
``train.disc_lr: null`` means ``train.lr``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from losses.patchgan import D_LOSSES, G_LOSSES
from train.core.config import PerfSection
from utils.config import ConfigSection
from utils.images import DEFAULT_MIN_IMAGE_SIZE

NonNegative = Annotated[float, Field(ge=0.0)]


class ModelSection(ConfigSection):
    img_size: Annotated[list[PositiveInt], Field(min_length=2, max_length=2)] | PositiveInt = [224, 224]
    encoder_embed_dim: PositiveInt = 768
    codebook_size: PositiveInt = 8192
    dino_loss_weight: NonNegative = 1.0
    recon_loss_weight: NonNegative = 1.0
    vq_loss_weight: NonNegative = 1.0
    use_perceptual: bool = False
    perceptual_weight: NonNegative = 1.0
    vgg_ckpt_path: str | None = (
        None  # null = torchvision cache ($TORCH_HOME/hub/checkpoints/vgg16-397923af.pth)
    )
    use_gan: bool = False
    disc_start: NonNegativeInt = 10000
    disc_weight: NonNegative = 0.5
    disc_dim: PositiveInt = 64
    disc_num_layers: PositiveInt = 3
    disc_adaptive_weight: bool = True
    patch_size: PositiveInt = 14
    encoder_depth: PositiveInt = 12
    decoder_embed_dim: PositiveInt | None = None
    decoder_depth: PositiveInt = 12
    dino_decoder_depth: PositiveInt = 4
    num_heads: PositiveInt = 12
    mlp_ratio: Annotated[float, Field(gt=0.0)] = 4.0
    dino_dim: PositiveInt | Literal["auto"] | None = "auto"  # auto/null: from the DINO targets
    codebook_dim: PositiveInt | None = 32
    commitment_weight: NonNegative = 0.25
    ema_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.99
    threshold_ema_dead_code: NonNegativeInt = 2
    disc_loss: Literal[tuple(D_LOSSES)] = "hinge"
    # generator loss form; null: taming -mean(D) with hinge, softplus(-D) with vanilla (losses/patchgan.py)
    gen_loss: Literal[tuple(G_LOSSES)] | None = None
    in_channels: PositiveInt = 3


class DataSection(ConfigSection):
    train_dir: str | None = None  # image folder (recursive) or ImageNet root
    train_csv: str | None = None  # or an ImageNet subset CSV: id,img_path,class_id,synset
    val_dir: str | None = None
    val_csv: str | None = None
    val_size: NonNegativeInt = 500  # held out from the training images when no val_dir/val_csv is given
    augment: bool = True
    num_workers: NonNegativeInt = 8
    min_image_size: PositiveInt = (
        DEFAULT_MIN_IMAGE_SIZE  # a training image with a shorter side is skipped, named
    )


class DinoSection(ConfigSection):
    source: str | None = "facebook/dinov2-base"  # hub id in the HF cache, local dir, official .pth, or null
    variant: str = "vitb14"
    resolution: PositiveInt = 224
    cache: str | None = None  # DINO-token LMDB cache dir (replaces the on-the-fly teacher)

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, variant: str) -> str:
        from models.dinov2_encoder import VARIANTS

        if variant not in VARIANTS:
            raise ValueError(f"unknown DINOv2 variant {variant!r}; valid: {', '.join(VARIANTS)}")
        return variant

    @field_validator("resolution")
    @classmethod
    def _multiple_of_14(cls, resolution: int) -> int:
        if resolution % 14:
            raise ValueError(f"must be a multiple of 14 (the DINOv2 patch size), got {resolution}")
        return resolution


class TrainSection(ConfigSection):
    output_dir: str | None = None  # or --output_dir
    seed: int = 0
    batch_size: PositiveInt = 32
    gradient_accumulation_steps: PositiveInt = 1
    lr: NonNegative = 1.0e-4
    disc_lr: NonNegative | None = None  # null -> lr
    weight_decay: NonNegative = 0.0
    lr_scheduler: Literal["constant", "cosine"] = "cosine"
    warmup_steps: NonNegativeInt = 2000
    max_steps: PositiveInt = 200000
    max_grad_norm: Annotated[float, Field(gt=0.0)] | None = 1.0  # null: no clipping
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: PositiveInt = 50
    report_to: str = (
        "tensorboard"  # trackers: tensorboard, wandb, comet_ml, mlflow, ..., all, none (comma list)
    )
    checkpointing_steps: PositiveInt = 5000
    checkpoints_total_limit: PositiveInt | None = 3
    max_consecutive_nonfinite: PositiveInt = 5  # non-finite steps are skipped; stop after this many in a row
    eval_every: PositiveInt = 5000
    resume_from_checkpoint: str | None = None  # latest | a checkpoint dir | null
    ema: bool = False  # EMA of the generator weights (LlamaGen's --ema); exported when on
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9999  # LlamaGen's update_ema default
    init_from: str | None = None  # exported tokenizer folder to fine-tune from (step 0; not a resume)

    @model_validator(mode="after")
    def _disc_lr(self) -> TrainSection:
        if self.disc_lr is None:
            self.disc_lr = self.lr
        return self


class EvalSection(ConfigSection):
    max_images: PositiveInt | None = 500
    lpips: bool = True
    vgg_ckpt_path: str | None = None
    rfid: bool = True
    inception_path: str | None = (
        None  # null = clean-fid / pytorch-fid caches; rFID skipped (logged) if absent
    )


class DinoVQConfig(ConfigSection):
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    dino: DinoSection = DinoSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    perf: PerfSection = PerfSection()  # throughput options (train/core/perf.py, docs/throughput.md)
