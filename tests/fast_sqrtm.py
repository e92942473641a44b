"""A fast stand-in for scipy's ``sqrtm`` in FID comparisons of a few test images (pure numpy: subprocesses of the
tests load this file by path in a ``sitecustomize``; ``tests`` itself is not importable there, as torch-fidelity
installs a top-level ``tests`` package that shadows ours)."""

from __future__ import annotations

import numpy as np


def trace_preserving_sqrtm(m: np.ndarray, disp: bool = True, blocksize: int = 64):
    """A matrix with the trace of ``sqrtm(m)`` for a LOW-RANK ``m`` (the product of two covariances of a few
    test images), in milliseconds instead of minutes.

    scipy's Schur ``sqrtm`` of a 2048x2048 matrix takes minutes on a shared 2-core CPU. ``frechet_distance``
    (clean-fid's) only uses the result's trace, finiteness and imaginary part. ``range(m)`` has dimension
    r <= (number of images - 1); with ``Q`` an orthonormal basis of it, the non-zero eigenvalues of ``m`` are
    those of ``Q^T m Q`` (as ``m = Q Q^T m``), so ``diag(sqrt(eig(Q^T m Q)))`` padded with zeros has the
    trace of ``sqrtm(m)``. Checked against scipy on a small case (``test_trace_preserving_sqrtm``).
    """
    m = np.asarray(m, dtype=np.float64)
    n = m.shape[0]
    probe = np.random.default_rng(0).normal(size=(n, min(n, 64)))
    q, _ = np.linalg.qr(m @ probe)
    eig = np.linalg.eigvals(q.T @ m @ q)
    out = np.zeros_like(m)
    k = eig.shape[0]
    out[np.arange(k), np.arange(k)] = np.sqrt(np.clip(eig.real, 0.0, None))
    return (out, 0.0) if not disp else out
