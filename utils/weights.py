"""Locating pretrained weights offline, with errors that say what is missing and how to get it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# Stable Diffusion 1.5: the current hub id (the old runwayml/ repo is gone) and the folder the scripts default to.
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD15_LOCAL_DIR = "models/stable-diffusion-v1-5"


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on this machine (the repo never downloads them at run time)."""


def hf_download_hint(repo_id: str, local_dir: str | os.PathLike | None = None) -> str:
    """The command that fetches a hub repo on a machine with network, in backticks.

    ``hf`` is the CLI of huggingface_hub >= 0.34 (the one in requirements.txt); older releases called it
    ``huggingface-cli`` (same arguments), which the README mentions once.
    """
    command = f"hf download {repo_id}"
    if local_dir is not None:
        command += f" --local-dir {local_dir}"
    return f"`{command}`"


def sd15_how_to_get(local_dir: str | os.PathLike = SD15_LOCAL_DIR) -> str:
    """How to get Stable Diffusion 1.5 in diffusers layout, for every error that misses it."""
    return (
        f"Download Stable Diffusion 1.5 (diffusers layout) on a machine with network: "
        f"{hf_download_hint(SD15_HUB_ID, local_dir)}, copy that folder here and pass its path; or try the "
        f"code on the tiny offline model: `python preprocessing/make_tiny_assets.py --out .cache/tiny` and "
        f"pass .cache/tiny/sd15."
    )


def require_file(path: str | os.PathLike, what: str, how_to_get: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{what} not found: expected the file {path}. {how_to_get}")
    return path


def require_dir(path: str | os.PathLike, what: str, how_to_get: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MissingWeightsError(f"{what} not found: expected the directory {path}. {how_to_get}")
    return path


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` with no local meaning (not an existing path, not absolute, not ./ or ~)."""
    return (
        name.count("/") == 1
        and not name.startswith((".", "/", "~"))
        and not Path(name).exists()
        and all(part for part in name.split("/"))
    )


def resolve_hf_path(
    name_or_path: str | os.PathLike,
    what: str,
    how_to_get: str = "",
    required_files: Sequence[str] = (),
) -> Path:
    """A local directory for ``name_or_path``: the directory itself, or a hub id found in the local HF cache.

    Never touches the network (``local_files_only=True``). ``required_files`` are checked relative to the
    resolved directory so a half-copied model fails here, with its name, rather than deep inside a loader.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        resolved = path
    elif looks_like_hub_id(name):
        from huggingface_hub import snapshot_download

        try:
            resolved = Path(snapshot_download(repo_id=name, local_files_only=True))
        except Exception as err:  # LocalEntryNotFoundError, OfflineModeIsEnabled, ...
            cache = (
                os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME", "~/.cache/huggingface") + "/hub"
            )
            hint = how_to_get or (
                f"On a machine with network run {hf_download_hint(name)} and copy the cache "
                f"({cache}) here, or pass a local directory."
            )
            raise MissingWeightsError(
                f"{what}: {name!r} is neither a local directory nor in the local Hugging Face cache ({cache}). "
                f"{hint}"
            ) from err
    else:
        raise MissingWeightsError(f"{what} not found: {path} is not a directory. {how_to_get}".strip())
    missing = [f for f in required_files if not (resolved / f).exists()]
    if missing:
        raise MissingWeightsError(
            f"{what} at {resolved} is incomplete: missing {missing}. {how_to_get}".strip()
        )
    return resolved
