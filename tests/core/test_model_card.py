"""Model cards (utils/model_card.py): Hugging Face format, read back with huggingface_hub."""

from __future__ import annotations

import argparse

from huggingface_hub import ModelCard

from utils.model_card import lora_card, tokenizer_card, write_card


def test_lora_card_round_trips_through_huggingface_hub(tmp_path):
    card = lora_card(
        base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        title="A LoRA",
        description="What it is.",
        weight_names=["a.safetensors", "b.safetensors"],
        prompts={"blend": "a vfx with sks", "fg": "sks"},
        trigger_words=["sks"],
        class_name="hazelnut",
        defect="hole",
        flags={"rank": 4, "learning_rate": 1e-4, "pipe": "a|b", "nested": {"skipped": 1}},
        data_split="the first third",
        metrics={"ic_lpips": 0.31},
        sampling={"num_inference_steps": 100, "guidance_scale": 2.5},
    )
    path = write_card(card, tmp_path)
    loaded = ModelCard.load(path)
    assert loaded.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert loaded.data.library_name == "diffusers" and loaded.data.license == "creativeml-openrail-m"
    assert loaded.data.instance_prompt == "a vfx with sks" and "lora" in loaded.data.tags
    text = loaded.text
    assert 'pipe.load_lora_weights("path/to/this/folder", weight_name="a.safetensors")' in text
    assert "pipe('a vfx with sks', num_inference_steps=100, guidance_scale=2.5)" in text
    assert "| `rank` | 4 |" in text and "| `pipe` | a\\|b |" in text and "skipped" not in text
    assert "| ic_lpips | 0.31 |" in text and "| MVTec AD class | hazelnut |" in text
    assert "the first third" in text


def test_no_metrics_is_said(tmp_path):
    card = lora_card(base_model="sd", title="t", description="d", weight_names=["w"], prompts={"p": "x"})
    assert "Not measured" in str(card)


def test_tokenizer_card_for_the_dinovq_export(tmp_path):
    card = tokenizer_card(
        title="DinoVQ tokenizer",
        description="A VQ tokenizer.",
        weight_names=["model.safetensors", "config.json"],
        config={"codebook_size": 16384, "embed_dim": 8},
        how_to_load="```python\nfrom models.dinovq import DinoVQ\n```",
        base_model="facebook/dinov2-base",
        metrics={"rfid": 1.5},
    )
    loaded = ModelCard.load(write_card(card, tmp_path))
    assert loaded.data.base_model == "facebook/dinov2-base" and "image-tokenizer" in loaded.data.tags
    assert "| codebook_size | 16384 |" in loaded.text and "from models.dinovq import DinoVQ" in loaded.text


def test_stage2_card_from_flags(tmp_path):
    from train.anomaly.model_cards import write_stage2_card

    args = argparse.Namespace(
        pretrained_model_name_or_path="models/sd15", mvtec_name="hazelnut", mvtec_anomaly_name="crack",
        fg_background="black", instance_prompt_blend="a vfx with sks", instance_prompt_fg="sks", split_rule="official",
    )  # fmt: skip
    text = write_stage2_card(args, tmp_path, ["pytorch_lora_weights_blend.safetensors"]).read_text()
    assert "MVTec AD hazelnut / crack" in text and "--split_rule official" in text
    assert "DualAnoDiffPipeline" in text and "num_inference_steps=100" in text
