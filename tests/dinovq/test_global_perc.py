"""GlobalPercLoss: weight curve, hooks, normalised losses, equality with a straightforward reference."""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch
from torch import nn

from losses.global_perc import GlobalPercConfig, GlobalPercLoss, weight_curve
from losses.normalized_tensor_loss import NormalizedTensorLoss


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def reference_weights(count: int, start: float, end: float, force: float) -> list[float]:
    """The reference's weight curves (BurguerJohn's GlobalPercLoss.__init__), written out from its maths:
    np.linspace(start, end, count) for force 0, else start + (end - start) * e(linspace(0, 1, count)) with
    e(t) = t**force (start <= end, ease-in) or 1 - (1 - t)**force (ease-out)."""
    if force == 0:
        return [float(v) for v in np.linspace(start, end, count)]
    t = torch.linspace(0, 1, count, dtype=torch.float64)
    eased = t**force if start <= end else 1 - (1 - t) ** force
    return [float(v) for v in start + (end - start) * eased]


def reference_loss(model, cfg, pred, target, reduction="sum"):
    """The reference's forward: store every hooked output of both passes in firing order, then
    sum_i weights[i] * loss_func(pred_i, target_i) with the curve over the number of hooked modules.
    (``reduction="mean"`` divides by the number of terms: this repository's default.)"""
    store: list[torch.Tensor] = []
    types = tuple(cfg.modules_to_hook)
    mods = [m for m in model.modules() if (isinstance(m, types) if types else not list(m.children()))]
    handles = [m.register_forward_hook(lambda m, i, o: store.append(o)) for m in mods]
    with torch.no_grad():
        model(target)
    tgt = list(store)
    store.clear()
    model(pred)
    for h in handles:
        h.remove()
    assert len(store) == len(tgt) <= len(mods)
    w = reference_weights(len(mods), cfg.start_weight, cfg.end_weight, cfg.curve_force)
    f = cfg.loss_func or NormalizedTensorLoss("l2")
    total = sum(w[i] * f(p, t) for i, (p, t) in enumerate(zip(store, tgt)))
    return total / len(store) if reduction == "mean" else total


def test_weight_curve_formulas():
    assert weight_curve(5, 1.0, 2.0, 1) == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0])
    assert weight_curve(5, 1.0, 2.0, 0) == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0])
    # ease-in when rising: w = s + (e - s) t^p
    assert weight_curve(3, 1.0, 2.0, 3) == pytest.approx([1.0, 1.0 + 0.5**3, 2.0])
    # ease-out when falling: w = s + (e - s) (1 - (1 - t)^p)
    assert weight_curve(3, 2.0, 0.0, 2) == pytest.approx([2.0, 2.0 - 2.0 * 0.75, 0.0])
    assert weight_curve(1, 3.0, 5.0, 3) == [3.0]
    w = weight_curve(10, 1.0, 2.0, 3)
    assert all(a <= b for a, b in zip(w, w[1:]))
    assert w[5] < 1.0 + (2.0 - 1.0) * 5 / 9  # below the straight line
    with pytest.raises(ValueError):
        weight_curve(3, 1.0, 2.0, -1)


def test_normalized_tensor_loss_by_hand():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)

    def norm_conv(x):  # per sample, per channel, over H*W; population std
        out = torch.empty_like(x)
        for i in range(x.shape[0]):
            for c in range(x.shape[1]):
                v = x[i, c]
                out[i, c] = (v - v.mean()) / (((v - v.mean()) ** 2).mean().sqrt() + 1e-6)
        return out

    na, nb = norm_conv(a), norm_conv(b)
    assert NormalizedTensorLoss("l1")(a, b) == pytest.approx(float((na - nb).abs().mean()), rel=1e-5)
    assert NormalizedTensorLoss("l2")(a, b) == pytest.approx(float(((na - nb) ** 2).mean()), rel=1e-5)
    cos = [
        float(na[i, :, h, w] @ nb[i, :, h, w] / (na[i, :, h, w].norm() * nb[i, :, h, w].norm()))
        for i in range(2)
        for h in range(4)
        for w in range(5)
    ]
    assert NormalizedTensorLoss("cosine")(a, b) == pytest.approx(1 - sum(cos) / len(cos), rel=1e-5)

    # tokens [B,N,D]: per token over D
    t1, t2 = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    n1 = (t1 - t1.mean(-1, keepdim=True)) / (t1.std(-1, unbiased=False, keepdim=True) + 1e-6)
    n2 = (t2 - t2.mean(-1, keepdim=True)) / (t2.std(-1, unbiased=False, keepdim=True) + 1e-6)
    assert NormalizedTensorLoss("l2")(t1, t2) == pytest.approx(float(((n1 - n2) ** 2).mean()), rel=1e-5)
    # scale invariance: the point of normalising
    assert NormalizedTensorLoss("l2")(t1 * 100 + 3, t2) == pytest.approx(
        float(NormalizedTensorLoss("l2")(t1, t2)), rel=1e-4
    )
    with pytest.raises(ValueError):
        NormalizedTensorLoss("huber")
    with pytest.raises(ValueError):
        NormalizedTensorLoss("l2")(t1, t2[:, :3])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["l1", "l2", "cosine"])
