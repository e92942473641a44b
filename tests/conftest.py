"""Session-wide test setup: repo root importable, offline hub, 2 torch threads, the tiny assets fixture,
random-weight Inception files and a fast sqrtm stand-in for FID comparisons."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# --import-mode=importlib does not put the rootdir on sys.path; `pytest` (not `python -m pytest`) needs this.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from a test (set before any HF import)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_assets() -> dict[str, Path]:
    """Paths of the generated tiny models and synthetic datasets (cached under .cache/tiny)."""
    from preprocessing.make_tiny_assets import ensure_tiny_assets

    return ensure_tiny_assets(REPO_ROOT / ".cache" / "tiny")


@pytest.fixture(scope="session")
def random_inception_torchscript(tmp_path_factory) -> Path:
    """A small random TorchScript module with StyleGAN2-ADA's Inception interface: what clean-fid's mode "clean"
    and the sFID code run. Saved under a non-standard name, so the code under test must be pointed at it.
    Its scores mean nothing."""
    from eval.inception import write_random_torchscript_inception

    return write_random_torchscript_inception(tmp_path_factory.mktemp("inception_ts") / "random_inception.pt")


@pytest.fixture(scope="session")
def random_inception_state_dict(tmp_path_factory) -> Path:
    """The full pytorch-fid / torch-fidelity Inception with random weights (clean-fid's "legacy_pytorch" and
    torch-fidelity both load it), under a non-standard name. Its scores mean nothing."""
    from eval.inception import write_random_fid_state_dict

    return write_random_fid_state_dict(tmp_path_factory.mktemp("inception_sd") / "random_inception.pth")


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


@pytest.fixture
def fast_sqrtm(monkeypatch):
    """Patch scipy's sqrtm where clean-fid's frechet_distance reads it (ours calls the same function)."""
    import cleanfid.fid

    monkeypatch.setattr(cleanfid.fid.linalg, "sqrtm", trace_preserving_sqrtm)
    return trace_preserving_sqrtm


@pytest.fixture(scope="session")
def trained_assets_quick() -> dict[str, Path]:
    """The trained-asset tree built with QUICK options (a few steps per model: right files and formats, models
    not trained), cached under .cache/trained-quick. The replicas' quick guards train from it."""
    from preprocessing.trained_assets import QUICK, ensure_trained_assets

    return ensure_trained_assets(REPO_ROOT / ".cache" / "trained-quick", QUICK)
