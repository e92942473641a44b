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
U-Net's own code is untouched. Saving, loading and exporting the weights: models/dual_lora_io.py.
"""

from __future__ import annotations

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


# Weight I/O and the per-branch export live in models/dual_lora_io.py (which imports this module); their old
# names still import from here, resolved on first use so that neither module imports the other at load time.
_MOVED_TO_IO = frozenset(
    {
        "BRANCH_LORA_NAMES",
        "add_text_encoder_lora",
        "branch_lora_state_dict",
        "export_branch_loras",
        "load_dual_unet",
        "load_dual_weights",
        "load_text_encoder_lora",
        "normalize_lora_keys",
        "read_dual_config",
        "save_dual_weights",
        "text_encoder_lora_state_dict",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_IO:
        from models import dual_lora_io

        return getattr(dual_lora_io, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
