"""DINOv2 parameter names: the official torch.hub layout <-> Hugging Face ``Dinov2Model`` layouts.

Official checkpoints fuse q/k/v (``attn.qkv``) and SwiGLU's input projections (``mlp.w12``) and call the layer
scales ``ls1.gamma``; transformers splits them. Two transformers namings exist: the newer one
(``attention.q_proj`` ... ``mlp.gate_proj``/``up_proj``/``down_proj``), which the two main converters speak, and
the legacy one of 4.x and 5.x up to at least 5.17 (``attention.attention.query``, fused ``mlp.weights_in``),
translated by ``_modern_to_legacy`` / ``_legacy_to_modern`` for whichever transformers is installed.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_GLOBAL_OFFICIAL_TO_HF = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# per block, one official name -> one HF name
_BLOCK_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w3": "mlp.down_proj",
}
# per block, one official tensor -> several HF tensors, split along dim 0 in this order
_BLOCK_SPLITS = {
    "attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    # SwiGLUFFNFused: x1, x2 = w12(x).chunk(2); silu(x1) * x2 -> gate, up
    "mlp.w12": ("mlp.gate_proj", "mlp.up_proj"),
}
_LAYERSCALES = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
# official training checkpoints may chunk blocks for FSDP: blocks.<chunk>.<index>.*
_BLOCK_RE = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")


def _official_to_hf(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Convert official keys to HF keys; returns (converted, official keys that have no HF counterpart)."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in _GLOBAL_OFFICIAL_TO_HF:
            out[_GLOBAL_OFFICIAL_TO_HF[key]] = value
            continue
        match = _BLOCK_RE.match(key)
        if match is None:
            unknown.append(key)
            continue
        index, rest = match.groups()
        prefix = f"encoder.layer.{index}."
        if rest in _LAYERSCALES:
            out[prefix + _LAYERSCALES[rest]] = value
            continue
        module, _, param = rest.rpartition(".")
        if param not in ("weight", "bias"):
            unknown.append(key)
        elif module in _BLOCK_RENAMES:
            out[f"{prefix}{_BLOCK_RENAMES[module]}.{param}"] = value
        elif module in _BLOCK_SPLITS:
            targets = _BLOCK_SPLITS[module]
            if value.shape[0] % len(targets):
                unknown.append(key)
                continue
            for target, part in zip(targets, value.chunk(len(targets), dim=0)):
                out[f"{prefix}{target}.{param}"] = part
        else:
            unknown.append(key)
    return out, unknown


def _hf_to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``_official_to_hf`` (HF keys of Dinov2Model / Dinov2WithRegistersModel -> official layout)."""
    hf_to_global = {v: k for k, v in _GLOBAL_OFFICIAL_TO_HF.items()}
    renames = {v: k for k, v in _BLOCK_RENAMES.items()}
    layerscales = {v: k for k, v in _LAYERSCALES.items()}
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}
    layer_re = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
    for key, value in state_dict.items():
        if key in hf_to_global:
            out[hf_to_global[key]] = value
            continue
        match = layer_re.match(key)
        if match is None:
            raise KeyError(f"HF DINOv2 parameter {key!r} has no official counterpart")
        index, rest = match.groups()
        if rest in layerscales:
            out[f"blocks.{index}.{layerscales[rest]}"] = value
            continue
        module, _, param = rest.rpartition(".")
        if module in renames:
            out[f"blocks.{index}.{renames[module]}.{param}"] = value
            continue
        for official, targets in _BLOCK_SPLITS.items():
            if module in targets:
                pending.setdefault((index, official, param), {})[module] = value
                break
        else:
            raise KeyError(f"HF DINOv2 parameter {key!r} has no official counterpart")
    for (index, official, param), parts in pending.items():
        targets = _BLOCK_SPLITS[official]
        missing = [t for t in targets if t not in parts]
        if missing:
            raise KeyError(f"cannot fuse blocks.{index}.{official}.{param}: HF parts {missing} are absent")
        out[f"blocks.{index}.{official}.{param}"] = torch.cat([parts[t] for t in targets], dim=0)
    return out


# transformers releases before the q_proj/o_proj refactor (all of 4.x, and 5.x up to at least 5.17) name the
# same block tensors differently and keep SwiGLU's input projection fused; the hub's model files use these
# names too. The converters above speak the newer names; these two translate for the installed model.
_LEGACY_RENAMES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.down_proj": "mlp.weights_out",
}
_LEGACY_FUSED = (("mlp.gate_proj", "mlp.up_proj"), "mlp.weights_in")
_LAYER_KEY_RE = re.compile(r"^(encoder\.layer\.\d+\.)(.+)\.(weight|bias)$")


def uses_legacy_hf_names(model: nn.Module) -> bool:
    """Whether the installed transformers names DINOv2 attention ``attention.attention.query`` (older)."""
    return any(".attention.attention.query." in k for k in model.state_dict())


def _modern_to_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    (gate, up), legacy_fused = _LEGACY_FUSED
    for key, value in state_dict.items():
        m = _LAYER_KEY_RE.match(key)
        if m and m.group(2) in _LEGACY_RENAMES:
            out[f"{m.group(1)}{_LEGACY_RENAMES[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) in (gate, up):
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        else:
            out[key] = value
    for (prefix, param), parts in fused.items():
        out[f"{prefix}{legacy_fused}.{param}"] = torch.cat([parts[gate], parts[up]], dim=0)
    return out


def _legacy_to_modern(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    back = {v: k for k, v in _LEGACY_RENAMES.items()}
    (gate, up), legacy_fused = _LEGACY_FUSED
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _LAYER_KEY_RE.match(key)
        if m and m.group(2) in back:
            out[f"{m.group(1)}{back[m.group(2)]}.{m.group(3)}"] = value
        elif m and m.group(2) == legacy_fused:
            g, u = value.chunk(2, dim=0)  # SwiGLU: x1, x2 = weights_in(x).chunk(2); silu(x1) * x2
            out[f"{m.group(1)}{gate}.{m.group(3)}"] = g
            out[f"{m.group(1)}{up}.{m.group(3)}"] = u
        else:
            out[key] = value
    return out


def _model_state_modern(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return _legacy_to_modern(sd) if uses_legacy_hf_names(model) else sd
