"""Dual-interrelated LoRA U-Net (DualAnoDiff stage 2): two branches denoised jointly by one SD U-Net.

The blend branch sees the whole anomalous image ("a vfx with sks"), the fg branch only the anomaly
("sks"). Both branches run through the same frozen U-Net in one batch ``[blend; fg]``:

* every attention projection (``to_q, to_k, to_v, to_out.0`` of self- and cross-attention) carries two
  LoRA sets; the first half of the batch goes through set 0 (blend), the second half through set 1 (fg);
* after every attention layer a :class:`BranchInteraction` lets the two branches exchange information:
  at each spatial position the two branch tokens attend to each other (LayerNorm -> Linear -> q/k/v ->
  attention over the branch axis -> output projection), added residually. Two presets:
  ``official`` = DualAnoDiff's processor (single head, width C, q/k/v with bias, LayerNorm eps 1e-6; its
  ``temporal_n/i/q/k/v/o`` are our ``norm/proj_in/to_q/to_k/to_v/proj_out``), ``light`` = a smaller module
  (width C/reduction, ``attn.heads`` heads, no q/k/v bias, LayerNorm eps 1e-5). With
  ``interaction_init="zero"`` the output projection is zero-initialised, so a freshly built model computes
  exactly what the stage-1 LoRA U-Net computes; ``"default"`` keeps PyTorch's init (the reference's).

``dual_mode="shared"`` is the seed's original stage 2 (ablation): one LoRA set for both branches and no
interaction, so the two branches are independent samples of one batch.

The wrapped U-Net keeps its diffusers module paths (``...attn1.to_q`` becomes a :class:`DualLoRALinear`
whose ``base`` is the original ``nn.Linear``); interaction modules are attached with forward hooks, so the
U-Net's own code is untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DUAL_MODES = ("interrelated", "shared")
INTERACTION_PRESETS = ("official", "light")
INTERACTION_INITS = ("zero", "default")
LIGHT_INTERACTION_REDUCTION = 4
BRANCHES = ("blend", "fg")

DUAL_WEIGHTS_NAME = "dual_unet.safetensors"
TEXT_ENCODER_WEIGHTS_NAME = "text_encoder_lora.safetensors"
DUAL_CONFIG_NAME = "dual_config.json"


class _BranchContext:
    """Shared, mutable routing state read by every LoRA layer and interaction hook.

    Set by the last call: ``num_branches`` = 2 after :meth:`DualLoRAUNet.forward` (the batch is
    ``[blend; fg]``); ``single_branch`` = 0/1 after :meth:`DualLoRAUNet.forward_branch`. It stays set after
    the call so that gradient-checkpointing recomputation in the backward pass routes the same way.
    """

    def __init__(self) -> None:
        self.num_branches = 0
        self.single_branch: int | None = None


class DualLoRALinear(nn.Module):
    """``base(x) + scale * B_i(A_i(x))`` with LoRA set ``i`` chosen per batch half (peft-style init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, num_sets: int, context: _BranchContext):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.context = context
        self.lora_A = nn.ModuleList([nn.Linear(base.in_features, rank, bias=False) for _ in range(num_sets)])
        self.lora_B = nn.ModuleList([nn.Linear(rank, base.out_features, bias=False) for _ in range(num_sets)])
        for a, b in zip(self.lora_A, self.lora_B):
            # The reference's LoRALinearLayer init (= peft's "gaussian", what stage 1 uses): A ~ N(0, 1/rank),
            # B zero -> the layer starts as ``base``.
            nn.init.normal_(a.weight, std=1.0 / rank)
            nn.init.zeros_(b.weight)

    # Some diffusers code paths read ``attn.to_q.weight`` (dtype/device checks); delegate to the base layer.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def _lora(self, x: torch.Tensor, i: int) -> torch.Tensor:
        a, b = self.lora_A[i], self.lora_B[i]
        return b(a(x.to(a.weight.dtype))).to(x.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        n_sets = len(self.lora_A)
        if n_sets == 1:
            return out + self._lora(x, 0)
        if self.context.single_branch is not None:
            return out + self._lora(x, self.context.single_branch)
        if self.context.num_branches != 2:
            raise RuntimeError(
                "DualLoRALinear with two LoRA sets called outside DualLoRAUNet.forward/forward_branch: "
                "the batch cannot be routed to a branch."
            )
        xs = x.chunk(2, dim=0)
        return out + torch.cat([self._lora(xs[0], 0), self._lora(xs[1], 1)], dim=0)


class BranchInteraction(nn.Module):
    """Attention across the branch axis at each spatial position, added residually.

    Input/output ``[B, N, S, C]`` (S = 2 branches): ``x + proj_out(attn(to_q(h), to_k(h), to_v(h)))`` with
    ``h = proj_in(norm(x))`` and softmax attention over the S branch tokens (``heads`` heads of width
    ``hidden_dim / heads``, scale ``1/sqrt(head width)``).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        heads: int,
        qkv_bias: bool = False,
        norm_eps: float = 1e-5,
        zero_init: bool = True,
    ):
        super().__init__()
        if hidden_dim % heads:
            heads = 1
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.proj_in = nn.Linear(dim, hidden_dim)
        self.to_q = nn.Linear(hidden_dim, hidden_dim, bias=qkv_bias)
        self.to_k = nn.Linear(hidden_dim, hidden_dim, bias=qkv_bias)
        self.to_v = nn.Linear(hidden_dim, hidden_dim, bias=qkv_bias)
        self.proj_out = nn.Linear(hidden_dim, dim)
        if zero_init:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)

    @classmethod
    def for_preset(
        cls,
        preset: str,
        dim: int,
        attn_heads: int,
        reduction: int = LIGHT_INTERACTION_REDUCTION,
        init: str = "zero",
    ) -> BranchInteraction:
        """The module of one attention layer of width ``dim`` under an interaction preset."""
        if preset not in INTERACTION_PRESETS:
            raise ValueError(f"interaction preset must be one of {INTERACTION_PRESETS}, got {preset!r}")
        if init not in INTERACTION_INITS:
            raise ValueError(f"interaction init must be one of {INTERACTION_INITS}, got {init!r}")
        zero = init == "zero"
        if preset == "official":
            return cls(dim, dim, heads=1, qkv_bias=True, norm_eps=1e-6, zero_init=zero)
        return cls(dim, max(1, dim // reduction), heads=attn_heads, zero_init=zero)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, s, _ = tokens.shape
        h = self.proj_in(self.norm(tokens.to(self.proj_in.weight.dtype)))
        d = h.shape[-1] // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, N, S, H*d] -> [B*N, H, S, d]
            return t.reshape(b * n, s, self.heads, d).transpose(1, 2)

        attn = F.scaled_dot_product_attention(split(self.to_q(h)), split(self.to_k(h)), split(self.to_v(h)))
        attn = attn.transpose(1, 2).reshape(b, n, s, self.heads * d)
        return tokens + self.proj_out(attn).to(tokens.dtype)


def _attention_modules(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention)]


def _get_submodule_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), child


class DualLoRAUNet(nn.Module):
    """A diffusers ``UNet2DConditionModel`` with dual LoRA sets and branch interaction (frozen base).

    Args:
        unet: the base U-Net (modified in place: target projections are wrapped, the base is frozen).
        rank: LoRA rank; ``alpha`` defaults to ``rank`` (scale 1, as the diffusers DreamBooth-LoRA script).
        dual_mode: "interrelated" (two LoRA sets + interaction) or "shared" (one LoRA set, no interaction).
        interaction_preset: "official" (DualAnoDiff's module) or "light"; see the module docstring.
        interaction_init: "zero" (output projection zero: starts as the stage-1 model) or "default".
        interaction_reduction: light preset only: q/k/v width = attention width // reduction (default 4).
        target_modules: attention projections that get LoRA.
    """

    def __init__(
        self,
        unet: nn.Module,
        rank: int,
        dual_mode: str = "interrelated",
        alpha: float | None = None,
        interaction_reduction: int | None = None,
        target_modules: tuple[str, ...] = LORA_TARGETS,
        interaction_preset: str = "official",
        interaction_init: str = "zero",
    ):
        super().__init__()
        if dual_mode not in DUAL_MODES:
            raise ValueError(f"dual_mode must be one of {DUAL_MODES}, got {dual_mode!r}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if interaction_preset not in INTERACTION_PRESETS:
            raise ValueError(
                f"interaction_preset must be one of {INTERACTION_PRESETS}, got {interaction_preset!r}"
            )
        if interaction_init not in INTERACTION_INITS:
            raise ValueError(f"interaction_init must be one of {INTERACTION_INITS}, got {interaction_init!r}")
        if interaction_preset == "official":
            if interaction_reduction not in (None, 1):
                raise ValueError("interaction_reduction applies to the light preset only (official: width C)")
            interaction_reduction = 1
        elif interaction_reduction is None:
            interaction_reduction = LIGHT_INTERACTION_REDUCTION
        if interaction_reduction < 1:
            raise ValueError(f"interaction_reduction must be >= 1, got {interaction_reduction}")
        self.unet = unet
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.dual_mode = dual_mode
        self.interaction_preset = interaction_preset
        self.interaction_init = interaction_init
        self.interaction_reduction = interaction_reduction
        self.target_modules = tuple(target_modules)
        self.context = _BranchContext()
        unet.requires_grad_(False)

        attn_modules = _attention_modules(unet)
        if not attn_modules:
            raise ValueError("DualLoRAUNet: the U-Net has no diffusers Attention modules")
        num_sets = 2 if dual_mode == "interrelated" else 1
        for attn_name, _attn in attn_modules:
            for target in self.target_modules:
                path = f"{attn_name}.{target}"
                parent, child = _get_submodule_parent(unet, path)
                base = parent.get_submodule(child) if not child.isdigit() else parent[int(child)]
                if isinstance(base, DualLoRALinear):
                    continue
                if not isinstance(base, nn.Linear):
                    raise TypeError(f"LoRA target {path} is {type(base).__name__}, expected nn.Linear")
                wrapped = DualLoRALinear(base, rank, self.alpha, num_sets, self.context)
                wrapped.to(device=base.weight.device)
                if child.isdigit():
                    parent[int(child)] = wrapped
                else:
                    setattr(parent, child, wrapped)

        # Interaction modules live here (not inside the U-Net) so that the U-Net keeps its structure.
        self.interactions = nn.ModuleDict()
        self._hooks = []
        self.attention_names = [name for name, _ in attn_modules]
        if dual_mode == "interrelated":
            for attn_name, attn in attn_modules:
                module = BranchInteraction.for_preset(
                    interaction_preset,
                    dim=attn.to_out[0].out_features,
                    attn_heads=attn.heads,
                    reduction=interaction_reduction,
                    init=interaction_init,
                )
                module.to(device=attn.to_out[0].weight.device)
                key = attn_name.replace(".", "__")
                self.interactions[key] = module
                self._hooks.append(attn.register_forward_hook(self._make_hook(key)))

    # ------------------------------------------------------------------ forward
    def _make_hook(self, key: str):
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
            if self.context.num_branches != 2:
                return output  # single-branch forward: no partner branch to interact with
            if output.ndim != 3:
                raise RuntimeError(
                    f"interaction expects [B, N, C] attention output, got {tuple(output.shape)}"
                )
            blend, fg = output.chunk(2, dim=0)
            mixed = self.interactions[key](torch.stack([blend, fg], dim=2))  # [B, N, 2, C]
            return torch.cat([mixed[:, :, 0], mixed[:, :, 1]], dim=0)

        return hook

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(
        self,
        sample_blend: torch.Tensor,
        sample_fg: torch.Tensor,
        timestep: torch.Tensor | int | float,
        ehs_blend: torch.Tensor,
        ehs_fg: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoise both branches jointly; returns ``(pred_blend, pred_fg)``, each shaped like its sample.

        ``timestep``: a scalar or a ``[B]`` tensor shared by the pair (both branches are at the same step).
        """
        if sample_blend.shape != sample_fg.shape:
            raise ValueError(f"branch samples differ in shape: {sample_blend.shape} vs {sample_fg.shape}")
        if ehs_blend.shape[0] != sample_blend.shape[0] or ehs_fg.shape[0] != sample_fg.shape[0]:
            raise ValueError("encoder_hidden_states batch size must match the samples' batch size")
        if ehs_blend.shape[-1] != ehs_fg.shape[-1]:
            raise ValueError(f"prompt embedding widths differ: {ehs_blend.shape} vs {ehs_fg.shape}")
        b = sample_blend.shape[0]
        t = torch.as_tensor(timestep, device=sample_blend.device)
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape[0] != b:
            raise ValueError(f"timestep has {t.shape[0]} entries for a batch of {b}")
        if ehs_blend.shape[1] != ehs_fg.shape[1]:
            # Padding one side would add cross-attention keys and change that branch's output.
            raise ValueError(
                f"prompt embeddings have {ehs_blend.shape[1]} and {ehs_fg.shape[1]} tokens; tokenize both "
                "prompts with padding='max_length' (77 tokens for CLIP)"
            )
        # The routing state is left set after the call: with gradient checkpointing the backward pass
        # re-runs the blocks (LoRA layers and hooks) after forward() has returned.
        self.context.num_branches, self.context.single_branch = 2, None
        out = self.unet(
            torch.cat([sample_blend, sample_fg]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([ehs_blend, ehs_fg]),
            return_dict=False,
        )[0]
        pred_blend, pred_fg = out.chunk(2, dim=0)
        return pred_blend, pred_fg

    def forward_branch(
        self, sample: torch.Tensor, timestep: torch.Tensor | int | float, ehs: torch.Tensor, branch: str
    ) -> torch.Tensor:
        """Run one branch alone (its LoRA set, no interaction) - e.g. to compare with stage 1."""
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        self.context.num_branches = 0  # no partner branch: interaction hooks pass through
        self.context.single_branch = BRANCHES.index(branch) if self.dual_mode == "interrelated" else 0
        return self.unet(sample, timestep, encoder_hidden_states=ehs, return_dict=False)[0]

    # ------------------------------------------------------------------ weights
    def lora_layers(self) -> dict[str, DualLoRALinear]:
        return {n: m for n, m in self.unet.named_modules() if isinstance(m, DualLoRALinear)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """LoRA and interaction weights only (what is saved); keys are stable across runs."""
        sd = {}
        for name, layer in self.lora_layers().items():
            for i, (a, b) in enumerate(zip(layer.lora_A, layer.lora_B)):
                sd[f"unet.{name}.lora_A.{i}.weight"] = a.weight
                sd[f"unet.{name}.lora_B.{i}.weight"] = b.weight
        for key, module in self.interactions.items():
            for pname, p in module.state_dict().items():
                sd[f"interactions.{key}.{pname}"] = p
        return sd

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"dual weights do not match this model (dual_mode={self.dual_mode}, rank={self.rank}): "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        with torch.no_grad():
            for k, v in state.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"{k}: shape {tuple(v.shape)} in file, {tuple(own[k].shape)} in model")
                own[k].copy_(v.to(own[k].dtype))

    def load_single_lora(self, unet_lora: dict[str, torch.Tensor]) -> int:
        """Copy a single (stage-1) LoRA into every LoRA set. ``unet_lora`` in peft key format
        (``<module path>.lora_A.weight`` / ``.lora_B.weight``, no ``unet.`` prefix). Returns layers loaded."""
        layers = self.lora_layers()
        loaded = 0
        with torch.no_grad():
            for name, layer in layers.items():
                ka, kb = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
                if ka not in unet_lora or kb not in unet_lora:
                    raise KeyError(f"stage-1 LoRA has no weights for {name} (expected {ka!r})")
                a, b = unet_lora[ka], unet_lora[kb]
                if a.shape[0] != self.rank:
                    raise ValueError(f"stage-1 LoRA rank {a.shape[0]} != --rank {self.rank} (at {name})")
                for la, lb in zip(layer.lora_A, layer.lora_B):
                    la.weight.copy_(a.to(la.weight.dtype))
                    lb.weight.copy_(b.to(lb.weight.dtype))
                loaded += 1
        extra = {k.rsplit(".lora_", 1)[0] for k in unet_lora} - set(layers)
        if extra:
            raise KeyError(f"stage-1 LoRA has layers this model lacks, e.g. {sorted(extra)[:3]}")
        return loaded

    def config_dict(self) -> dict[str, Any]:
        return {
            "format": "dual_lora_unet/1",
            "rank": self.rank,
            "alpha": self.alpha,
            "dual_mode": self.dual_mode,
            "interaction_preset": self.interaction_preset,
            "interaction_init": self.interaction_init,
            "interaction_reduction": self.interaction_reduction,
            "target_modules": list(self.target_modules),
        }


def normalize_lora_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Diffusers-format LoRA keys (``unet.<path>.lora.down.weight`` / ``lora_linear_layer.up`` / peft
    ``lora_A``) under ``prefix`` -> peft keys without the prefix (``<path>.lora_A.weight``)."""
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix + "."):
            continue
        k = k[len(prefix) + 1 :]
        if k.endswith(".alpha"):
            continue
        for old, new in (
            (".lora.down.", ".lora_A."),
            (".lora.up.", ".lora_B."),
            (".lora_linear_layer.down.", ".lora_A."),
            (".lora_linear_layer.up.", ".lora_B."),
            (".lora_A.default.", ".lora_A."),
            (".lora_B.default.", ".lora_B."),
        ):
            k = k.replace(old, new)
        out[k] = v
    return out


def add_text_encoder_lora(text_encoder: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Inject a peft LoRA adapter into the CLIP text encoder's attention projections (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        init_lora_weights="gaussian",
        target_modules=list(TEXT_ENCODER_LORA_TARGETS),
    )
    # ``inject_adapter_in_model`` rather than transformers' ``add_adapter``: the latter refuses the
    # peft version pinned in requirements.txt, the former is what diffusers' loader uses anyway.
    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    for name, p in text_encoder.named_parameters():
        p.requires_grad_("lora_" in name)
    return text_encoder


def text_encoder_lora_state_dict(text_encoder: nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(text_encoder)


def load_text_encoder_lora(text_encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load peft-format text-encoder LoRA weights (keys ``<path>.lora_A.weight``), strictly."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(text_encoder, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", []) or []
    lora_missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or lora_missing:
        raise KeyError(f"text-encoder LoRA mismatch: unexpected {unexpected[:3]}, missing {lora_missing[:3]}")


def save_dual_weights(
    model: DualLoRAUNet, text_encoder: nn.Module | None, out_dir: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Write ``dual_unet.safetensors`` (+ ``text_encoder_lora.safetensors``) and ``dual_config.json``."""
    from utils.checkpoint import atomic_write, save_safetensors_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    save_safetensors_atomic(model.trainable_state_dict(), out_dir / DUAL_WEIGHTS_NAME)
    config = model.config_dict()
    config["text_encoder_lora"] = text_encoder is not None
    if text_encoder is not None:
        te_state = text_encoder_lora_state_dict(_unwrap(text_encoder))
        if not te_state:
            raise ValueError("save_dual_weights: the text encoder has no LoRA adapter")
        save_safetensors_atomic(te_state, out_dir / TEXT_ENCODER_WEIGHTS_NAME)
        config["text_encoder_rank"] = int(next(v for k, v in te_state.items() if "lora_A" in k).shape[0])
    config.update(extra or {})
    with atomic_write(out_dir / DUAL_CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return out_dir


def read_dual_config(weights_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(weights_dir) / DUAL_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {weights_dir} is not a stage-2 (dual LoRA) weights directory. It is written by "
            f"train/stage2-dual/train.py into --output_dir and every checkpoint-<step>/ directory."
        )
    config = json.loads(path.read_text())
    # Weights written before the interaction presets existed used the light module, zero-initialised.
    config.setdefault("interaction_preset", "light")
    config.setdefault("interaction_init", "zero")
    return config


def load_dual_weights(
    model: DualLoRAUNet, text_encoder: nn.Module | None, weights_dir: str | os.PathLike
) -> dict[str, Any]:
    """Load what :func:`save_dual_weights` wrote into an already-built model (+ text encoder)."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    config = read_dual_config(weights_dir)
    model = _unwrap(model)
    model.load_trainable_state_dict(load_file(str(weights_dir / DUAL_WEIGHTS_NAME)))
    if text_encoder is not None and config.get("text_encoder_lora"):
        load_text_encoder_lora(_unwrap(text_encoder), load_file(str(weights_dir / TEXT_ENCODER_WEIGHTS_NAME)))
    return config


def load_dual_unet(
    pretrained_model_name_or_path: str | os.PathLike,
    weights_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Build SD-1.5 components with the stage-2 weights applied, for generation.

    Returns ``{"vae", "text_encoder", "tokenizer", "scheduler", "dual_unet", "config"}``; all in eval mode
    on ``device``/``dtype`` (``scheduler`` is the model's own noise scheduler config, a DDPMScheduler).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from utils.weights import resolve_hf_path, sd15_how_to_get

    config = read_dual_config(weights_dir)
    root = resolve_hf_path(
        pretrained_model_name_or_path,
        "Stable Diffusion 1.5 base model",
        sd15_how_to_get(),
        required_files=("unet/config.json", "vae/config.json", "text_encoder/config.json", "tokenizer"),
    )
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    dual = DualLoRAUNet(
        unet,
        rank=int(config["rank"]),
        alpha=float(config["alpha"]),
        dual_mode=config["dual_mode"],
        interaction_reduction=int(config["interaction_reduction"]),
        target_modules=tuple(config["target_modules"]),
        interaction_preset=config["interaction_preset"],
        interaction_init=config["interaction_init"],
    )
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
    if config.get("text_encoder_lora"):
        add_text_encoder_lora(text_encoder, rank=int(config["text_encoder_rank"]))
    load_dual_weights(dual, text_encoder, weights_dir)
    components = {
        "vae": AutoencoderKL.from_pretrained(root, subfolder="vae"),
        "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        "scheduler": DDPMScheduler.from_pretrained(root, subfolder="scheduler"),
        "dual_unet": dual,
        "config": config,
    }
    for key in ("vae", "text_encoder", "dual_unet"):
        components[key].to(device=device, dtype=dtype).eval().requires_grad_(False)
    return components


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / torch.compile wrappers (accelerate's ``unwrap_model`` without needing an Accelerator)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------- export
# Standard diffusers LoRA files, one per branch, for use outside this repository. They hold a branch's LoRA set
# only: a stock pipeline that loads one runs that branch alone, WITHOUT the branch interaction modules (which
# need both branches in one batch); use DualAnoDiffPipeline (models/dual_anodiff_pipeline.py) for joint sampling.

BRANCH_LORA_NAMES = {
    "blend": "pytorch_lora_weights_blend.safetensors",
    "fg": "pytorch_lora_weights_fg.safetensors",
}


def branch_lora_state_dict(model: nn.Module, branch: str) -> dict[str, torch.Tensor]:
    """LoRA set of ``branch`` ("blend" | "fg") in peft keys (``<module path>.lora_A.weight``), copied.

    In ``dual_mode="shared"`` both branches have the same (single) set.
    """
    model = _unwrap(model)
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    index = BRANCHES.index(branch) if model.dual_mode == "interrelated" else 0
    state = {}
    for name, layer in model.lora_layers().items():
        state[f"{name}.lora_A.weight"] = layer.lora_A[index].weight.detach().float().cpu().clone()
        state[f"{name}.lora_B.weight"] = layer.lora_B[index].weight.detach().float().cpu().clone()
    return state


def _ordered(metadata: dict[str, Any]) -> dict[str, Any]:
    """peft keeps ``target_modules`` as a set, which diffusers writes with ``list(set)``: an order that follows
    the per-process string hash, so two same-seed exports differed in bytes. Sorted lists are stable."""
    return {k: sorted(v) if isinstance(v, set | frozenset) else v for k, v in metadata.items()}


def export_branch_loras(
    model: nn.Module, text_encoder: nn.Module | None, out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write ``pytorch_lora_weights_{blend,fg}.safetensors`` through diffusers' ``save_lora_weights``.

    Each file: that branch's U-Net LoRA set (+ the text-encoder LoRA, shared by both branches, when
    ``text_encoder`` carries one), peft keys, the LoRA config (rank, alpha, targets) as adapter metadata.
    ``pipe.load_lora_weights(out_dir, weight_name=BRANCH_LORA_NAMES["blend"])`` then reproduces the blend
    branch run alone (``DualLoRAUNet.forward_branch``), i.e. without the interaction. Returns {branch: path}.
    """
    import shutil
    import tempfile

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    model = _unwrap(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = sorted(model.lora_layers())
    unet_metadata = _ordered(
        LoraConfig(r=model.rank, lora_alpha=model.alpha, target_modules=modules).to_dict()
    )
    te_layers = te_metadata = None
    if text_encoder is not None:
        te = _unwrap(text_encoder)
        te_layers = {k: v.detach().float().cpu().clone() for k, v in text_encoder_lora_state_dict(te).items()}
        if not te_layers:
            raise ValueError("export_branch_loras: the text encoder has no LoRA adapter (pass None)")
        te_metadata = _ordered(te.peft_config["default"].to_dict())
    paths = {}
    for branch, name in BRANCH_LORA_NAMES.items():
        # Written into a temporary directory and renamed over the final name: no half-written file.
        tmp = Path(tempfile.mkdtemp(prefix=".lora.", dir=out_dir))
        try:
            StableDiffusionPipeline.save_lora_weights(
                str(tmp),
                unet_lora_layers=branch_lora_state_dict(model, branch),
                text_encoder_lora_layers=te_layers,
                unet_lora_adapter_metadata=unet_metadata,
                text_encoder_lora_adapter_metadata=te_metadata,
                weight_name=name,
                safe_serialization=True,
            )
            os.replace(tmp / name, out_dir / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        paths[branch] = out_dir / name
    return paths