def test_global_perc_matches_reference_cnn(kind, reduction):
    model = small_cnn()
    cfg = GlobalPercConfig(curve_force=3, loss_func=NormalizedTensorLoss(kind), reduction=reduction)
    torch.manual_seed(1)
    target = torch.rand(2, 3, 16, 16)
    pred1 = torch.rand(2, 3, 16, 16, requires_grad=True)
    pred2 = pred1.detach().clone().requires_grad_(True)
    with GlobalPercLoss(model, cfg) as loss_fn:
        ours = loss_fn(pred1, target)
        ours.backward()
    ref = reference_loss(model, cfg, pred2, target, reduction=reduction)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(pred1.grad, pred2.grad, rtol=1e-4, atol=1e-7)
    assert all(not p.requires_grad for p in model.parameters())  # frozen by the loss
    assert not model.training


def test_all_leaf_modules_when_list_empty_and_print(capsys):
    model = small_cnn()
    loss_fn = GlobalPercLoss(model, GlobalPercConfig(modules_to_hook=[], print_data=True))
    assert loss_fn.num_hooks == 6  # 6 leaf modules including Flatten
    x = torch.rand(1, 3, 16, 16)
    value = loss_fn(x, x.clone())
    assert float(value) == pytest.approx(0.0, abs=1e-6)
    printed = capsys.readouterr().out
    assert "hook" in printed and "weight" in printed and "[1, 8, 16, 16]" in printed
    loss_fn.close()


def test_hooks_removed_on_close_and_del():
    model = small_cnn()

    def n_hooks():
        return sum(len(m._forward_hooks) for m in model.modules())

    loss_fn = GlobalPercLoss(model, GlobalPercConfig())
    assert n_hooks() == 5
    loss_fn.close()
    assert n_hooks() == 0
    with pytest.raises(RuntimeError, match="closed"):
        loss_fn(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    loss_fn = GlobalPercLoss(model, GlobalPercConfig())
    loss_fn(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    del loss_fn
    gc.collect()
    assert n_hooks() == 0
    with GlobalPercLoss(model, GlobalPercConfig()):
        assert n_hooks() == 5
    assert n_hooks() == 0


def test_errors_are_clear():
    model = small_cnn()
    with pytest.raises(ValueError, match="no module"):
        GlobalPercLoss(model, GlobalPercConfig(modules_to_hook=[nn.LSTM]))
    with GlobalPercLoss(model, GlobalPercConfig()) as loss_fn:
        with pytest.raises(ValueError, match="differ"):
            loss_fn(torch.rand(1, 3, 16, 16), torch.rand(2, 3, 16, 16))


def test_global_perc_with_dinov2_adapter():
    from models.dinov2_encoder import DINOv2Encoder

    torch.manual_seed(0)
    enc = DINOv2Encoder(variant="tiny14", resolution=28, input_range="0_1")
    cfg = GlobalPercConfig(
        start_weight=2.0, end_weight=1.0, curve_force=2, modules_to_hook=[nn.Linear, nn.GELU]
    )
    target = torch.rand(2, 3, 28, 28)
    pred1 = torch.rand(2, 3, 28, 28, requires_grad=True)
    pred2 = pred1.detach().clone().requires_grad_(True)
    with GlobalPercLoss(enc, cfg) as loss_fn:
        ours = loss_fn(pred1, target)
        ours.backward()
        assert loss_fn.num_hooks > 8
    ref = reference_loss(enc, cfg, pred2, target, reduction="mean")
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(pred1.grad, pred2.grad, rtol=1e-4, atol=1e-8)
    assert ours.item() > 0


# -- in-place layers: the stored target must be a copy ---------------------------------------------------------


def inplace_cnn(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 4, 3, stride=2, padding=1),
    )


def _twin_without_inplace(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return twin


@pytest.mark.parametrize("net", ["cnn", "vgg16"])
def test_inplace_relu_does_not_corrupt_the_target(net):
    if net == "vgg16":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.vgg16(weights=None).features  # the usual loss network, random weights
        size = 32
    else:
        model = inplace_cnn(inplace=True)
        size = 16
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    twin = _twin_without_inplace(model)
    cfg = GlobalPercConfig(modules_to_hook=[nn.Conv2d, nn.ReLU])
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, size, size, generator=g)
    target = torch.rand(2, 3, size, size, generator=g)
    with GlobalPercLoss(model, cfg) as loss_fn:
        assert float(loss_fn(x, x.clone())) == 0.0  # > 0 when the target shares memory
        p1 = x.clone().requires_grad_(True)
        ours = loss_fn(p1, target)
        ours.backward()
    with GlobalPercLoss(twin, cfg) as twin_fn:
        p2 = x.clone().requires_grad_(True)
        ref = twin_fn(p2, target)
        ref.backward()
    assert ours.item() > 0
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-9)
    # and the non-in-place twin equals the reference formula (which stores the raw outputs)
    p3 = x.clone().requires_grad_(True)
    assert ref.item() == pytest.approx(
        reference_loss(twin, cfg, p3, target, reduction="mean").item(), rel=1e-5
    )


