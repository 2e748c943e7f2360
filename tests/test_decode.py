"""Decoding photos (segbatch.decode): formats, modes, bit depths, failures, pixel limits."""

from __future__ import annotations

import io as stdio
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segbatch.decode import decode_photo, photo_to_array
from segbatch.errors import DecodeError, ImageTooLargeError

SAMPLES = Path(__file__).resolve().parents[1] / "jobs" / "samples" / "photos"


def _encode(im: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = stdio.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(23, 37, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("name", "size"),
    [("chelsea_cat.png", (451, 300)), ("astronaut.png", (512, 512)), ("coffee.png", (600, 400))],
)
def test_real_sample_photos(name: str, size: tuple[int, int]) -> None:
    data = (SAMPLES / name).read_bytes()
    got = decode_photo(data)
    width, height = size
    assert got.shape == (height, width, 3)
    assert got.dtype == np.uint8
    with Image.open(SAMPLES / name) as im:
        np.testing.assert_array_equal(got, np.asarray(im.convert("RGB")))
    assert got.std() > 10  # a real photo, not a constant


def test_real_sample_as_jpeg_matches_pillow() -> None:
    with Image.open(SAMPLES / "chelsea_cat.png") as im:
        data = _encode(im.convert("RGB"), "JPEG", quality=90)
    got = decode_photo(data)
    assert got.shape == (300, 451, 3)
    np.testing.assert_array_equal(got, np.asarray(Image.open(stdio.BytesIO(data))))


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
)
def test_lossless_rgb_formats_are_exact(rgb: np.ndarray, fmt: str, kwargs: dict) -> None:
    got = decode_photo(_encode(Image.fromarray(rgb), fmt, **kwargs))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, rgb)


def test_jpeg_is_close(rgb: np.ndarray) -> None:
    smooth = np.full((32, 48, 3), (200, 40, 90), dtype=np.uint8)
    got = decode_photo(_encode(Image.fromarray(smooth), "JPEG", quality=95))
    assert got.shape == (32, 48, 3)
    assert np.abs(got.astype(int) - smooth.astype(int)).max() <= 3


def test_grey_becomes_three_equal_channels() -> None:
    grey = np.random.default_rng(1).integers(0, 256, size=(11, 13), dtype=np.uint8)
    got = decode_photo(_encode(Image.fromarray(grey), "PNG"))
    assert got.shape == (11, 13, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], grey)


def test_grey_with_one_channel() -> None:
    grey = np.random.default_rng(2).integers(0, 256, size=(9, 7), dtype=np.uint8)
    got = decode_photo(_encode(Image.fromarray(grey), "PNG"), channels=1)
    assert got.shape == (9, 7, 1)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, :, 0], grey)


def test_palette_image_uses_its_palette() -> None:
    index = np.random.default_rng(3).integers(0, 4, size=(10, 12), dtype=np.uint8)
    im = Image.frombytes("P", (12, 10), index.tobytes())
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    assert im.mode == "P"
    got = decode_photo(_encode(im, "PNG"))
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)
    np.testing.assert_array_equal(got, colours[index])


def test_rgba_matches_pillow_convert() -> None:
    rgba = np.random.default_rng(4).integers(0, 256, size=(8, 9, 4), dtype=np.uint8)
    im = Image.fromarray(rgba)
    assert im.mode == "RGBA"
    got = decode_photo(_encode(im, "PNG"))
    np.testing.assert_array_equal(got, np.asarray(im.convert("RGB")))
    np.testing.assert_array_equal(got, rgba[:, :, :3])
    four = decode_photo(_encode(im, "PNG"), channels=4)
    np.testing.assert_array_equal(four, rgba)


@pytest.fixture
def sixteen_bit() -> tuple[np.ndarray, bytes]:
    values = np.random.default_rng(5).integers(0, 65536, size=(6, 10), dtype=np.uint16)
    values[0, :6] = [0, 128, 129, 385, 65535, 257 * 100 + 128]  # round-half cases included
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    return values, _encode(im, "PNG")


