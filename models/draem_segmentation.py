"""DRAEM's discriminative sub-network (Zavrtanik et al., ICCV 2021): the segmentation U-Net of the
anomaly-generation papers' localization benchmark.

A U-Net trained from scratch: an encoder of six stages (two 3x3 conv + BatchNorm + ReLU each, 2x2 max-pool
between them; widths w, 2w, 4w, 8w, 8w, 8w) and a decoder of five stages (bilinear x2 upsampling with
``align_corners=True`` + conv, concatenation with the encoder stage of the same size, two convs), then a 3x3
conv to ``out_channels`` logits. AnomalyDiffusion and DualAnoDiff feed it the RGB image alone
(``in_channels=3``, ``out_channels=2``; DRAEM itself feeds image + reconstruction, 6 channels); the anomaly map
is ``softmax(logits)[:, 1]``. Parameter names follow the reference code (``encoder_segment.block1.0.weight``
...) so its state dicts load unchanged. The input side must be a multiple of 32 (five poolings).
"""

from __future__ import annotations

import torch
from torch import nn

ENCODER_WIDTHS = (1, 2, 4, 8, 8, 8)  # x base_width, stages block1..block6


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _up_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(in_ch, out_ch, 3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class EncoderDiscriminative(nn.Module):
    def __init__(self, in_channels: int, base_width: int):
        super().__init__()
        widths = [m * base_width for m in ENCODER_WIDTHS]
        prev = in_channels
        for i, w in enumerate(widths, start=1):
            setattr(self, f"block{i}", _double_conv(prev, w))
            prev = w
        for i in range(1, len(widths)):
            setattr(self, f"mp{i}", nn.Sequential(nn.MaxPool2d(2)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.block1(x)]
        for i in range(2, len(ENCODER_WIDTHS) + 1):
            feats.append(getattr(self, f"block{i}")(getattr(self, f"mp{i - 1}")(feats[-1])))
        return feats


class DecoderDiscriminative(nn.Module):
    # (name, input width, skip width, output width) in units of base_width, from the bottleneck up
    STAGES = (("b", 8, 8, 8), ("1", 8, 8, 4), ("2", 4, 4, 2), ("3", 2, 2, 1), ("4", 1, 1, 1))

    def __init__(self, base_width: int, out_channels: int):
        super().__init__()
        w = base_width
        for name, c_in, c_skip, c_out in self.STAGES:
            setattr(self, f"up{'_' + name if name == 'b' else name}", _up_conv(c_in * w, c_out * w))
            setattr(
                self,
                f"db{'_' + name if name == 'b' else name}",
                _double_conv((c_out + c_skip) * w, c_out * w),
            )
        self.fin_out = nn.Sequential(nn.Conv2d(w, out_channels, 3, padding=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for (name, *_), skip in zip(self.STAGES, reversed(feats[:-1]), strict=True):
            key = "_" + name if name == "b" else name
            x = getattr(self, f"up{key}")(x)
            x = getattr(self, f"db{key}")(torch.cat((x, skip), dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    """``[B, in_channels, H, W]`` -> ``[B, out_channels, H, W]`` logits (H, W multiples of 32)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2, base_width: int = 64):
        super().__init__()
        self.encoder_segment = EncoderDiscriminative(in_channels, base_width)
        self.decoder_segment = DecoderDiscriminative(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(
                f"input side must be a multiple of 32 (five 2x poolings), got {tuple(x.shape[-2:])}"
            )
        return self.decoder_segment(self.encoder_segment(x))


def init_weights(module: nn.Module) -> None:
    """The references' ``weights_init``: conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02), BN bias 0
    (conv biases keep PyTorch's default init). Draws from the global RNG: seed before calling."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
