"""A randomly initialised tiny DINOv2 (patch 14, LayerScale, 4 blocks, dim 64) in both real-world formats.

    <out>/dinov2_tiny14_pretrain.pth   official torch.hub layout (fused qkv, ls1.gamma, pos_embed, ...)
    <out>/hf/                          Hugging Face format (config.json + model.safetensors)

Both hold the same numbers, so tests can check that the adapter's conversion matches the HF path.
"""

from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_dinov2(out_dir: Path, seed: int = 3) -> dict[str, Path]:
    from models.dinov2_encoder import DINOv2Encoder, save_official_checkpoint

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    encoder = DINOv2Encoder(variant="tiny14", resolution=28, input_range="0_1")
    official = out_dir / "dinov2_tiny14_pretrain.pth"
    save_official_checkpoint(encoder, official)
    hf_dir = out_dir / "hf"
    encoder.save_pretrained(hf_dir)
    return {"dinov2_official": official, "dinov2_hf": hf_dir}
