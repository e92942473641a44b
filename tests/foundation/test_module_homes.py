"""Where things live: training, models, datasets and losses never import from eval/ (evaluation sits above
them), and the names that moved keep importing from their old modules as the same objects."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOWER_PACKAGES = ("train", "models", "datasets", "losses")

# (old module, new module, names that must still import from the old one as the same objects)
MOVED = [
    ("datasets.lmdb_cache", "datasets.lmdb_cache_writer", ["LMDBCacheWriter"]),
    (
        "datasets.lmdb_cache",
        "datasets.lmdb_cache_format",
        ["RecordFormat", "CorruptRecordError", "TruncatedShardError", "read_metadata", "release_env"],
    ),
    (
        "models.dual_lora",
        "models.dual_lora_io",
        [
            "load_dual_unet",
            "save_dual_weights",
            "load_dual_weights",
            "read_dual_config",
            "export_branch_loras",
        ]
        + ["BRANCH_LORA_NAMES", "add_text_encoder_lora", "load_text_encoder_lora", "normalize_lora_keys"],
    ),
    ("eval.generate", "models.dual_sampling", ["sample_pairs", "encode_prompts"]),
    ("eval.generate", "models.dual_lora_io", ["LEGACY_FG_BACKGROUND"]),
    ("eval.inception", "models.inception", ["CleanFIDInception", "load_inception", "POOL_DIM"]),
    ("eval.mask_extraction", "models.mask_extraction", ["MaskParams", "extract_mask", "mask_to_image"]),
]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_lower_packages_never_import_eval():
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for package in LOWER_PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for module in sorted(_imported_modules(path))
        if module == "eval" or module.startswith("eval.")
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(("old", "new", "names"), MOVED, ids=[f"{old}<-{new}" for old, new, _ in MOVED])
def test_moved_names_still_import_from_the_old_module(old, new, names):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_module, name) is getattr(new_module, name), f"{old}.{name}"


def test_unknown_name_of_a_compat_module_is_still_an_attribute_error():
    dual_lora = importlib.import_module("models.dual_lora")
    with pytest.raises(AttributeError, match="no_such_name"):
        dual_lora.no_such_name  # noqa: B018
