"""Manifests: a ``manifest.json`` next to every generated set and every evaluation result, saying what made it.

A generated set (``<output_root>/<class>/full`` or ``<output_root>/<class>/<defect>``, eval/generate.py) gets:

    {"kind": "generated_set", "stage": "stage2", "class": "hazelnut", "defect": "hole",
     "weights": {"dir": ..., "files": [{"name": "dual_unet.safetensors", "sha256": ..., "bytes": ...}, ...],
                 "fingerprint": <sha256 over the files' names and hashes>, "trained_for": {"class", "defect"}},
     "base_model": {"path": ..., "configs": [{"name": "model_index.json", "sha256": ...}, ...]},
     "prompts": {...}, "sampler": "pndm", "steps": 100, "guidance": 2.5, "seeds": [first, last],
     "flags": {every command-line value}, "repo": {"commit": ..., "dirty": bool}, "versions": {...},
     "runs": [{"weights_fingerprint", "seeds", "time"}, ...], "mixed_weights": false}

The base model is identified by its path and the sha256 of its small config files, not of its 4 GB of weights
(hashing them would take longer than many generation runs); the trained weights (LoRA / dual LoRA files) are
hashed in full. ``runs`` grows by one entry each time generation is resumed into the set.

Mixing: a set resumed with other trained weights (or another base model) would hold images of two models.
Generation refuses that unless ``--allow_mixed_weights`` (the manifest then says ``"mixed_weights": true``);
the downstream and reproduction steps (:func:`check_sets`) refuse a mixed set, a set whose weights were trained
for another class/defect than the folder it is in, and sets of one evaluation made from different base models,
again unless ``--allow_mixed_weights``. A set without a manifest (made before manifests existed) is accepted
with a warning. An evaluation result gets ``{"kind": "evaluation", "job", "flags", "repo", "inputs": {set:
manifest}, "outputs": [files with sha256]}`` (:func:`evaluation_manifest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from utils.cli import UserError
from utils.logging import get_logger

logger = get_logger(__name__)

MANIFEST_NAME = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_CONFIGS = (
    "dual_config.json",
    "adapter_config.json",
    "config.json",
    "urepa_config.yaml",
)  # model configs
# accelerate's training state in a checkpoint folder: not weights (and the optimizer state is large)
TRAINING_STATE_PREFIXES = ("optimizer", "scheduler", "sampler", "random_states", "scaler")
BASE_MODEL_CONFIGS = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json")
REPO_ROOT = Path(__file__).resolve().parents[1]
ALLOW_FLAG = "--allow_mixed_weights"


class MixedSetsError(UserError):
    """Generated sets made by different weights would be mixed (exit code 2; ``--allow_mixed_weights``)."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(paths: Iterable[Path], root: Path) -> list[dict[str, Any]]:
    return [
        {"name": p.relative_to(root).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(paths)
    ]


def weights_record(weights_dir: str | os.PathLike) -> dict[str, Any]:
    """The weight and config files directly in ``weights_dir`` (not its checkpoint-*/ folders), hashed."""
    root = Path(weights_dir)
    files = file_records(
        [
            p
            for p in root.iterdir()
            if p.is_file()
            and (p.suffix in WEIGHT_SUFFIXES or p.name in WEIGHT_CONFIGS)
            and not p.name.startswith(TRAINING_STATE_PREFIXES)
        ],
        root,
    )
    if not any(Path(f["name"]).suffix in WEIGHT_SUFFIXES for f in files):
        raise UserError(f"no weight file (*.safetensors, *.bin) in {root}")
    fingerprint = hashlib.sha256("".join(f"{f['name']}:{f['sha256']}\n" for f in files).encode()).hexdigest()
    return {"dir": str(root.resolve()), "files": files, "fingerprint": fingerprint}


def base_model_record(base: str | os.PathLike) -> dict[str, Any]:
    root = Path(base)
    configs = [root / c for c in BASE_MODEL_CONFIGS if (root / c).is_file()]
    return {
        "path": str(root.resolve()) if root.exists() else str(base),
        "configs": file_records(configs, root),
    }


def repo_state() -> dict[str, Any]:
    """The repository commit the code ran from, and whether tracked files had uncommitted changes."""

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def _jsonable(flags: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | type(None)) else str(v) for k, v in flags.items()
    }


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any], name: str = MANIFEST_NAME) -> Path:
    from utils.checkpoint import atomic_write

    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def generation_manifest(
    *,
    stage: str,
    class_name: str,
    defect: str | None,
    weights_dir: str | os.PathLike,
    base_model: str | os.PathLike,
    prompts: dict[str, str],
    sampler: str,
    steps: int,
    guidance: float,
    seed: int,
    num_images: int,
    flags: Mapping[str, Any],
    trained_for: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of one generation run into a set (before it is merged with the set's earlier runs)."""
    weights = weights_record(weights_dir)
    weights["trained_for"] = trained_for or {}
    seeds = [seed, seed + num_images - 1]
    return {
        "kind": "generated_set",
        "stage": stage,
        "class": class_name,
        "defect": defect,
        "weights": weights,
        "base_model": base_model_record(base_model),
        "prompts": prompts,
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "seeds": seeds,
        "num_images": num_images,
        "flags": _jsonable(flags),
        "repo": repo_state(),
        "versions": versions(),
        "runs": [
            {
                "weights_fingerprint": weights["fingerprint"],
                "seeds": seeds,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        ],
        "mixed_weights": False,
    }


def _base_key(manifest: dict[str, Any]) -> str:
    """What identifies a base model: its config hashes (the path may differ between machines)."""
    return json.dumps(sorted((c["name"], c["sha256"]) for c in manifest["base_model"]["configs"]))


def merge_into_set(
    folder: str | os.PathLike, new: dict[str, Any], allow_mixed: bool = False
) -> dict[str, Any]:
    """The set's manifest after one more run: the new run's record, with the earlier runs kept.

    Raises :class:`MixedSetsError` when the set already holds images of other weights or another base model,
    unless ``allow_mixed`` (then the manifest is marked ``mixed_weights``).
    """
    old = read_manifest(folder)
    if old is None:
        return new
    problems = []
    if old["weights"]["fingerprint"] != new["weights"]["fingerprint"]:
        problems.append(f"weights {old['weights']['dir']} vs now {new['weights']['dir']} (different sha256)")
    if _base_key(old) != _base_key(new):
        problems.append(f"base model {old['base_model']['path']} vs now {new['base_model']['path']}")
    if problems and not allow_mixed:
        raise MixedSetsError(
            f"{folder} already holds images made by other weights: {'; '.join(problems)}. Write to another "
            f"--output_root, delete the set, or pass {ALLOW_FLAG} to mix them (recorded in its {MANIFEST_NAME})."
        )
    merged = dict(new)
    merged["runs"] = old.get("runs", []) + new["runs"]
    merged["mixed_weights"] = bool(old.get("mixed_weights")) or bool(problems)
    if merged["mixed_weights"]:
        merged["earlier_weights"] = old.get("earlier_weights", []) + [old["weights"]]
    return merged


def check_sets(sets: Mapping[str, str | os.PathLike], allow_mixed: bool = False) -> dict[str, dict | None]:
    """Read the manifests of the generated sets one evaluation uses (``{name: folder}``) and refuse mixing.

    Refused (:class:`MixedSetsError`, listing every problem) unless ``allow_mixed``: a set made by more than
    one set of weights; a set whose stage-2 weights were trained for another class/defect than its folder
    says; sets made from different base models. Returns ``{name: manifest or None}``.
    """
    manifests = {name: read_manifest(folder) for name, folder in sets.items()}
    missing = [name for name, m in manifests.items() if m is None]
    if missing:
        logger.warning(
            "no %s in generated set(s) %s (made before manifests existed?): the weights that made them are "
            "not checked",
            MANIFEST_NAME,
            missing,
        )
    problems = []
    for name, m in manifests.items():
        if m is None:
            continue
        if m.get("mixed_weights"):
            problems.append(
                f"{sets[name]} holds images of {len(m.get('earlier_weights', [])) + 1} sets of weights"
            )
        trained = m["weights"].get("trained_for") or {}
        for key, want in (("class", m.get("class")), ("defect", m.get("defect"))):
            if trained.get(key) and want and trained[key] != want:
                problems.append(
                    f"{sets[name]} ({key} {want!r}) was generated by weights trained for {key} {trained[key]!r} "
                    f"({m['weights']['dir']})"
                )
    bases = {_base_key(m): m["base_model"]["path"] for m in manifests.values() if m is not None}
    if len(bases) > 1:
        problems.append(f"the sets come from {len(bases)} different base models: {sorted(bases.values())}")
    if problems and not allow_mixed:
        raise MixedSetsError(
            "generated sets made by different weights would be mixed:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + f"\nRegenerate the sets, or pass {ALLOW_FLAG} to use them anyway (recorded in the result's manifest)."
        )
    for p in problems:
        logger.warning("%s (allowed by %s)", p, ALLOW_FLAG)
    return manifests


def evaluation_manifest(
    *,
    job: str,
    flags: Mapping[str, Any],
    inputs: Mapping[str, dict | None],
    outputs: Iterable[str | os.PathLike] = (),
    allowed_mixed: bool = False,
) -> dict[str, Any]:
    """The manifest of an evaluation result: the command's flags, the input sets' manifests, the output files."""
    outs = [Path(p) for p in outputs if Path(p).is_file()]
    return {
        "kind": "evaluation",
        "job": job,
        "flags": _jsonable(flags),
        "repo": repo_state(),
        "versions": versions(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": dict(inputs),
        "allowed_mixed_weights": allowed_mixed,
        "outputs": [{"name": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in outs],
    }


def set_folder_of(image_dir: str | os.PathLike) -> Path:
    """The generated set an image folder belongs to: itself (``full/``, ``<defect>/``) or, for
    ``<defect>/image``, its parent - whichever holds the manifest (else the folder itself)."""
    d = Path(image_dir)
    return d.parent if not (d / MANIFEST_NAME).is_file() and (d.parent / MANIFEST_NAME).is_file() else d


def result_manifest_name(result_file: str | os.PathLike) -> str:
    """``ic_lpips.json`` -> ``ic_lpips.manifest.json``: the manifest next to an evaluation result file."""
    return f"{Path(result_file).stem}.{MANIFEST_NAME}"


def generated_set_dir(args: Any) -> Path:
    """The folder eval/generate.py writes a set into."""
    leaf = "full" if args.stage == "stage1" else args.mvtec_anomaly_name
    return Path(args.output_root) / args.mvtec_name / leaf


def record_generation(args: Any, base_model: str | os.PathLike) -> Path:
    """eval/generate.py: write (or extend) the set's manifest before generating; refuse mixing weights."""
    stage2 = args.stage == "stage2"
    weights_dir = Path(args.weights_dir if stage2 else args.lora_dir)
    if stage2:
        prompts = {"blend": args.prompt_blend, "fg": args.prompt_fg, "negative": args.negative_prompt}
        cfg = json.loads((weights_dir / "dual_config.json").read_text())
        trained_for = {"class": cfg.get("mvtec_name"), "defect": cfg.get("mvtec_anomaly_name")}
    else:
        prompts = {"prompt": args.prompt, "negative": args.negative_prompt}
        trained_for = {}
    new = generation_manifest(
        stage=args.stage,
        class_name=args.mvtec_name,
        defect=args.mvtec_anomaly_name if stage2 else None,
        weights_dir=weights_dir,
        base_model=base_model,
        prompts=prompts,
        sampler=args.scheduler,
        steps=args.num_inference_steps,
        guidance=args.guidance_scale,
        seed=args.seed,
        num_images=args.num_images,
        flags=vars(args),
        trained_for=trained_for,
    )
    folder = generated_set_dir(args)
    return write_manifest(folder, merge_into_set(folder, new, args.allow_mixed_weights))
