"""Throughput options shared by every trainer: each one is a :class:`~train.core.CoreConfig` setting, off by
default, and none changes the math (each is tested for equal results on CPU; docs/throughput.md).

=========================  ==================================================================================
setting                    mechanism (where it acts)
=========================  ==================================================================================
``compile``                ``nn.Module.compile`` in place (:func:`compile_module`): same module object, same
                           parameter names, so checkpoints, hooks and ``unwrap_model`` are unchanged
``compile_mode``           torch.compile's ``mode``
``channels_last``          frozen 4-D weights in channels-last layout (:func:`to_channels_last`); trained
                           weights keep the default layout because safetensors writes contiguous tensors only
``fused_adamw``            ``torch.optim.AdamW(fused=True)`` (:func:`make_adamw`), default AdamW where unsupported
``allow_tf32``             TF32 for fp32 matmuls and convolutions (:func:`apply_global_settings`)
``sdpa_backend``           ``torch.nn.attention.sdpa_kernel`` around each training step (:func:`sdpa_context`)
``skip_lora_input_cast``   peft LoRA layers keep their input dtype (:func:`skip_lora_input_cast`)
``dataloader_*``           pinned memory + non-blocking copies, persistent workers, prefetch (:func:`loader_kwargs`)
``log_step_times``         data / forward / backward / optimizer times and FLOPs per step (:class:`StepTimer`)
=========================  ==================================================================================

A trainer calls :func:`prepare_model` on its trained network (channels-last, LoRA input cast, compile), builds
AdamW with :func:`make_adamw` and its loaders with :func:`loader_kwargs`; the core does the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from utils.logging import get_logger

_logger = get_logger("train.core.perf")


def _note(msg: str, level: int = logging.INFO) -> None:
    """Log once per job (rank 0 of a launched run); usable before or without an Accelerator."""
    if os.environ.get("RANK", "0") == "0":
        _logger.log(level, msg)


# (target, module class) of every module compiled since the last make_accelerator: the core checks that each
# requested target was found (a trainer without a DINOv2 loss cannot compile one) and logs what was compiled.
_COMPILED: list[tuple[str, str]] = []


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    """A setting from a :class:`CoreConfig` or from a trainer's argparse namespace (same names)."""
    return getattr(cfg, name, default)


# ---------------------------------------------------------------------------------------------- global state


def apply_global_settings(cfg: Any) -> None:
    """Process-wide switches: TF32 (only meaningful on Ampere+ GPUs; a no-op on CPU)."""
    if not (_get(cfg, "allow_tf32", False) and torch.cuda.is_available()):
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the non-deprecated switches
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:  # pragma: no cover - older torch
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def reset_compiled() -> None:
    _COMPILED.clear()


def check_compiled(cfg: Any) -> None:
    """Log what was compiled; a requested target the trainer does not have is an error naming the flag."""
    requested = tuple(_get(cfg, "compile", ()) or ())
    found = {t for t, _ in _COMPILED}
    missing = [t for t in requested if t not in found]
    if missing:
        raise ValueError(
            f"compile={list(requested)}: this trainer has no {missing} network to compile "
            "('dinov2' exists only where a DINOv2 encoder runs during training: the anomaly stages' DINOv2 "
            "loss, DinoVQ without a token cache, the latent head's teacher). Drop it from --compile / perf.compile."
        )
    if _COMPILED:
        _note("torch.compile: " + ", ".join(f"{t} ({name})" for t, name in _COMPILED))


# --------------------------------------------------------------------------------------------------- modules


def compile_module(module: nn.Module, cfg: Any, target: str, **compile_kwargs: Any) -> nn.Module:
    """``module.compile()`` in place when ``target`` is listed in ``cfg.compile``; returns ``module``.

    In-place compilation keeps the module's class and parameter names (no ``_orig_mod.`` prefix), so the
    trainers' save/load hooks and ``accelerator.unwrap_model`` work unchanged. Under DDP the compiled module is
    wrapped afterwards: gradients are all-reduced after the compiled backward (no overlap of communication with
    the backward), which costs little for LoRA-sized gradients. ``compile_kwargs`` go to ``torch.compile``
    (e.g. ``backend="aot_eager"`` to debug a compile problem without inductor).
    """
    if target not in (_get(cfg, "compile", ()) or ()):
        return module
    mode = _get(cfg, "compile_mode")
    module.compile(**({"mode": mode} if mode else {}), **compile_kwargs)
    _COMPILED.append((target, type(module).__name__))
    return module


