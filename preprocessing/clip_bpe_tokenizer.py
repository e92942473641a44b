"""Build the real CLIP BPE tokenizer files (as in SD-1.5's `tokenizer/` dir) offline.

SD-1.5's tokenizer is OpenAI CLIP's BPE: 256 byte symbols, the same 256 symbols with `</w>`, the first
48894 merges of `bpe_simple_vocab_16e6.txt.gz`, then `<|startoftext|>` and `<|endoftext|>` (49408 ids).
open-clip-torch ships that merges file, so the vocabulary can be rebuilt without a network; the result
loads with `CLIPTokenizer.from_pretrained` and tokenizes like open_clip's `SimpleTokenizer`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2  # what OpenAI CLIP keeps from the merges file (48894)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode table (same order as the reference)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def find_open_clip_bpe() -> Path:
    """Path of the merges file shipped by open-clip-torch; clear error when the package is missing."""
    # find_spec locates the package without importing it (importing open_clip pulls in torch: seconds)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "open-clip-torch is not installed; it ships bpe_simple_vocab_16e6.txt.gz, the CLIP BPE merges "
            "file needed to build the tiny SD-1.5 tokenizer. Install it with `pip install open-clip-torch`."
        )
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE merges file not found at {path} (reinstall open-clip-torch).")
    return path


def build_clip_vocab(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merge lines) exactly as OpenAI CLIP builds them."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    if len(merges) != NUM_MERGES:
        raise ValueError(f"{bpe_path}: expected at least {NUM_MERGES} merges, found {len(merges)}")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    if len(encoder) != CLIP_VOCAB_SIZE:
        raise ValueError(f"built {len(encoder)} unique tokens, expected {CLIP_VOCAB_SIZE}")
    return encoder, merges


def write_clip_tokenizer(out_dir: Path, bpe_path: Path | None = None) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json (SD-1.5's file set)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder, merges = build_clip_vocab(bpe_path or find_open_clip_bpe())
    (out_dir / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
