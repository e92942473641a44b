"""Plain pre-norm ViT building blocks (timm-style, PyTorch SDPA attention) used by the DinoVQ tokenizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenTransformer(nn.Module):
    """``in_dim`` tokens -> linear -> + learned position embedding -> ``depth`` blocks -> LayerNorm."""

    def __init__(self, num_tokens: int, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, dim) if in_dim != dim else nn.Identity()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def init_vit_weights(m: nn.Module) -> None:
    """timm ViT init: truncated-normal(0.02) linears with zero bias, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """[B,C,H,W] -> [B, (H/p)(W/p), p*p*C]."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """[B, h*w, p*p*C] -> [B,C,h*p,w*p] (inverse of ``patchify``)."""
    b = x.shape[0]
    h, w = grid
    x = x.reshape(b, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h * p, w * p)