def to_channels_last(module: nn.Module, cfg: Any) -> nn.Module:
    """Frozen 4-D floating parameters and 4-D buffers of ``module`` in channels-last layout, in place.

    A convolution whose input or weight is channels-last computes and returns channels-last, so converting the
    frozen weights (the whole U-Net/VAE but the adapters in the LoRA trainers) switches the activations too.
    Trained parameters keep the default layout: every checkpoint writer stores them with safetensors, which
    refuses non-contiguous tensors, and a LoRA weight is small (the convolution converts it on the fly).
    """
    if not _get(cfg, "channels_last", False):
        return module
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 4 and p.is_floating_point() and not p.requires_grad:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        for b in module.buffers():
            if b.ndim == 4 and b.is_floating_point():
                b.data = b.data.contiguous(memory_format=torch.channels_last)
    return module


def skip_lora_input_cast(module: nn.Module, cfg: Any) -> nn.Module:
    """Turn off peft's cast of each LoRA layer's input to the LoRA weights' dtype (``cast_input_dtype_enabled``).

    Under bf16/fp16 autocast with fp32 LoRA weights, peft copies the layer input to fp32 and autocast casts it
    straight back for the LoRA matmul: bf16 -> fp32 -> bf16 is exact, so skipping it gives the same numbers
    and saves two activation-sized copies (and their backward) per LoRA layer. Without autocast the dtypes
    already match and nothing changes. Layers that are not peft's (stage 2's dual LoRA) are not affected.
    """
    if not _get(cfg, "skip_lora_input_cast", False):
        return module
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a requirement
        return module
    n = 0
    for m in module.modules():
        if isinstance(m, BaseTunerLayer) and hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
            n += 1
    if n == 0:
        _note(f"skip_lora_input_cast: {type(module).__name__} has no peft LoRA layer; nothing to change")
    return module


def prepare_model(module: nn.Module, cfg: Any, target: str = "model") -> nn.Module:
    """The per-network options in their order: layout, LoRA input cast, then compilation (which sees both).

    Call it after the network is on its device and dtype, before ``accelerator.prepare``.
    """
    to_channels_last(module, cfg)
    skip_lora_input_cast(module, cfg)
    return compile_module(module, cfg, target)


# ------------------------------------------------------------------------------------------------ optimizer


def make_adamw(params: Iterable[Any], cfg: Any, **kwargs: Any) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, with ``fused=True`` when ``cfg.fused_adamw``.

    The fused kernel updates every parameter in one launch per dtype/device group; its numbers agree with the
    default (foreach) implementation to float rounding (tested). Where torch has no fused kernel for the
    parameters' device or dtype (torch only finds out at the first ``step``), the default implementation is
    used and a note is logged.
    """
    params = list(params)
    if _get(cfg, "fused_adamw", False):
        reason = _fused_unsupported(params)
        if reason is None:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        _note(
            f"fused AdamW is not available here ({reason}); using the default implementation", logging.WARNING
        )
    return torch.optim.AdamW(params, **kwargs)


def _fused_unsupported(params: list[Any]) -> str | None:
    """Why torch's fused AdamW cannot take these parameters (or param groups), or None."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - private helper moved: let torch decide
        return None
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    for p in flat:
        if p.device.type not in devices or not torch.is_floating_point(p):
            return (
                f"a {p.dtype} parameter on {p.device.type}; fused kernels exist for floating-point parameters "
                f"on {sorted(devices)}"
            )
    return None


# -------------------------------------------------------------------------------------------------- loaders