# -- weight order: firing order (reference) vs definition order --------------------------------------------------


class DefinedOutOfOrder(nn.Module):
    """Like transformers' Dinov2MLP: the activation is defined before fc1 but runs after it."""

    def __init__(self, with_unused: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.act = nn.GELU()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 5)
        if with_unused:
            self.unused = nn.Linear(3, 3)  # hooked type, never called

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _by_hand(model, x, target, weights, f):
    """sum_k w_k f(a_k(x), a_k(target)) over fc1, act, fc2 with the given weight per module name."""

    def acts(v):
        a1 = model.fc1(v)
        a2 = model.act(a1)
        return {"fc1": a1, "act": a2, "fc2": model.fc2(a2)}

    ax, at = acts(x), acts(target)
    return sum(weights[k] * f(ax[k], at[k]) for k in ("fc1", "act", "fc2"))


@pytest.mark.parametrize("with_unused", [False, True])
@pytest.mark.parametrize("order", ["firing", "module"])
def test_weight_order_firing_vs_module(order, with_unused):
    model = DefinedOutOfOrder(with_unused)
    f = NormalizedTensorLoss("l2")
    cfg = GlobalPercConfig(
        start_weight=1.0, end_weight=2.0, curve_force=1, weight_order=order, reduction="sum", loss_func=f
    )
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    with GlobalPercLoss(model, cfg) as loss_fn:
        assert loss_fn.slot_names is None
        value = loss_fn(x, target)
        # three modules fired -> three slots [1.0, 1.5, 2.0]; the unused Linear gets none
        expected = (
            {"fc1": 1.0, "act": 1.5, "fc2": 2.0}
            if order == "firing"
            else {"act": 1.0, "fc1": 1.5, "fc2": 2.0}
        )
        assert loss_fn.slot_names == sorted(expected, key=expected.get)
        assert {k: loss_fn.module_weight(k) for k in expected} == expected
        if with_unused:
            assert loss_fn.num_hooks == 4 and loss_fn.module_weight("unused") is None
        with torch.no_grad():
            by_hand = _by_hand(model, x, target, expected, f)
        assert value.item() == pytest.approx(by_hand.item(), rel=1e-6)
        assert loss_fn(x, target).item() == pytest.approx(value.item(), rel=1e-7)  # slots stay fixed
    if not with_unused:
        ref = reference_loss(model, cfg, x, target, reduction="sum")  # reference: firing order
        assert (value.item() == pytest.approx(ref.item(), rel=1e-6)) == (order == "firing")


def test_module_firing_only_later_is_an_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.use_b = False

        def forward(self, x):
            return self.b(self.a(x)) if self.use_b else self.a(x)

    model = Branchy()
    with GlobalPercLoss(model, GlobalPercConfig()) as loss_fn:
        x = torch.randn(2, 4)
        loss_fn(x, x + 1)
        model.use_b = True
        with pytest.raises(RuntimeError, match="first call"):
            loss_fn(x, x + 1)


def test_config_rejects_unknown_options():
    with pytest.raises(ValueError, match="weight_order"):
        GlobalPercConfig(weight_order="definition")
    with pytest.raises(ValueError, match="reduction"):
        GlobalPercConfig(reduction="avg")
