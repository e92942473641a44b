"""Bad input files for the tests of issue 12 (written byte by byte, so they do not depend on an encoder)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """A PNG of ``pixels``: [H, W] (gray) or [H, W, 3] (RGB), uint8 or uint16 (16-bit samples, big endian)."""
    pixels = np.asarray(pixels)
    depth = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}[pixels.dtype]
    color = 0 if pixels.ndim == 2 else 2
    height, width = pixels.shape[:2]
    rows = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )
    Path(path).write_bytes(data)
    return Path(path)


def write_bomb_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A small file whose PNG header claims ``width`` x ``height`` RGB pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )
    Path(path).write_bytes(data)
    return Path(path)
