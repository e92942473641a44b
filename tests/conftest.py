"""Session-wide test setup: repo root importable, offline hub, 2 torch threads, the tiny assets fixture."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# --import-mode=importlib does not put the rootdir on sys.path; `pytest` (not `python -m pytest`) needs this.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from a test

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_assets() -> dict[str, Path]:
    """Paths of the generated tiny models and synthetic datasets (cached under .cache/tiny)."""
    from preprocessing.make_tiny_assets import ensure_tiny_assets

    return ensure_tiny_assets(REPO_ROOT / ".cache" / "tiny")
