"""SD-1.5 U-Net with U-REPA alignment heads (U-REPA, arXiv 2503.18414).

Forward hooks capture the output of the last ResNet of three 8x8 (at 512 px) stages of a diffusers
``UNet2DConditionModel``; an :class:`AlignHead` per layer projects those features to the DINO width first and
upsamples to the DINO patch grid afterwards (the paper's ablation favours projecting before upsampling),
giving L2-normalised tokens that the loss compares with cached DINOv2 patch tokens.

LoRA is restricted to a whitelist of the blocks around the aligned layers, the U-Net's lowest-resolution
stage: ``mid_block``, the last down block and the first up block (``down_blocks.3`` / ``up_blocks.0`` on SD-1.5's
four levels), so alignment and the diffusion loss are learnt by the same few modules. The last down block is
found from the U-Net (``down_blocks[-1]``), so a U-Net with SD-1.5's block types but fewer levels gets the same
stage, not a prefix that matches nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Layer name -> (attribute path of the block, index of the block or None); the hooked module is that block's
# resnets[-1]. On SD-1.5 at 512 px all three run at 8x8 with 1280 channels. enc_last is the last down block
# (index -1: down_blocks.3 on SD-1.5's four levels).
ALIGN_LAYERS: dict[str, tuple[str, int | None]] = {
    "enc_last": ("down_blocks", -1),
    "mid": ("mid_block", None),
    "dec_first": ("up_blocks", 0),
}

# SD-1.5's whitelist, as lora_whitelist_prefixes() derives it for a four-level U-Net.
LORA_WHITELIST_PREFIXES: tuple[str, ...] = ("mid_block.", "down_blocks.3.", "up_blocks.0.")
LORA_ATTENTION_SUFFIXES: tuple[str, ...] = (".to_q", ".to_k", ".to_v", ".to_out.0")
LORA_CONV_SUFFIXES: tuple[str, ...] = (".conv1", ".conv2")


def bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out_size, in_size] weights of 1-D bilinear resampling as ``F.interpolate(..., mode="bilinear",
    align_corners=False)`` computes it (source index ``(dst + 0.5) * in/out - 0.5`` clamped at 0, no
    antialias). Bilinear resampling is separable, so ``A_h @ x @ A_w.T`` equals the 2-D interpolation."""
    dst = torch.arange(out_size, dtype=torch.float64)
    src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = src - i0
    a = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    a.index_put_((rows, i0), 1.0 - w1, accumulate=True)
    a.index_put_((rows, i1), w1, accumulate=True)
    return a.float()


