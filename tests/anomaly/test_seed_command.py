"""The seed document's two training commands (shared/seeds/000_*.txt), parsed verbatim by our trainers.

Each flag must mean what it means in the seed, and what the seed leaves at its defaults must be the
reference trainer's behaviour (few-shot split, flips, resize, fg background, LR schedule).
"""

from __future__ import annotations

import shlex

from train.anomaly.args import parse, stage1_parser, stage2_parser

MODEL_NAME, INSTANCE_DIR, NAME, ANOMALY, OUTPUT_DIR = (
    "models/stable-diffusion-v1-5",
    "datasets/mvtec_ad",
    "hazelnut",
    "hole",
    "all_generate/",
)

SEED_STAGE1 = f"""
    --mixed_precision="no" --mvtec_name={NAME} --pretrained_model_name_or_path={MODEL_NAME}
    --instance_data_dir={INSTANCE_DIR} --output_dir="{OUTPUT_DIR}/{NAME}/stage1-full" --instance_prompt="a vfx"
    --resolution=512 --train_batch_size=8 --learning_rate=2e-5 --max_train_steps=5000 --rank 32
    --train_text_encoder --use_dinov2_loss --dinov2_loss_weight=0.1 --dinov2_model_name="vitb14"
    --dinov2_loss_type="l2" --dinov2_feature_layers 3 6 9 11
"""

SEED_STAGE2 = f"""
    --mixed_precision="no" --mvtec_name={NAME} --mvtec_anamaly_name={ANOMALY}
    --pretrained_model_name_or_path={MODEL_NAME} --instance_data_dir={INSTANCE_DIR}
    --output_dir="{OUTPUT_DIR}/{NAME}/stage2-{ANOMALY}-dual" --instance_prompt_blend="a vfx with sks"
    --instance_prompt_fg="sks" --resolution=512 --train_batch_size=4 --learning_rate=2e-5 --max_train_steps=8000
    --resume_from_checkpoint="{OUTPUT_DIR}/{NAME}/stage1-full/checkpoint-5000" --rank 32 --train_text_encoder
    --use_dinov2_loss --dinov2_loss_weight=0.1 --dinov2_model_name="vitb14" --dinov2_loss_type="l2"
    --dinov2_feature_layers 3 6 9 11
"""


def _common_checks(a, batch: int, steps: int) -> None:
    assert a.mixed_precision == "no" and a.mvtec_name == NAME
    assert a.pretrained_model_name_or_path == MODEL_NAME and a.instance_data_dir == INSTANCE_DIR
    assert (a.resolution, a.train_batch_size, a.learning_rate, a.max_train_steps) == (512, batch, 2e-5, steps)
    assert a.rank == 32 and a.train_text_encoder
    assert a.use_dinov2_loss and a.dinov2_loss_weight == 0.1 and a.dinov2_model_name == "vitb14"
    assert a.dinov2_loss_type == "l2" and a.dinov2_feature_layers == [3, 6, 9, 11]
    # what the seed leaves at the diffusers DreamBooth-LoRA script's defaults
    assert a.lr_scheduler == "constant" and a.adam_weight_decay == 1e-2 and a.max_grad_norm == 1.0
    assert (a.adam_beta1, a.adam_beta2, a.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert a.gradient_accumulation_steps == 1 and not a.scale_lr
    # the reference trainers' augmentation: flips resolved per class by the dataset (hv; none for cable)
    assert a.flip is None and a.resize_mode == "bilinear"


def test_seed_stage1_command():
    a = parse(stage1_parser(), shlex.split(SEED_STAGE1))
    _common_checks(a, batch=8, steps=5000)
    assert a.instance_prompt == "a vfx" and a.output_dir == f"{OUTPUT_DIR}/{NAME}/stage1-full"


def test_seed_stage2_command():
    a = parse(stage2_parser(), shlex.split(SEED_STAGE2))
    _common_checks(a, batch=4, steps=8000)
    assert a.mvtec_anomaly_name == ANOMALY
    assert (a.instance_prompt_blend, a.instance_prompt_fg) == ("a vfx with sks", "sks")
    assert a.resume_from_checkpoint == f"{OUTPUT_DIR}/{NAME}/stage1-full/checkpoint-5000"
    assert a.split_rule == "official" and a.fg_background == "grey"
    # the interaction module of DualAnoDiff, starting as the stage-1 model (the seed resumes from stage 1)
    assert (
        a.interaction_preset == "official" and a.interaction_init == "zero" and a.interaction_reduction == 1
    )
