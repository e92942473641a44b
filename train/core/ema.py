"""Exponential moving average of trained parameters (train_sd15.py's LoRA + heads, DinoVQ's generator)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ParamEMA:
    """EMA over the ``requires_grad`` parameters of a module, keyed by parameter name.

    Small on purpose: the shadow holds only trained parameters (a few MB of LoRA, not the 860M U-Net), and
    ``state_dict``/``load_state_dict`` make it checkpointable with ``accelerator.register_for_checkpointing``.
    """

    def __init__(
        self, module: nn.Module, decay: float = 0.9995, include: Callable[[str], bool] | None = None
    ) -> None:
        """``include(name)``: which ``requires_grad`` parameters to average (default: all of them), e.g. a
        generator's without its discriminator."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.include = include
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in self._params(module)}
        if not self.shadow:
            raise ValueError("ParamEMA: the module has no trainable parameters")
        self._backup: dict[str, torch.Tensor] | None = None

    def _params(self, module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return (
            (n, p)
            for n, p in module.named_parameters()
            if p.requires_grad and (self.include is None or self.include(n))
        )

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * param."""
        self.num_updates += 1
        for n, p in self._params(module):
            s = self.shadow[n]
            if s.device != p.device:
                s = self.shadow[n] = s.to(p.device)
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for n, p in self._params(module):
            p.copy_(self.shadow[n].to(p.device, p.dtype))

    @contextmanager
    def average_parameters(self, module: nn.Module) -> Iterator[None]:
        """Temporarily swap the EMA weights in (e.g. for sample grids), restoring the live ones after."""
        backup = {n: p.detach().clone() for n, p in self._params(module)}
        self.copy_to(module)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._params(module):
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {k: v.cpu() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        unexpected = set(state["shadow"]) - set(self.shadow)
        if missing or unexpected:
            raise KeyError(
                f"EMA state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for k, v in state["shadow"].items():
            self.shadow[k] = v.to(self.shadow[k].device, torch.float32).clone()
