"""Anomaly masks from generated fg images live in models/mask_extraction.py (the stage-2 pipeline uses them); its
names import from here too."""

from models.mask_extraction import (
    MaskParams,
    background_value,
    extract_mask,
    mask_iou,
    mask_to_image,
    otsu_threshold,
)

__all__ = [
    "MaskParams",
    "otsu_threshold",
    "background_value",
    "extract_mask",
    "mask_to_image",
    "mask_iou",
]