class AlignHead(nn.Module):
    """U-Net feature map [B,C,H,W] -> L2-normalised tokens [B, gh*gw, D] on the DINO patch grid.

    1x1 conv (no bias) -> GroupNorm(32, D) -> GELU at the U-Net resolution, then bilinear upsampling to the
    grid, flatten, L2 normalise in fp32 (bf16 normalisation is a known source of NaN in REPA).

    The upsampling is the same bilinear map as ``F.interpolate(align_corners=False)`` written as two small
    matrix products (:func:`bilinear_matrix`) that also put the tokens in [B, N, D] order: on an H100 the
    interpolate backward (atomic adds) plus the transposed token layout made head + loss ~5 % of an SD-1.5
    step at batch 48; the matrix form is deterministic and measured in docs/urepa.md.
    """

    def __init__(
        self, in_ch: int = 1280, D: int = 1024, grid: Sequence[int] = (16, 16), num_groups: int = 32
    ) -> None:
        super().__init__()
        if D % num_groups != 0:
            raise ValueError(f"AlignHead: D={D} must be divisible by GroupNorm groups={num_groups}")
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"AlignHead: grid must be (h, w) with positive sides, got {grid}")
        self.in_ch, self.D, self.grid = in_ch, D, grid
        self.proj = nn.Sequential(
            nn.Conv2d(in_ch, D, kernel_size=1, bias=False), nn.GroupNorm(num_groups, D), nn.GELU()
        )
        self._resample: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        if feat.ndim != 4 or feat.shape[1] != self.in_ch:
            raise ValueError(f"AlignHead expects [B,{self.in_ch},H,W], got {tuple(feat.shape)}")
        x = self.proj(feat).float()
        b, d, h, w = x.shape
        if (h, w) == self.grid:
            tokens = x.flatten(2).transpose(1, 2)
        else:
            a_h, a_w = self._resample_matrices(h, w, x.device)
            # [B,D,h,w] -> [B,gh,gw,D]: contiguous tokens, and a backward without atomics
            tokens = torch.einsum("ih,bdhw,jw->bijd", a_h, x, a_w).reshape(b, -1, d)
        return F.normalize(tokens, dim=-1)

    def _resample_matrices(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (h, w)
        if key not in self._resample or self._resample[key][0].device != device:
            self._resample[key] = (
                bilinear_matrix(self.grid[0], h).to(device),
                bilinear_matrix(self.grid[1], w).to(device),
            )
        return self._resample[key]


def align_module(unet: nn.Module, layer: str) -> nn.Module:
    """The module whose output is aligned for ``layer`` (``<block>.resnets[-1]``)."""
    if layer not in ALIGN_LAYERS:
        raise ValueError(f"unknown align layer {layer!r}; choose from {sorted(ALIGN_LAYERS)}")
    attr, idx = ALIGN_LAYERS[layer]
    block = getattr(unet, attr)
    if idx is not None:
        if not -len(block) <= idx < len(block):
            raise ValueError(f"align layer {layer!r}: the U-Net has only {len(block)} {attr}")
        block = block[idx]
    resnets = getattr(block, "resnets", None)
    if not resnets:
        raise ValueError(f"align layer {layer!r}: {type(block).__name__} has no resnets")
    return resnets[-1]


def align_module_name(layer: str, unet: nn.Module | None = None) -> str:
    """Module path of the hooked ResNet; with ``unet`` the last down block gets its real index."""
    attr, idx = ALIGN_LAYERS[layer]
    if idx is not None and idx < 0 and unet is not None:
        idx += len(getattr(unet, attr))
    return f"{attr}.{idx}.resnets.-1" if idx is not None else f"{attr}.resnets.-1"


def lora_whitelist_prefixes(unet: nn.Module) -> tuple[str, ...]:
    """The U-REPA LoRA whitelist of ``unet``: its mid block, last down block and first up block (the stage the
    aligned layers live in). SD-1.5 (four levels): ``LORA_WHITELIST_PREFIXES``."""
    return ("mid_block.", f"down_blocks.{len(unet.down_blocks) - 1}.", "up_blocks.0.")


def align_channels(unet: nn.Module, layer: str) -> int:
    """Output channels of the hooked ResNet (1280 on SD-1.5, whatever the config says elsewhere)."""
    return int(align_module(unet, layer).out_channels)


def find_lora_targets(
    unet: nn.Module,
    attention_only: bool = False,
    prefixes: Sequence[str] | None = None,
) -> list[str]:
    """Full names of the Linear/Conv2d modules that get LoRA: name suffix in the list, name under a prefix
    (default: :func:`lora_whitelist_prefixes` of ``unet``)."""
    prefixes = lora_whitelist_prefixes(unet) if prefixes is None else prefixes
    suffixes = LORA_ATTENTION_SUFFIXES + (() if attention_only else LORA_CONV_SUFFIXES)
    targets = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if name.startswith(tuple(prefixes)) and ("." + name).endswith(suffixes):
            targets.append(name)
    return targets


def whitelisted_parameters(unet: nn.Module, prefixes: Sequence[str] | None = None):
    prefixes = lora_whitelist_prefixes(unet) if prefixes is None else prefixes
    return [(n, p) for n, p in unet.named_parameters() if n.startswith(tuple(prefixes))]


class SD15UNetAligned(nn.Module):
    """A diffusers SD U-Net plus forward hooks and U-REPA alignment heads.

    Args:
        unet: ``UNet2DConditionModel`` (SD-1.5 block layout).
        align_layers: subset of ``("enc_last", "mid", "dec_first")``; empty -> no hooks, no heads (baseline).
        D: DINO token width (1024 for ViT-L/14).
        grid: DINO patch grid (h, w), from the cache metadata (16x16 for ViT-L/14 at 224 px).
        lora_config: None (no LoRA) or dict(rank=32, alpha=None (=rank), attention_only=False, dropout=0.0).
        full_finetune: also unfreeze every parameter of the whitelisted blocks (partial full fine-tune).
        verbose: print which modules got LoRA.
    """

    def __init__(
        self,
        unet: nn.Module,
        align_layers: Sequence[str] = ("mid",),
        D: int = 1024,
        lora_config: dict[str, Any] | None = None,
        grid: Sequence[int] = (16, 16),
        full_finetune: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.align_layers = tuple(align_layers)
        if len(set(self.align_layers)) != len(self.align_layers):
            raise ValueError(f"duplicate align layers: {self.align_layers}")
        self.D, self.grid = D, tuple(grid)
        self.unet.requires_grad_(False)
        self.lora_targets: list[str] = []
        if lora_config is not None:
            self.lora_targets = self._add_lora(lora_config, verbose)
        if full_finetune:
            for _, p in whitelisted_parameters(self.unet):
                p.requires_grad_(True)
        if lora_config is None and not full_finetune:
            raise ValueError("SD15UNetAligned: nothing to train (give lora_config and/or full_finetune=True)")
        self.heads = nn.ModuleDict(
            {layer: AlignHead(align_channels(unet, layer), D, grid) for layer in self.align_layers}
        )
        self._features: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, torch.Tensor] = {}
        self._handles = [
            align_module(unet, layer).register_forward_hook(self._make_hook(layer))
            for layer in self.align_layers
        ]

    def _add_lora(self, cfg: dict[str, Any], verbose: bool) -> list[str]:
        from peft import LoraConfig

        unknown = set(cfg) - {"rank", "alpha", "attention_only", "dropout"}
        if unknown:
            raise ValueError(f"unknown lora_config keys {sorted(unknown)}")
        rank = int(cfg.get("rank", 32))
        targets = find_lora_targets(self.unet, attention_only=bool(cfg.get("attention_only", False)))
        if not targets:
            raise ValueError("LoRA whitelist matched no module in this U-Net")
        config = LoraConfig(
            r=rank,
            lora_alpha=int(cfg.get("alpha") or rank),
            lora_dropout=float(cfg.get("dropout", 0.0)),
            init_lora_weights="gaussian",
            target_modules=targets,
        )
        self.unet.add_adapter(config)
        if verbose:
            print(f"[sd15_unet_aligned] LoRA rank {rank} on {len(targets)} modules:")
            for name in targets:
                print(f"  {name}")
        return targets

    def _make_hook(self, layer: str):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            self._features[layer] = output

        return hook

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_tokens: bool = True,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """U-Net prediction and {layer: [B,N,D]} aligned tokens (empty without align layers).

        The heads run inside ``forward`` so DDP sees their parameters used in the same pass as the U-Net.
        """
        self._features.clear()
        pred = self.unet(latents, timesteps, encoder_hidden_states=encoder_hidden_states).sample
        tokens = {}
        if return_tokens:
            tokens = {layer: self.heads[layer](self._features[layer]) for layer in self.align_layers}
        self._features.clear()  # don't keep activations alive after the pass
        self._tokens = tokens
        return pred, tokens

    def get_aligned_tokens(self) -> dict[str, torch.Tensor]:
        """Tokens of the last forward pass, {layer: [B, N, D]}."""
        return dict(self._tokens)

    def clear_hooks(self) -> None:
        """Remove the forward hooks and drop cached features/tokens (the heads stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._features.clear()
        self._tokens = {}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained parameters (LoRA / whitelisted blocks + heads), by their names in this module."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise KeyError(
                f"trainable state mismatch: missing {sorted(missing)[:5]} ({len(missing)}), "
                f"unexpected {sorted(unexpected)[:5]} ({len(unexpected)}); was it saved with another config?"
            )
        with torch.no_grad():
            for n, v in state.items():
                if params[n].shape != v.shape:
                    raise ValueError(
                        f"{n}: checkpoint shape {tuple(v.shape)} != model {tuple(params[n].shape)}"
                    )
                params[n].copy_(v)

    def _peft_lora_state(self) -> dict[str, torch.Tensor]:
        """peft keys (``<module path>.lora_A.weight`` / ``.lora_B.weight``) of the U-Net's LoRA adapter."""
        from peft.utils import get_peft_model_state_dict

        if not self.lora_targets:
            raise ValueError("SD15UNetAligned: no LoRA adapter (lora_config was None)")
        return get_peft_model_state_dict(self.unet)

    def lora_adapter_metadata(self) -> dict[str, Any]:
        """The adapter's ``LoraConfig`` as a dict (rank, alpha, target modules), as diffusers stores it.

        peft keeps ``target_modules`` as a set, whose order follows the per-process string hash; sorted, the
        same weights give the same file bytes."""
        config = self.unet.peft_config["default"].to_dict()
        return {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in config.items()}

    def lora_state_dict_diffusers(self) -> dict[str, torch.Tensor]:
        """LoRA weights as diffusers' ``StableDiffusionPipeline.save_lora_weights`` writes them: peft keys
        (``lora_A`` / ``lora_B``, the same style for attention and conv layers) under the ``unet.`` prefix.

        A file holding exactly this dict loads with a stock ``pipe.load_lora_weights(dir)``. Such a file has no
        adapter metadata, and diffusers then takes ``lora_alpha = rank``; when the config's alpha differs, the
        scale ``alpha / rank`` is therefore folded into ``lora_B`` so that the loaded U-Net computes the same.
        (The mixed ``lora.down/up`` + ``lora_A/B`` keys written before made ``load_lora_weights`` silently drop
        every attention tensor.)
        """
        from diffusers import StableDiffusionPipeline

        # Copies: get_peft_model_state_dict returns the live parameters, and a caller that reads the EMA
        # weights inside ``ema.average_parameters`` and saves after the block would otherwise write the
        # restored live weights.
        state = {k: v.detach().clone() for k, v in self._peft_lora_state().items()}
        config = self.unet.peft_config["default"]
        if config.rank_pattern or config.alpha_pattern:
            raise ValueError("lora_state_dict_diffusers: per-module rank/alpha patterns are not supported")
        scale = float(config.lora_alpha) / float(config.r)
        if scale != 1.0:
            state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
        return StableDiffusionPipeline.pack_weights(state, StableDiffusionPipeline.unet_name)

    def save_lora_weights(
        self, save_directory: str | Path, weight_name: str = "pytorch_lora_weights.safetensors"
    ) -> Path:
        """Write the LoRA through diffusers' own ``StableDiffusionPipeline.save_lora_weights`` (peft keys, the
        adapter config as metadata, so alpha != rank is stored as such). Returns the file path."""
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            str(save_directory),
            unet_lora_layers=self._peft_lora_state(),
            unet_lora_adapter_metadata=self.lora_adapter_metadata(),
            weight_name=weight_name,
            safe_serialization=True,
        )
        return Path(save_directory) / weight_name


@contextmanager
def capture_features(unet: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Raw hooked features {layer: [B,C,H,W]} of any U-Net (also one without heads), for evaluation."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:

        def hook(module, inputs, output, layer=layer):
            store[layer] = output.detach()

        handles.append(align_module(unet, layer).register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