def loader_kwargs(cfg: Any, num_workers: int, *, epoch_state: bool = False) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for ``num_workers`` workers and the ``dataloader_*`` settings.

    ``epoch_state``: the dataset draws per-epoch values in ``set_epoch`` (augmentation seeds); persistent
    workers would keep their epoch-0 copy of it, so they are refused for such a dataset. Pinned memory only
    applies when a GPU is visible (the core then makes accelerate's copies non-blocking).
    """
    out: dict[str, Any] = {"num_workers": num_workers}
    out["pin_memory"] = bool(_get(cfg, "dataloader_pin_memory", False)) and torch.cuda.is_available()
    persistent = bool(_get(cfg, "dataloader_persistent_workers", False))
    if persistent and epoch_state:
        raise ValueError(
            "dataloader_persistent_workers: this trainer's dataset draws its augmentation per epoch "
            "(set_epoch), which persistent workers would never see; drop the setting (workers are re-created "
            "once per epoch, a negligible cost for full-size datasets)."
        )
    prefetch = _get(cfg, "dataloader_prefetch_factor")
    if num_workers > 0:
        out["persistent_workers"] = persistent
        if prefetch is not None:
            out["prefetch_factor"] = int(prefetch)
    elif prefetch is not None or persistent:
        _note("dataloader_prefetch_factor / persistent_workers need loader workers (num_workers=0): unused")
    return out


# ---------------------------------------------------------------------------------------------- in the step


def sdpa_context(cfg: Any) -> contextlib.AbstractContextManager:
    """``sdpa_kernel`` restricted to ``cfg.sdpa_backend`` (priority order), or a no-op when unset.

    The backend is fixed when the forward runs; the backward uses the matching kernel. A backend that cannot
    take some call (flash needs fp16/bf16 inputs) makes that call fail unless a later backend (math) can.
    """
    names = tuple(_get(cfg, "sdpa_backend", ()) or ())
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel([table[n] for n in names], set_priority=len(names) > 1)


class StepTimer:
    """Where an optimizer step's time goes: data wait, forward, backward, optimizer (``log_step_times``).

    Data wait is host time in ``next(batches)`` (with the guard's one sync per step the GPU is idle then).
    On a GPU the other phases are CUDA events on the current stream, read at log steps only (no sync per
    step): forward = the step function's time minus its ``ctx.backward`` calls (so it includes the loss and
    anything else the step function does), optimizer = clipping, the guard, ``optimizer.step`` and
    ``zero_grad``. On CPU they are wall-clock times. The FLOPs of one step (matmuls, convolutions, attention;
    forward and backward, per process) are counted on the first step with ``torch.utils.flop_counter`` unless
    a network is compiled (compiled code bypasses the counter).
    """

    KEYS = ("time_data_s", "time_forward_s", "time_backward_s", "time_optimizer_s")

    def __init__(self, device: torch.device, enabled: bool = True, count_flops: bool = True):
        self.enabled = enabled
        self.cuda = torch.device(device).type == "cuda"
        self.count_flops = count_flops
        self.flops_per_step: int | None = None
        self._steps: list[dict[str, Any]] = []
        self._cur: dict[str, Any] | None = None

    def _mark(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _span(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000.0 if self.cuda else b - a

    @contextlib.contextmanager
    def data(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        yield
        self._cur = {"data": time.perf_counter() - t0, "backward": []}

    @contextlib.contextmanager
    def step_fn(self) -> Iterator[None]:
        if self._cur is None:  # disabled
            yield
            return
        self._cur["start"] = self._mark()
        counter = None
        if self.count_flops and self.flops_per_step is None:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
        with counter if counter is not None else contextlib.nullcontext():
            yield
        if counter is not None:
            self.flops_per_step = int(counter.get_total_flops())
        self._cur["step_fn_end"] = self._mark()

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        if self._cur is None:  # a backward outside the loop (a trainer's own evaluation): not timed
            yield
            return
        a = self._mark()
        yield
        self._cur["backward"].append((a, self._mark()))

    def end_step(self) -> None:
        if self._cur is not None and "start" in self._cur:
            self._cur["end"] = self._mark()
            self._steps.append(self._cur)
        self._cur = None

    def flush(self) -> dict[str, float]:
        """Mean phase times (seconds) over the steps since the last flush, and ``flops_per_step``."""
        steps, self._steps = self._steps, []
        if not steps:
            return {}
        if self.cuda:
            steps[-1]["end"].synchronize()
        sums = dict.fromkeys(self.KEYS, 0.0)
        for s in steps:
            back = sum(self._span(a, b) for a, b in s["backward"])
            sums["time_data_s"] += s["data"]
            sums["time_forward_s"] += self._span(s["start"], s["step_fn_end"]) - back
            sums["time_backward_s"] += back
            sums["time_optimizer_s"] += self._span(s["step_fn_end"], s["end"])
        out = {k: v / len(steps) for k, v in sums.items()}
        if self.flops_per_step is not None:
            out["flops_per_step"] = float(self.flops_per_step)
        return out
