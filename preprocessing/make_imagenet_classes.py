"""Regenerate ``datasets/imagenet_classes.json`` (the 1000 ImageNet-1k classes) offline.

Class index order is the standard one: sorted WordNet synset ids (what torchvision's ``ImageFolder`` and
``imagenet_class_index.json`` use; index 0 = n01440764 tench). Synset ids come from timm
(``timm/data/_info/imagenet_synsets.txt``); names are OpenAI CLIP's curated ImageNet class names (shipped by
open-clip-torch as ``IMAGENET_CLASSNAMES``), written for "a photo of a {name}" prompts: they disambiguate
WordNet homonyms (index 134 "crane bird" vs 517 "crane") where the first WordNet lemma does not.
The file ships with the repo; this script only documents and reproduces where it came from.

    python preprocessing/make_imagenet_classes.py --out datasets/imagenet_classes.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.checkpoint import atomic_write
from utils.cli import run_cli


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"package {name!r} is not installed; it is needed for {hint} (pip install {name})."
        )
    return Path(spec.origin).parent


def build_class_index() -> dict[str, list[str]]:
    """``{"0": ["n01440764", "tench"], ...}`` from timm's synset list and open_clip's class names."""
    synsets_file = (
        _package_dir("timm", "the ImageNet synset list") / "data" / "_info" / "imagenet_synsets.txt"
    )
    if not synsets_file.is_file():
        raise FileNotFoundError(f"timm does not ship {synsets_file}; use timm >= 0.9")
    synsets = synsets_file.read_text().split()
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if len(synsets) != 1000 or len(set(synsets)) != 1000 or synsets != sorted(synsets):
        raise ValueError(f"{synsets_file}: expected 1000 unique sorted synsets, got {len(synsets)}")
    if len(IMAGENET_CLASSNAMES) != 1000:
        raise ValueError(f"open_clip IMAGENET_CLASSNAMES has {len(IMAGENET_CLASSNAMES)} names, expected 1000")
    return {str(i): [s, n] for i, (s, n) in enumerate(zip(synsets, IMAGENET_CLASSNAMES))}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parents[1] / "datasets" / "imagenet_classes.json"),
        help="Output JSON path (default: the repo's datasets/imagenet_classes.json).",
    )
    args = parser.parse_args()
    index = build_class_index()
    with atomic_write(args.out) as tmp:
        # one class per line: diffable and greppable
        lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in index.items()]
        tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {len(index)} classes to {args.out}")


if __name__ == "__main__":
    run_cli(main)
