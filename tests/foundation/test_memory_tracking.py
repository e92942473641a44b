"""utils.memory.LiveTensorPeak: the peak of live tensor bytes, checked against hand counts (CPU and meta)."""

from __future__ import annotations

import pytest
import torch

from utils.memory import LiveTensorPeak


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_peak_counts_live_storages_once(device):
    weights = torch.ones(1000, device=device)  # made before the block: not counted
    with LiveTensorPeak() as mem:
        a = torch.ones(1000, device=device)  # 4000 B
        b = torch.ones(2000, device=device)  # 8000 B -> 12000 alive
        view = b.view(2, 1000)  # a view: same storage, nothing new
        del a  # 8000 alive
        c = b[:10] * weights[:10]  # 40 B new -> 8040
        d = torch.ones(500, device=device)  # 2000 B -> 10040
    assert mem.peak_bytes == 12000
    assert mem.current_bytes == 10040
    del view, c, d


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_peak_includes_backward_and_grads(device):
    w = torch.ones(256, 256, device=device)
    with LiveTensorPeak() as mem:
        x = torch.ones(64, 256, device=device, requires_grad=True)  # 64 KiB
        y = x @ w  # 64 KiB, saved for nothing (w is frozen) -> the graph keeps x only
        y.sum().backward()  # grad of the sum (expanded, 4 B), grad of x: 64 KiB
    kib = 64 * 256 * 4
    # x, y and x.grad are alive together at the end; y's grad is a 4-byte scalar expanded (no new storage)
    assert mem.peak_bytes >= 3 * kib
    assert mem.peak_bytes < 4 * kib
