"""GlobalPercLoss: weight curve, hooks, normalised losses, equality with a straightforward reference."""

from __future__ import annotations

import gc

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


def reference_loss(model, cfg, pred, target):
    """The straightforward design: store every hooked output of both passes, then compare."""
    store: list[torch.Tensor] = []
    types = tuple(cfg.modules_to_hook)
    mods = [m for m in model.modules() if (isinstance(m, types) if types else not list(m.children()))]
    handles = [m.register_forward_hook(lambda m, i, o: store.append(o)) for m in mods]
    order = {id(m): k for k, m in enumerate(mods)}
    idx: list[int] = []
    handles += [m.register_forward_hook(lambda m, i, o: idx.append(order[id(m)])) for m in mods]
    with torch.no_grad():
        model(target)
    tgt, tgt_idx = list(store), list(idx)
    store.clear()
    idx.clear()
    model(pred)
    for h in handles:
        h.remove()
    w = weight_curve(len(mods), cfg.start_weight, cfg.end_weight, cfg.curve_force)
    f = cfg.loss_func or NormalizedTensorLoss("l2")
    terms = [w[k] * f(p, t) for p, t, k in zip(store, tgt, tgt_idx)]
    assert idx == tgt_idx
    return torch.stack(terms).sum() / len(terms)


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


@pytest.mark.parametrize("kind", ["l1", "l2", "cosine"])
def test_global_perc_matches_reference_cnn(kind):
    model = small_cnn()
    cfg = GlobalPercConfig(curve_force=3, loss_func=NormalizedTensorLoss(kind))
    torch.manual_seed(1)
    target = torch.rand(2, 3, 16, 16)
    pred1 = torch.rand(2, 3, 16, 16, requires_grad=True)
    pred2 = pred1.detach().clone().requires_grad_(True)
    with GlobalPercLoss(model, cfg) as loss_fn:
        ours = loss_fn(pred1, target)
        ours.backward()
    ref = reference_loss(model, cfg, pred2, target)
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
    ref = reference_loss(enc, cfg, pred2, target)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(pred1.grad, pred2.grad, rtol=1e-4, atol=1e-8)
    assert ours.item() > 0
