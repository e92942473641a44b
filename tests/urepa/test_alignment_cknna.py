"""eval.alignment.cknna_score against the CKNNA definition of Huh et al. 2024 (The Platonic Representation
Hypothesis, the alignment metric REPA / U-REPA report), written out here with explicit loops: per-row top-k
neighbours by inner product (diagonal excluded), the mutual-neighbour mask, and Song et al.'s unbiased HSIC
(JMLR 2012, eq. 5) term by term."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval.alignment import cknna_score


def _hsic_unbiased_loops(a: list[list[float]], b: list[list[float]]) -> float:
    m = len(a)
    at = [[0.0 if i == j else a[i][j] for j in range(m)] for i in range(m)]
    bt = [[0.0 if i == j else b[i][j] for j in range(m)] for i in range(m)]
    trace = sum(at[i][j] * bt[j][i] for i in range(m) for j in range(m))
    sum_a = sum(map(sum, at))
    sum_b = sum(map(sum, bt))
    ones_ab_ones = sum(at[i][k] * bt[k][j] for i in range(m) for k in range(m) for j in range(m))
    return (trace + sum_a * sum_b / ((m - 1) * (m - 2)) - 2.0 * ones_ab_ones / (m - 2)) / (m * (m - 3))


def _cknna_reference(x: torch.Tensor, y: torch.Tensor, topk: int) -> float:
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    y = torch.nn.functional.normalize(y.double(), dim=-1)
    n = x.shape[0]
    K, L = (x @ x.T).tolist(), (y @ y.T).tolist()

    def knn(k: list[list[float]]) -> list[set[int]]:
        return [set(sorted((j for j in range(n) if j != i), key=lambda j: -k[i][j])[:topk]) for i in range(n)]

    def sim(a, nn_a, b, nn_b) -> float:
        mask = [[1.0 if (j in nn_a[i] and j in nn_b[i]) else 0.0 for j in range(n)] for i in range(n)]
        ma = [[mask[i][j] * a[i][j] for j in range(n)] for i in range(n)]
        mb = [[mask[i][j] * b[i][j] for j in range(n)] for i in range(n)]
        return _hsic_unbiased_loops(ma, mb)

    nk, nl = knn(K), knn(L)
    return sim(K, nk, L, nl) / (math.sqrt(sim(K, nk, K, nk) * sim(L, nl, L, nl)) + 1e-6)


@pytest.mark.parametrize("topk", [2, 5, 10])
def test_cknna_matches_the_definition(topk):
    g = torch.Generator().manual_seed(topk)
    x = torch.randn(24, 7, generator=g)
    y = x @ torch.randn(7, 5, generator=g) + 0.5 * torch.randn(24, 5, generator=g)  # related, not equal
    ours = cknna_score(x.numpy(), y.numpy(), topk=topk)
    assert ours == pytest.approx(_cknna_reference(x, y, topk), rel=1e-9, abs=1e-12)


def test_cknna_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16))
    # 1 up to the reference's + 1e-6 in the denominator (the masked HSIC values are ~1e-2 here)
    assert cknna_score(x, x, topk=10) == pytest.approx(1.0, abs=1e-3)
    # invariant to a rotation and to per-row scaling (rows are L2-normalised)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert cknna_score(x, (x @ q) * rng.uniform(0.5, 2.0, size=(60, 1)), topk=10) == pytest.approx(
        1.0, abs=1e-3
    )
    # unrelated features score far lower than related ones
    related = x[:, :8] + 0.3 * rng.normal(size=(60, 8))
    unrelated = rng.normal(size=(60, 8))
    assert cknna_score(x, unrelated, topk=10) < cknna_score(x, related, topk=10) - 0.2
    with pytest.raises(ValueError, match="row counts"):
        cknna_score(x, x[:10], topk=5)
    with pytest.raises(ValueError, match="topk"):
        cknna_score(x, x, topk=1)
