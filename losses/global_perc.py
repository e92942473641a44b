"""Global Perceptual Similarity Loss: any frozen network as a multi-layer perceptual loss, through hooks.

Drop-in replacement for ``nn.L1Loss()``::

    loss_fn = GlobalPercLoss(dino, GlobalPercConfig(start_weight=1.0, end_weight=2.0, curve_force=3))
    loss = loss_fn(prediction, target)      # scalar, differentiable w.r.t. ``prediction``
    loss_fn.close()                         # or ``with GlobalPercLoss(...) as loss_fn:``; also on ``del``

Forward hooks sit on every module whose type is in ``config.modules_to_hook`` (every *leaf* module when the list
is empty). The loss is

    L = (1 / K) * sum_k  w(hook(k)) * loss_func(pred_activation_k, target_activation_k)

over the K hooked tensor outputs produced by one forward pass (a module called twice contributes twice, a
module returning a tuple contributes one term per tensor). ``reduction="sum"`` drops the ``1 / K``: that is the
reference's ``forward`` (BurguerJohn's global_perceptual_similarity_loss sums the weighted terms).

Weight slots: each hooked module that fires gets one slot ``i = 0 .. n-1``. With ``weight_order="firing"``
(default, as the reference) the slots follow the order in which the modules first fire, recorded on the first
target pass; with ``weight_order="module"`` they follow ``model.named_modules()`` order. The two differ when a
module is defined before a module that runs earlier (transformers' ``Dinov2MLP`` defines ``activation_fn``
before ``fc1``). A hooked module that never fires gets no slot, so ``n`` counts only modules that ran. The slots
are fixed by the first call; a later call in which another hooked module fires is an error.

Per-slot weights (``weight_curve``), ``t = i / (n - 1)`` (``t = 0`` when ``n == 1``), ``s = start_weight``,
``e = end_weight``, ``p = curve_force``:

* ``p in {0, 1}``: linear, ``w = s + (e - s) * t``;
* otherwise, when ``s <= e`` (ease-in): ``w = s + (e - s) * t**p``;
* otherwise, when ``s > e`` (ease-out): ``w = s + (e - s) * (1 - (1 - t)**p)``.

With ``p > 1`` the weights therefore stay near ``start_weight`` over the first layers and move fast near the
end when rising, and fall fast over the first layers then flatten near ``end_weight`` when decreasing.

Memory design (why it is lighter than storing both passes, see ``docs/global_perc_loss.md``):

1. The target pass runs under ``torch.no_grad`` and keeps a *copy* of each hooked output: a later in-place
   layer (torchvision VGG's ``ReLU(inplace=True)`` right after a hooked ``Conv2d``) rewrites the module's own
   tensor, and a mere ``detach()`` would share that memory.
2. The prediction pass computes each hook's loss *inside the hook* and drops that target activation at once,
   so target activations shrink while the prediction graph grows instead of coexisting in full.
3. When the prediction needs a gradient, each hook's loss is evaluated together with its gradient w.r.t. the
   activation (one small ``autograd.grad`` on the detached activation) and only that gradient is kept for the
   backward pass (``_PrecomputedGradLoss``): the normalised copies and differences that ``loss_func``'s own
   graph would save never outlive the hook. Consequence: the loss is differentiable once (no double backward),
   which is all that training with it needs.

The wrapped model is put in eval mode and its parameters are frozen by the loss itself.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from losses.normalized_tensor_loss import NormalizedTensorLoss

WEIGHT_ORDERS = ("firing", "module")
REDUCTIONS = ("mean", "sum")


def _default_modules() -> list[type[nn.Module]]:
    return [nn.Linear, nn.Conv2d, nn.ReLU, nn.GELU]


@dataclass
class GlobalPercConfig:
    """Settings of ``GlobalPercLoss`` (the seed's argument names).

    start_weight / end_weight: weight of the first / last hook; curve_force: shape of the weight curve
    (see ``weight_curve``); modules_to_hook: module types to hook (empty: every leaf module);
    transform_normalization: callable applied to both inputs before the model (e.g. ImageNet Normalize);
    loss_func: ``f(pred_act, target_act) -> scalar`` (default ``NormalizedTensorLoss("l2")``);
    print_data: print a per-hook table after each call; forward_fn: how to run the model
    (default ``model(x)``), e.g. ``lambda m, x: m(x, layers=[...])``;
    weight_order: ``"firing"`` (reference; slots in the order modules first fire) or ``"module"``
    (``named_modules`` order); reduction: ``"mean"`` (divide the weighted sum by the number of terms K) or
    ``"sum"`` (the reference's ``forward``: K times larger).
    """

    start_weight: float = 1.0
    end_weight: float = 2.0
    curve_force: float = 3
    modules_to_hook: Sequence[type[nn.Module]] = field(default_factory=_default_modules)
    transform_normalization: Callable[[torch.Tensor], torch.Tensor] | None = None
    loss_func: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    print_data: bool = False
    forward_fn: Callable[[nn.Module, torch.Tensor], Any] | None = None
    weight_order: Literal["firing", "module"] = "firing"
    reduction: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        if self.weight_order not in WEIGHT_ORDERS:
            raise ValueError(
                f"GlobalPercConfig.weight_order must be one of {WEIGHT_ORDERS}, got {self.weight_order!r}"
            )
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"GlobalPercConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}"
            )


def weight_curve(n: int, start_weight: float, end_weight: float, curve_force: float) -> list[float]:
    """Per-hook weights from ``start_weight`` to ``end_weight`` (formula in the module docstring)."""
    if n < 0:
        raise ValueError(f"weight_curve: n must be >= 0, got {n}")
    if curve_force < 0 or not math.isfinite(curve_force):
        raise ValueError(f"curve_force must be a finite number >= 0, got {curve_force}")
    s, e, p = float(start_weight), float(end_weight), float(curve_force)
    out = []
    for i in range(n):
        t = i / (n - 1) if n > 1 else 0.0
        if p in (0.0, 1.0):
            f = t
        elif s <= e:
            f = t**p
        else:
            f = 1.0 - (1.0 - t) ** p
        out.append(s + (e - s) * f)
    return out


def _tensors_of(output: Any) -> list[torch.Tensor]:
    """Floating-point tensors in a module output (tensor, or a tuple/list of them); others are ignored."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors_of(o)]
    return []


class _PrecomputedGradLoss(torch.autograd.Function):
    """Scalar ``value`` whose gradient w.r.t. ``activation`` is the precomputed ``grad`` (times grad_output)."""

    @staticmethod
    def forward(ctx, activation: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


class GlobalPercLoss(nn.Module):
    """Multi-layer perceptual loss through forward hooks on a frozen ``model``; see the module docstring."""

    def __init__(self, model: nn.Module, config: GlobalPercConfig | None = None):
        super().__init__()
        config = config or GlobalPercConfig()
        if not isinstance(model, nn.Module):
            raise TypeError(f"GlobalPercLoss: model must be an nn.Module, got {type(model).__name__}")
        self.config = config
        self.loss_func = config.loss_func if config.loss_func is not None else NormalizedTensorLoss("l2")
        # Kept out of the module tree on purpose: the loss must not register (and so not save/move) the
        # frozen network as its own parameters.
        self.__dict__["model"] = model
        model.eval()
        model.requires_grad_(False)

        types = tuple(config.modules_to_hook)
        hooked = [
            (name, m)
            for name, m in model.named_modules()
            if (isinstance(m, types) if types else len(list(m.children())) == 0)
        ]
        if not hooked:
            raise ValueError(
                f"GlobalPercLoss: no module of types {[t.__name__ for t in types]} in {type(model).__name__}"
            )
        self.hook_names = [name or type(m).__name__ for name, m in hooked]
        # Weight slot of each hooked module (index into ``hook_names``), fixed by the first call: modules that
        # never fire get none, so the curve spans exactly the modules that ran.
        self._slot: dict[int, int] | None = None
        self._first_fired: list[int] = []
        self.weights: list[float] | None = None  # per slot, known after the first call
        self._mode: str | None = None
        self._targets: dict[tuple[int, int, int], torch.Tensor] = {}
        self._calls: list[int] = [0] * len(hooked)
        self._total: torch.Tensor | None = None
        self._count = 0
        self._rows: list[tuple[str, tuple[int, ...], float, float]] = []
        # A weak reference in the hook closure, so that the hooks never keep the loss object alive and
        # ``__del__`` can run (and remove them) when the user drops the loss.
        ref = weakref.ref(self)
        self._handles = [m.register_forward_hook(_make_hook(ref, i)) for i, (_, m) in enumerate(hooked)]

    # -- lifecycle ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook from the model (idempotent)."""
        for h in getattr(self, "_handles", []):
            h.remove()
        self._handles = []
        self._targets = {}

    def __enter__(self) -> GlobalPercLoss:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing sensible left to do
            pass

    @property
    def num_hooks(self) -> int:
        """Number of hooked modules (whether or not they fire)."""
        return len(self.hook_names)

    @property
    def slot_names(self) -> list[str] | None:
        """Hooked modules that fired in the first call, in weight-slot order (None before the first call)."""
        if self._slot is None:
            return None
        return [self.hook_names[i] for i in sorted(self._slot, key=self._slot.__getitem__)]

    def module_weight(self, name: str) -> float | None:
        """Weight of the hooked module ``name`` (None if it never fired or before the first call)."""
        if self._slot is None or self.weights is None:
            return None
        idx = self.hook_names.index(name)
        return self.weights[self._slot[idx]] if idx in self._slot else None

    def _assign_slots(self) -> None:
        fired = self._first_fired
        if self.config.weight_order == "module":
            fired = sorted(fired)  # hook indices follow named_modules order
        self._slot = {idx: k for k, idx in enumerate(fired)}
        cfg = self.config
        self.weights = weight_curve(len(fired), cfg.start_weight, cfg.end_weight, cfg.curve_force)

    # -- hook body -----------------------------------------------------------------------------------------
    def _on_output(self, idx: int, output: Any) -> None:
        if self._mode is None:
            return
        call = self._calls[idx]
        self._calls[idx] += 1
        tensors = _tensors_of(output)
        if self._mode == "target":
            if self._slot is None and call == 0 and tensors:
                self._first_fired.append(idx)
            elif self._slot is not None and idx not in self._slot and tensors:
                raise RuntimeError(
                    f"GlobalPercLoss: hook {self.hook_names[idx]!r} fired, but it did not fire in the first call, "
                    "which fixed the weight slots; the model must run the same modules on every call."
                )
            for j, t in enumerate(tensors):
                # A copy, not ``t.detach()``: an in-place layer run later (ReLU(inplace=True) after a hooked
                # Conv2d) would otherwise rewrite the stored target through the shared memory.
                self._targets[(idx, call, j)] = t.detach().clone()
            return
        weight = self.weights[self._slot[idx]] if self._slot is not None and idx in self._slot else None
        for j, pred in enumerate(tensors):
            target = self._targets.pop((idx, call, j), None)
            if target is None or weight is None:
                raise RuntimeError(
                    f"GlobalPercLoss: hook {self.hook_names[idx]!r} (call {call}, output {j}) fired in the "
                    "prediction pass but not in the target pass; the model must run the same modules for "
                    "both inputs (same shapes, no data-dependent control flow)."
                )
            if pred.shape != target.shape:
                raise ValueError(
                    f"GlobalPercLoss: hook {self.hook_names[idx]!r} got {tuple(pred.shape)} for the prediction "
                    f"but {tuple(target.shape)} for the target; pass inputs of the same shape."
                )
            term = self._term(pred, target)
            del target  # the target activation is not referenced past this point
            self._total = term * weight if self._total is None else self._total + term * weight
            self._count += 1
            if self.config.print_data:
                self._rows.append((self.hook_names[idx], tuple(pred.shape), weight, float(term.detach())))

    def _term(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and pred.requires_grad):
            with torch.no_grad():
                return self.loss_func(pred, target).float()
        leaf = pred.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.loss_func(leaf, target).float()
            (grad,) = torch.autograd.grad(value, leaf)
        return _PrecomputedGradLoss.apply(pred, value.detach(), grad.to(pred.dtype))

    # -- main ------------------------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor) -> None:
        if self.config.transform_normalization is not None:
            x = self.config.transform_normalization(x)
        if self.config.forward_fn is not None:
            self.config.forward_fn(self.model, x)
        else:
            self.model(x)

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not self._handles:
            raise RuntimeError("GlobalPercLoss was closed; its hooks are removed. Create a new loss.")
        if prediction.shape != target.shape:
            raise ValueError(
                f"GlobalPercLoss: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ"
            )
        self._targets, self._total, self._count, self._rows = {}, None, 0, []
        try:
            self._mode, self._calls = "target", [0] * self.num_hooks
            with torch.no_grad():
                self._run(target)
            if self._slot is None:
                self._assign_slots()
            self._mode, self._calls = "prediction", [0] * self.num_hooks
            self._run(prediction)
            if self._targets:
                left = sorted({self.hook_names[k[0]] for k in self._targets})
                raise RuntimeError(
                    f"GlobalPercLoss: hooks {left[:5]} fired in the target pass but not in the prediction pass"
                )
            if self._total is None:
                raise RuntimeError("GlobalPercLoss: no hooked module produced a floating-point output")
            total = self._total / self._count if self.config.reduction == "mean" else self._total
        finally:
            self._mode, self._targets, self._total = None, {}, None
            if self._slot is None:
                self._first_fired = []  # the first call failed: record the order again next time
        if self.config.print_data:
            self.print_table()
        return total

    def print_table(self) -> None:
        """Print the last call's per-hook table: name, shape, weight, loss."""
        if not self._rows:
            print("GlobalPercLoss: no data (print_data=False or not called yet)")
            return
        width = max(len(r[0]) for r in self._rows)
        print(f"{'hook':<{width}}  {'shape':<22} {'weight':>8} {'loss':>12}")
        for name, shape, w, v in self._rows:
            print(f"{name:<{width}}  {str(list(shape)):<22} {w:>8.4f} {v:>12.6f}")


def _make_hook(ref: weakref.ReferenceType, idx: int) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        loss = ref()
        if loss is not None:
            loss._on_output(idx, output)

    return hook
