"""Pre-compute SD-1.5 CLIP text embeddings of "a photo of a {class name}" for every class, plus the null prompt.

    python preprocessing/prepare_clip_embeddings.py --pretrained_model_name_or_path models/stable-diffusion-v1-5 \\
        --out caches/clip_imagenet_sd15.safetensors

Output: one tensor `embeddings` of shape [K+1, 77, 768] (K = 1000 classes of datasets/imagenet_classes.json),
row k = class id k, row K (the last) = the empty prompt "" used for classifier-free guidance dropout. Each
row is the text encoder's last hidden state (what SD-1.5's U-Net cross-attends to), stored in --dtype (fp16 by
default, ~118 MiB for 1001 x 77 x 768). `.safetensors` (tensor + JSON metadata: prompts, null_index, ...) or
`.pt` (a dict with the same fields), written atomically.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json

import torch

from preprocessing.cache_jobs import MODEL_DTYPES, SD15_HOW_TO_GET
from preprocessing.sample_imagenet_subset import DEFAULT_CLASS_INDEX, load_class_index
from utils.checkpoint import save_safetensors_atomic, torch_save_atomic
from utils.cli import run_cli
from utils.logging import progress
from utils.weights import SD15_LOCAL_DIR, resolve_hf_path

DEFAULT_TEMPLATE = "a photo of a {}"


def class_prompts(
    class_index_json: str | Path, template: str = DEFAULT_TEMPLATE
) -> tuple[list[str], list[str]]:
    """(prompts for class ids 0..K-1 followed by the null prompt "", synsets)."""
    classes = load_class_index(class_index_json)
    # torchvision-style names use underscores ("great_white_shark"); prompts want words
    prompts = [template.format(name.replace("_", " ")) for _, name in classes]
    return [*prompts, ""], [s for s, _ in classes]


@torch.inference_mode()
def encode_prompts(
    prompts: list[str], tokenizer, text_encoder, batch_size: int = 64, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """[len(prompts), max_length, dim] last hidden states, padded to the tokenizer's max length (77)."""
    chunks = []
    for start in progress(range(0, len(prompts), batch_size), desc="CLIP text", unit="batch"):
        tokens = tokenizer(
            prompts[start : start + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = text_encoder(tokens.input_ids.to(device))[0]
        chunks.append(out.float().cpu())
    return torch.cat(chunks)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=SD15_LOCAL_DIR,
        help="SD-1.5 pipeline directory (or hub id in the local HF cache) with tokenizer/ and text_encoder/.",
    )
    parser.add_argument("--out", required=True, help="Output file, .safetensors or .pt.")
    parser.add_argument(
        "--class_index_json",
        default=str(DEFAULT_CLASS_INDEX),
        help="Class index {'<id>': [synset, name]} (default: the repo's 1000 ImageNet classes).",
    )
    parser.add_argument(
        "--template", default=DEFAULT_TEMPLATE, help="Prompt template with one {} for the name."
    )
    parser.add_argument("--dtype", choices=sorted(MODEL_DTYPES), default="float16", help="Stored dtype.")
    parser.add_argument("--batch_size", type=int, default=64, help="Prompts per text-encoder batch.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda if available, else cpu).")
    args = parser.parse_args(argv)
    if Path(args.out).suffix not in (".safetensors", ".pt"):
        parser.error(f"--out must end in .safetensors or .pt, got {args.out}")
    if args.template.count("{}") != 1:
        parser.error(f"--template needs exactly one {{}}, got {args.template!r}")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from transformers import CLIPTextModel, CLIPTokenizer

    root = resolve_hf_path(
        args.pretrained_model_name_or_path,
        "Stable Diffusion 1.5 text encoder",
        SD15_HOW_TO_GET,
        required_files=("tokenizer/vocab.json", "tokenizer/merges.txt", "text_encoder/config.json"),
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = CLIPTokenizer.from_pretrained(str(root), subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(str(root), subfolder="text_encoder").to(device).eval()
    prompts, synsets = class_prompts(args.class_index_json, args.template)
    embeddings = encode_prompts(prompts, tokenizer, text_encoder, args.batch_size, device).to(
        MODEL_DTYPES[args.dtype]
    )
    null_index = len(prompts) - 1
    info = {
        "prompts": prompts,
        "synsets": synsets,
        "null_index": null_index,
        "template": args.template,
        "class_index_json": str(Path(args.class_index_json).resolve()),
        "text_encoder": str(root.resolve() / "text_encoder"),
    }
    out = Path(args.out)
    if out.suffix == ".safetensors":
        save_safetensors_atomic(
            {"embeddings": embeddings}, out, metadata={k: json.dumps(v) for k, v in info.items()}
        )
    else:
        torch_save_atomic({"embeddings": embeddings, **info}, out)
    print(
        f"wrote {out}: embeddings {list(embeddings.shape)} {args.dtype} ({len(prompts) - 1} classes + null prompt "
        f"at index {null_index})"
    )
    return out


if __name__ == "__main__":
    run_cli(main)
