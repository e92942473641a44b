"""Hugging Face model cards (``README.md`` with YAML metadata) for every exported LoRA and tokenizer.

Built with ``huggingface_hub.ModelCard`` / ``ModelCardData`` (the format the Hub reads: ``base_model``,
``library_name``, ``tags``, ``instance_prompt`` ... in the front matter), written atomically next to the weights:

* :func:`lora_card` - a LoRA on Stable Diffusion 1.5: base model, prompts and trigger words, MVTec class / defect,
  data split, training flags, metrics if known, and how to load the file with stock diffusers;
* :func:`tokenizer_card` - an image tokenizer (the DinoVQ export calls it): the same sections with the model
  config and how to load it;
* :func:`write_card` - ``README.md`` in a folder.

Nothing is uploaded; the cards only make the folders self-describing (and ready for ``huggingface-cli upload``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
SD15_LICENSE = "creativeml-openrail-m"  # the license of the SD-1.5 base weights a LoRA derives from


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list | tuple):
        return " ".join(str(x) for x in v)
    return str(v).replace("|", "\\|")


def _table(rows: Mapping[str, Any], head: tuple[str, str] = ("flag", "value"), code: bool = False) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {f'`{k}`' if code else k} | {_value(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _sections(
    *,
    title: str,
    description: str,
    how_to_load: str,
    files: Sequence[str],
    details: Mapping[str, Any],
    flags: Mapping[str, Any] | None,
    metrics: Mapping[str, Any] | None,
    data_split: str | None,
) -> str:
    parts = [f"# {title}", description.strip(), "## How to load", how_to_load.strip()]
    parts += ["## Files", "\n".join(f"- `{f}`" for f in files)]
    parts += ["## Details", _table(details, ("what", "value"))]
    if data_split:
        parts += ["## Training data", data_split.strip()]
    parts += [
        "## Metrics",
        _table(metrics, ("metric", "value")) if metrics else "Not measured for these weights.",
    ]
    if flags:
        parts += ["## Training flags", _table(flags, code=True)]
    parts.append("Written by this repository's trainer (`utils/model_card.py`).")
    return "\n\n".join(parts) + "\n"


def _card(data: Any, body: str):
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _flags(flags: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not flags:
        return None
    return {
        k: v
        for k, v in sorted(flags.items())
        if isinstance(v, str | int | float | bool | list | tuple | type(None))
    }


def lora_card(
    *,
    base_model: str,
    title: str,
    description: str,
    weight_names: Sequence[str],
    prompts: Mapping[str, str],
    trigger_words: Sequence[str] = (),
    class_name: str | None = None,
    defect: str | None = None,
    flags: Mapping[str, Any] | None = None,
    data_split: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
    extra_loading_note: str = "",
    tags: Sequence[str] = (),
):
    """A model card for LoRA file(s) on SD-1.5 in diffusers format; ``prompts``: {role: prompt}, the first one
    used in the loading example; ``sampling``: scheduler / steps / guidance of the example."""
    from huggingface_hub import ModelCardData

    sampling = dict(sampling or {"num_inference_steps": 50, "guidance_scale": 2.5})
    first_prompt = next(iter(prompts.values()), "")
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license=SD15_LICENSE,
        pipeline_tag="text-to-image",
        tags=["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "lora", *tags],
        instance_prompt=first_prompt or None,
    )
    args = ", ".join(f"{k}={v!r}" for k, v in sampling.items() if k != "scheduler")
    loads = "\n".join(
        f'pipe.load_lora_weights("path/to/this/folder", weight_name="{w}")'
        + ("  # or" if i < len(weight_names) - 1 else "")
        for i, w in enumerate(weight_names)
    )
    how = f"""With stock diffusers (no code from this repository):

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")
{loads}
image = pipe({first_prompt!r}, {args}).images[0]
```
{extra_loading_note}"""
    details = {"base model": base_model, "format": "diffusers LoRA (peft keys, safetensors)"}
    details.update({f"prompt ({k})": v for k, v in prompts.items()})
    if trigger_words:
        details["trigger words"] = ", ".join(trigger_words)
    if class_name:
        details["MVTec AD class"] = class_name
    if defect:
        details["defect type"] = defect
    details.update({f"sampling: {k}": v for k, v in sampling.items()})
    body = _sections(
        title=title,
        description=description,
        how_to_load=how,
        files=weight_names,
        details=details,
        flags=_flags(flags),
        metrics=metrics,
        data_split=data_split,
    )
    return _card(data, body)


def tokenizer_card(
    *,
    title: str,
    description: str,
    weight_names: Sequence[str],
    config: Mapping[str, Any],
    how_to_load: str,
    flags: Mapping[str, Any] | None = None,
    data_split: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    library_name: str | None = None,
    tags: Sequence[str] = (),
):
    """A model card for an image tokenizer export (DinoVQ): ``config`` = the model's constructor settings
    (codebook size, dimensions ...), ``how_to_load`` = Markdown with the loading code, ``base_model`` = the
    encoder it starts from (e.g. ``facebook/dinov2-base``) if any."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_model,
        library_name=library_name,
        tags=["image-tokenizer", "vector-quantization", *tags],
    )
    body = _sections(
        title=title,
        description=description,
        how_to_load=how_to_load,
        files=weight_names,
        details=dict(config),
        flags=_flags(flags),
        metrics=metrics,
        data_split=data_split,
    )
    return _card(data, body)


def write_card(card: Any, folder: str | os.PathLike) -> Path:
    """``<folder>/README.md``, written atomically."""
    from utils.checkpoint import atomic_write

    path = Path(folder) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return path
