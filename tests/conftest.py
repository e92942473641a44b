"""Session-wide test setup: repo root importable, offline hub, 2 torch threads, the tiny assets fixture,
random-weight Inception files and a fast sqrtm stand-in for FID comparisons."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


@pytest.fixture
def fast_sqrtm(monkeypatch):
    """Patch scipy's sqrtm where clean-fid's frechet_distance reads it (ours calls the same function)."""
    import cleanfid.fid

    from tests.fast_sqrtm import trace_preserving_sqrtm

    monkeypatch.setattr(cleanfid.fid.linalg, "sqrtm", trace_preserving_sqrtm)
    return trace_preserving_sqrtm


@pytest.fixture(scope="session")
def trained_assets_quick() -> dict[str, Path]:
    """The trained-asset tree built with QUICK options (a few steps per model: right files and formats, models
    not trained), cached under .cache/trained-quick. The replicas' quick guards train from it."""
    from preprocessing.trained_assets import QUICK, ensure_trained_assets

    return ensure_trained_assets(REPO_ROOT / ".cache" / "trained-quick", QUICK)
