"""utils/images.py on bad and unusual image files: every accepted PIL mode against hand-computed RGB values,
16-bit images scaled (not clipped), decompression bombs and unsupported modes rejected naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.bad_inputs import write_bomb_png, write_png
from utils.images import SUPPORTED_MODES, UnreadableImageError, load_rgb, read_image, to_8bit

# 16-bit samples and their 8-bit values by hand: the high byte, v >> 8 (as PIL does for 16-bit RGB PNGs)
SAMPLES16 = [0, 255, 256, 1000, 32768, 65280, 65535]
EXPECTED8 = [0, 0, 1, 3, 128, 255, 255]


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    path = write_png(tmp_path / "g16.png", np.array([SAMPLES16], dtype=np.uint16))
    with Image.open(path) as im:
        assert im.mode == "I;16"  # what PIL makes of it; convert("RGB") would give 0, 255, 255, 255, ...
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (1, len(SAMPLES16), 3)
    assert rgb[0, :, 0].tolist() == EXPECTED8 and (rgb == rgb[..., :1]).all()
    assert np.asarray(read_image(path, "L"))[0].tolist() == EXPECTED8


def test_16bit_rgb_png_keeps_the_high_byte(tmp_path):
    pixels = np.array([[[0, 256, 65535], [32768, 1000, 255]]], dtype=np.uint16)
    rgb = np.asarray(read_image(write_png(tmp_path / "c16.png", pixels)))
    assert rgb.tolist() == [[[0, 1, 255], [128, 3, 0]]]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_tiff_modes_are_scaled(tmp_path, mode):
    arr = np.array([SAMPLES16], dtype=np.uint16 if mode == "I;16" else ">u2")
    img = Image.frombytes(mode, (len(SAMPLES16), 1), arr.tobytes())
    assert np.asarray(to_8bit(img, "L"))[0].tolist() == EXPECTED8
    img.save(tmp_path / "x.tif")
    assert np.asarray(read_image(tmp_path / "x.tif"))[0, :, 1].tolist() == EXPECTED8


def test_32bit_I_from_png_is_16bit_data_elsewhere_rejected():
    # Pillow < 11 opened 16-bit gray PNGs as mode I; PNG samples have at most 16 bits
    img = Image.fromarray(np.array([SAMPLES16], dtype=np.int32), mode="I")
    assert np.asarray(to_8bit(img, "L", source_format="PNG"))[0].tolist() == EXPECTED8
    with pytest.raises(ValueError, match="unsupported pixel mode 'I'"):
        to_8bit(img, "RGB", source_format="TIFF")


def _palette(mode: str) -> Image.Image:
    img = Image.new(mode, (1, 1), 1 if mode == "P" else (1, 200))
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    return img


# (mode, pixel value, expected RGB computed by hand, tolerance)
MODES = [
    ("1", 1, (255, 255, 255), 0),
    ("L", 77, (77, 77, 77), 0),
    ("LA", (77, 10), (77, 77, 77), 0),  # alpha dropped
    ("P", None, (10, 20, 30), 0),  # palette entry 1
    ("PA", None, (10, 20, 30), 0),
    ("RGB", (1, 2, 3), (1, 2, 3), 0),
    ("RGBA", (1, 2, 3, 4), (1, 2, 3), 0),
    ("RGBX", (1, 2, 3, 4), (1, 2, 3), 0),
    # R = (255 - C)(255 - K) / 255: 155*204/255 = 124, 205*204/255 = 164, 255*204/255 = 204
    ("CMYK", (100, 50, 0, 51), (124, 164, 204), 0),
    # JPEG YCbCr: R = Y + 1.402 (Cr-128) = 200.9, G = Y - 0.714136 (Cr-128) = 48.6, B = Y + 1.772 (Cb-128) = 100
    ("YCbCr", (100, 128, 200), (201, 49, 100), 1),
    # L* = 100/255*100 = 39.22, a* = b* = 0: Y = ((L*+16)/116)^3 = 0.1079, sRGB 1.055 Y^(1/2.4) - 0.055 = 0.362
    ("LAB", (100, 128, 128), (92, 92, 92), 1),
    ("HSV", (85, 255, 128), (0, 128, 0), 1),  # hue 85/255*360 = 120 deg (green), value 128
]


@pytest.mark.parametrize("mode,value,expected,tol", MODES, ids=[m[0] for m in MODES])
def test_each_accepted_mode_against_hand_computed_rgb(mode, value, expected, tol):
    img = _palette(mode) if mode in ("P", "PA") else Image.new(mode, (1, 1), value)
    got = to_8bit(img, "RGB").getpixel((0, 0))
    assert all(abs(g - e) <= tol for g, e in zip(got, expected)), (mode, got, expected)


def test_every_supported_mode_is_tested():
    tested = {m[0] for m in MODES} | {"I;16", "I;16B", "I"}  # the 16-bit tests above
    assert set(SUPPORTED_MODES) - tested <= {"I;16L", "I;16N"}  # aliases of I;16 (same little-endian bytes)


@pytest.mark.parametrize("mode", ["F", "La", "RGBa"])
def test_unsupported_mode_is_an_error_naming_the_mode(mode):
    with pytest.raises(ValueError, match=f"unsupported pixel mode '{mode}'"):
        to_8bit(Image.new(mode, (2, 2)))


def test_unsupported_mode_file_names_the_file(tmp_path):
    Image.new("F", (2, 2), 0.5).save(tmp_path / "float.tif")  # 32-bit float TIFF: no defined 8-bit range
    with pytest.raises(UnreadableImageError, match=r"float\.tif: unsupported pixel mode 'F'"):
        read_image(tmp_path / "float.tif")


def test_decompression_bomb_is_rejected_before_decoding(tmp_path):
    bomb = write_bomb_png(tmp_path / "bomb.png")  # header: 20000 x 20000 (1.2 GB of RGB)
    with pytest.raises(UnreadableImageError, match=r"bomb\.png: too many pixels.*400000000 pixels") as err:
        read_image(bomb)
    assert err.value.path == bomb and "--max_image_pixels" in err.value.reason
    assert load_rgb(bomb) is None


def test_pixel_limit_is_configurable_and_replaces_pils_own(tmp_path, monkeypatch):
    path = write_png(tmp_path / "small.png", np.full((8, 8, 3), 7, dtype=np.uint8))
    with pytest.raises(
        UnreadableImageError, match=r"small\.png: too many pixels: header says 8x8 = 64 .*now 63"
    ):
        read_image(path, max_pixels=63)
    assert read_image(path, max_pixels=64).size == (8, 8)
    # PIL would refuse 64 pixels with a limit of 10 (error above twice its limit); ours is what counts
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert np.asarray(read_image(path, max_pixels=100))[0, 0].tolist() == [7, 7, 7]


def test_missing_garbage_and_truncated_files_name_the_file(tmp_path):
    with pytest.raises(UnreadableImageError, match=r"nope\.png: file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableImageError, match=r"junk\.png: cannot decode image, not an image file"):
        read_image(tmp_path / "junk.png")
    good = write_png(
        tmp_path / "good.png", np.arange(64 * 64 * 3, dtype=np.uint32).astype(np.uint8).reshape(64, 64, 3)
    )
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:-200])
    with pytest.raises(UnreadableImageError, match=r"cut\.png: cannot decode image, truncated"):
        read_image(tmp_path / "cut.png")
