"""Bytes to arrays: ``(H, W, C)`` images the model can take, one file at a time.

Every failure here is a :class:`DecodeError` with a message a user can act on; the pipeline turns
it into an error row, so one bad file never costs more than its own row.
"""

from __future__ import annotations

import io as stdio
import warnings

import numpy as np
from PIL import Image, ImageFile

from segbatch.errors import DecodeError, ImageTooLargeError

# segbatch checks the pixel count itself (with a message naming the fix) before decoding;
# Pillow's global limit would raise its own error first, so it is lifted here.
Image.MAX_IMAGE_PIXELS = None
# A truncated file must fail, not decode to a grey bottom half.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, over the decoder's limit of "
            f"{max_pixels:,} (input.max_image_pixels, Pillow's default); large scenes should be "
            "tiled GeoTIFFs, which are read by windows (tiling.enabled), or raise "
            "input.max_image_pixels if this machine has the memory"
        )


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit (0..65535) -> 8-bit, rounding: v / 257."""
    return np.clip(np.rint(values.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)


def photo_to_array(im: Image.Image, channels: int) -> np.ndarray:
    """A decoded PIL image -> ``(H, W, channels)`` array.

    3 channels: uint8 RGB (grey, palette and RGBA converted as ``Image.convert('RGB')`` does;
    16-bit grey scaled to 8 bits). 1 channel: uint8 grey, or float32 in [0, 1] for 16-bit grey
    (keeps its precision). 4 channels: RGBA uint8.
    """
    mode = im.mode
    if channels == 3:
        if mode in _SIXTEEN_BIT_MODES:
            grey = _to_uint8(np.asarray(im))
            return np.repeat(grey[:, :, None], 3, axis=2)
        if mode == "F":
            raise DecodeError("32-bit float images need a model with in_channels=1")
        return np.asarray(im.convert("RGB"))
    if channels == 1:
        if mode in _SIXTEEN_BIT_MODES:
            arr = np.asarray(im).astype(np.float32) / 65535.0
            return arr[:, :, None]
        if mode == "F":
            return np.asarray(im, dtype=np.float32)[:, :, None]
        return np.asarray(im.convert("L"))[:, :, None]
    if channels == 4:
        return np.asarray(im.convert("RGBA"))
    raise DecodeError(
        f"the model takes {channels} channels but this is a {mode} image; multi-band inputs "
        "must be GeoTIFFs (pip install 'segbatch[geo]') with preprocess.bands selecting the bands"
    )


def model_input_size(
    height: int, width: int, resize: str | int | tuple[int, int]
) -> tuple[int, int]:
    """The (h, w) the model sees for an image of (height, width), as torchvision's Resize."""
    if resize == "none":
        return height, width
    if isinstance(resize, int):
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(resize * long / short)
        return (resize, new_long) if height <= width else (new_long, resize)
    assert isinstance(resize, tuple)
    return resize[0], resize[1]


def check_model_input(
    height: int, width: int, resize: str | int | tuple[int, int], max_pixels: int
) -> tuple[int, int]:
    """The model's (h, w) for an image of (height, width) (see model_input_size), or an
    ImageTooLargeError when that is over ``max_pixels`` (input.max_image_pixels).

    Checked before resizing: a 1 x 20000 strip scaled to a shorter side of 520 is 520 x
    10,400,000 (16 GB as uint8 RGB), and the model's logits, even blended tile by tile, are held
    whole at this size (``K * h * w`` float32).
    """
    h, w = model_input_size(height, width, resize)
    if h * w <= max_pixels:
        return h, w
    if resize == "none":
        how = "the model sees it at this size (preprocess.resize: none)"
    elif isinstance(resize, int):
        how = f"resizing its shorter side to {resize} (preprocess.resize) makes it {w}x{h}"
    else:
        how = f"preprocess.resize makes it {w}x{h}"
    raise ImageTooLargeError(
        f"image is {width}x{height}; {how} = {h * w:,} pixels, over input.max_image_pixels "
        f"({max_pixels:,}): the model's logits would not fit in memory, even tiled (tiling keeps "
        "the whole image's logits); set preprocess.resize (an [h, w], or none to keep the image's "
        "own size, with tiling.enabled for inputs larger than a tile), or raise "
        "input.max_image_pixels if this machine has the memory"
    )


def resize_for_model(image: np.ndarray, resize: str | int | tuple[int, int]) -> np.ndarray:
    """Resize a uint8 ``(H, W, C)`` image as torchvision's preset does on a PIL image.

    ``resize``: 'none', the shorter side (int) or (h, w). Pillow's antialiased bilinear, called
    through torchvision's own ``resize`` so sizes and rounding equal the preset's. Other dtypes
    are returned unchanged: the predictor resizes those on the device.
    """
    if resize == "none" or image.dtype != np.uint8 or image.shape[2] not in (1, 3, 4):
        return image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    size = [resize] if isinstance(resize, int) else list(resize)
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(TF.resize(pil, size, interpolation=InterpolationMode.BILINEAR))
    return out[:, :, None] if out.ndim == 2 else out


def _describe_start(data: bytes) -> str:
    """What the first bytes of a non-image look like, without their content.

    The bytes themselves would land in the results (a link to /etc/passwd shows 'root:x:0'):
    text says only that it is text; anything else shows its 4-byte magic in hex, which names a
    format (7f454c46 is ELF, 25504446 is PDF) and nothing of the data.
    """
    head = data[:64]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the end of the sample is still text.
        text = head[: exc.start].decode("utf-8") if exc.start >= len(head) - 3 else ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return "it looks like text"
    return f"magic bytes {data[:4].hex()}"


def decode_photo(data: bytes, channels: int = 3, max_pixels: int = 89_478_485) -> np.ndarray:
    """PNG, JPEG, BMP, WebP or plain TIFF bytes -> ``(H, W, channels)`` (see photo_to_array)."""
    if not data:
        raise DecodeError("file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(stdio.BytesIO(data))
            _check_pixels(im.width, im.height, max_pixels)
            im.load()
    except DecodeError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise DecodeError(
            f"not an image Pillow can read ({_describe_start(data)}); the file may be "
            "mislabelled or corrupt"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"cannot decode image: {exc}") from exc
    return photo_to_array(im, channels)