def test_sixteen_bit_grey_to_uint8(sixteen_bit: tuple[np.ndarray, bytes]) -> None:
    values, data = sixteen_bit
    got = decode_photo(data)
    assert got.shape == (6, 10, 3)
    assert got.dtype == np.uint8
    expected = np.rint(values.astype(np.float64) / 257).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(got[:, :, c], expected)
    assert list(got[0, :5, 0]) == [0, 0, 1, 1, 255]


def test_sixteen_bit_grey_one_channel_keeps_precision(
    sixteen_bit: tuple[np.ndarray, bytes],
) -> None:
    values, data = sixteen_bit
    got = decode_photo(data, channels=1)
    assert got.shape == (6, 10, 1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[:, :, 0], values / 65535.0, rtol=0, atol=1e-7)
    assert got[0, 4, 0] == 1.0
    assert got[0, 0, 0] == 0.0


def test_float_image_needs_one_channel() -> None:
    values = np.linspace(-1, 2, 12, dtype=np.float32).reshape(3, 4)
    im = Image.fromarray(values)
    assert im.mode == "F"
    with pytest.raises(DecodeError, match="in_channels=1"):
        photo_to_array(im, 3)
    np.testing.assert_array_equal(photo_to_array(im, 1)[:, :, 0], values)


def test_unsupported_channel_count(rgb: np.ndarray) -> None:
    with pytest.raises(DecodeError, match="takes 5 channels"):
        decode_photo(_encode(Image.fromarray(rgb), "PNG"), channels=5)


def test_empty_bytes() -> None:
    with pytest.raises(DecodeError, match="empty"):
        decode_photo(b"")


def test_truncated_jpeg() -> None:
    big = np.random.default_rng(6).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(big), "JPEG", quality=95)
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_photo(data[: len(data) // 2])


def test_truncated_png(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "PNG")
    with pytest.raises(DecodeError):
        decode_photo(data[: len(data) - 40])


def test_text_file_is_not_an_image() -> None:
    with pytest.raises(DecodeError) as info:
        decode_photo(b"hello, this is a text file\n")
    assert "not an image" in str(info.value)
    assert not isinstance(info.value, ImageTooLargeError)


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"root:x:0:0:root:/root:/bin/bash\n", "it looks like text"),
        ("caf\u00e9 au lait\n".encode(), "it looks like text"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(64), "magic bytes 7f454c46"),
    ],
)
def test_not_an_image_message_never_shows_the_content(data: bytes, shown: str) -> None:
    # A symlink to /etc/passwd must not put its first line into the results.
    with pytest.raises(DecodeError) as info:
        decode_photo(data)
    message = str(info.value)
    assert message.startswith("not an image Pillow can read")
    assert shown in message
    for leak in ("root", "x:0", "caf", "ELF", "\\x"):
        assert leak not in message


def test_pixel_limit() -> None:
    data = _encode(Image.new("RGB", (40, 40), (1, 2, 3)), "PNG")
    with pytest.raises(ImageTooLargeError) as info:
        decode_photo(data, max_pixels=1000)
    message = str(info.value)
    assert "input.max_image_pixels" in message
    assert "40x40" in message
    assert "1,600" in message
    got = decode_photo(data, max_pixels=1600)  # the limit itself is allowed
    assert got.shape == (40, 40, 3)
    assert tuple(got[0, 0]) == (1, 2, 3)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with a one-row body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4))
        + chunk(b"IEND", b"")
    )


def test_huge_claimed_size_hits_segbatch_limit_not_pillows() -> None:
    data = _png_header(100_000, 100_000)  # 10^10 pixels: far over Pillow's bomb limit
    with pytest.raises(ImageTooLargeError, match=re.escape("input.max_image_pixels")):
        decode_photo(data)
    # Above segbatch's limit only when asked: then it fails as a broken file, not as a bomb.
    with pytest.raises(DecodeError) as info:
        decode_photo(data, max_pixels=10**11)
    assert not isinstance(info.value, ImageTooLargeError)
    assert "cannot decode" in str(info.value)
