"""The U-REPA config (train_sd15.py): every key, its type and its default, in one place.

``load_config(path, overrides, schema=URepaConfig)`` (utils/config.py) rejects unknown keys (naming the file and
the closest valid key), checks every value's type and range, and returns the dict with every key set. The
defaults are setting A of the paper (configs/sd15_repa_A.yaml, which lists them all for reference).
``optim.lr: null`` means 2e-4 for LoRA and 1e-4 for the full fine-tunes; ``optim.lr: 0`` is taken as 0.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from losses.urepa import PREDICTION_TYPES
from models.sd15_unet_aligned import ALIGN_LAYERS
from train.core.config import PerfSection
from train.urepa.sampling import SAMPLERS
from train.urepa.setup import FINETUNE_MODES
from utils.config import ConfigSection
from utils.weights import SD15_LOCAL_DIR

# diffusers.optimization.get_scheduler names that need no extra arguments (piecewise_constant needs step rules)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
DEFAULT_LR = {"lora": 2e-4, "full": 1e-4, "lora+full": 1e-4}

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Pair = Annotated[list[PositiveInt], Field(min_length=2, max_length=2)]


class LoraSection(ConfigSection):
    rank: PositiveInt = 32
    alpha: PositiveInt | None = None  # null -> rank (scale 1)
    attention_only: bool = False  # true: only to_q/to_k/to_v/to_out.0; false: also ResNet conv1/conv2
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class ModelSection(ConfigSection):
    pretrained: str = SD15_LOCAL_DIR  # local diffusers dir or a hub id in the HF cache
    align_layers: Annotated[list[Literal[tuple(ALIGN_LAYERS)]], Field(min_length=1)] = ["mid"]
    D: PositiveInt | None = None  # DINO token width; null -> the DINO cache metadata
    grid: Pair | PositiveInt | None = None  # DINO patch grid; null -> the DINO cache metadata
    finetune: Literal[FINETUNE_MODES] = "lora"
    lora: LoraSection = LoraSection()
    gradient_checkpointing: bool = False


class DataSection(ConfigSection):
    csv: str | None = "data/urepa/train_200k.csv"
    latent_dir: str | None = "data/urepa/latents_200k"
    dino_dir: str | None = "data/urepa/dino_vitl14_224_200k"
    clip_embeddings: str | None = "data/urepa/clip_embeddings.pt"
    cfg_dropout: Fraction = 0.1  # prompt -> null prompt with this probability (in the loop, seeded per step)
    num_workers: NonNegativeInt = 8
    factory: str | None = None  # a registered dataset factory (train/urepa/data.py); null -> the LMDB caches
    factory_kwargs: dict[str, Any] = {}
    # a corrupt cache record: skip it (counted, logged) or fail
    on_bad_record: Literal["skip", "error"] = "skip"
    # record checksums: verified once per sample and run, on every read, or never (lengths always)
    verify_checksums: Literal["once", "always", "off"] = "once"

    @field_validator("factory")
    @classmethod
    def _registered(cls, name: str | None) -> str | None:
        if name is not None:
            from train.urepa.data import dataset_factory

            dataset_factory(name)  # an error listing the registered names
        return name

    @model_validator(mode="after")
    def _caches_named(self) -> DataSection:
        if self.factory is None:
            missing = [
                k for k in ("csv", "latent_dir", "dino_dir", "clip_embeddings") if getattr(self, k) is None
            ]
            if missing:
                raise ValueError(
                    f"without data.factory the LMDB caches are read: set data.{', data.'.join(missing)}"
                )
        return self


class LossSection(ConfigSection):
    prediction: Literal[PREDICTION_TYPES] = "v"
    align_coeff: Annotated[float, Field(ge=0.0)] = 0.8  # lambda; 0 = the baseline (no hooks, no heads)
    manifold_coeff: Annotated[float, Field(ge=0.0)] = 3.0  # w
    manifold_upper_only: bool = False


class OptimSection(ConfigSection):
    lr: Annotated[float, Field(ge=0.0)] | None = None  # null -> DEFAULT_LR[model.finetune]
    betas: Annotated[list[Annotated[float, Field(ge=0.0, lt=1.0)]], Field(min_length=2, max_length=2)] = [
        0.9,
        0.999,
    ]
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    eps: Annotated[float, Field(gt=0.0)] = 1.0e-8
    lr_scheduler: Literal[LR_SCHEDULERS] = "cosine"
    warmup_ratio: Fraction = 0.1
    max_grad_norm: Annotated[float, Field(gt=0.0)] = 1.0


class EMASection(ConfigSection):
    decay: Fraction = 0.9995


class TrainSection(ConfigSection):
    batch_size: PositiveInt = 64  # per process
    gradient_accumulation_steps: PositiveInt = 1
    max_steps: PositiveInt = 60000
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: PositiveInt = 50
    report_to: str = (
        "tensorboard"  # trackers: tensorboard, wandb, comet_ml, mlflow, ..., all, none (comma list)
    )
    checkpointing_steps: NonNegativeInt = 5000  # 0: only the last step
    checkpoints_total_limit: PositiveInt | None = 5
    resume_from_checkpoint: str | None = "latest"  # latest | a checkpoint dir | null
    overwrite_output_dir: bool = False  # true: start fresh in a dir holding a run (its checkpoints deleted)
    allow_config_change: bool = (
        False  # true: resume although lr/schedule/batch/LoRA settings changed (applied)
    )
    max_consecutive_nonfinite: PositiveInt = 20  # non-finite steps are skipped; stop after this many in a row
    stop_at_step: PositiveInt | None = None
    sample_every: NonNegativeInt = 5000  # 0 disables sample grids
    sample_classes: Annotated[list[NonNegativeInt], Field(min_length=1)] = [
        1,
        88,
        207,
        279,
        360,
        387,
        417,
        980,
    ]


class SamplingSection(ConfigSection):
    sampler: Literal[SAMPLERS] = "dpmsolver++"
    num_steps: PositiveInt = 25
    cfg_scale: Annotated[float, Field(ge=0.0)] = 7.5
    guidance_low: Fraction = 0.0
    guidance_high: Fraction = 0.7


class URepaConfig(ConfigSection):
    output_dir: str
    seed: int = 0
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    ema: EMASection = EMASection()
    train: TrainSection = TrainSection()
    sampling: SamplingSection = SamplingSection()
    # throughput options (train/core/perf.py, docs/throughput.md); batches pinned on a GPU, as always here
    perf: PerfSection = PerfSection(dataloader_pin_memory=True)

    @model_validator(mode="after")
    def _resolve(self) -> URepaConfig:
        if self.optim.lr is None:  # the one place the LR default depends on the fine-tuning mode
            self.optim.lr = DEFAULT_LR[self.model.finetune]
        if self.sampling.guidance_low > self.sampling.guidance_high:
            raise ValueError(
                f"sampling.guidance_low {self.sampling.guidance_low} > guidance_high {self.sampling.guidance_high}"
            )
        return self
