"""The CPU stages before the model: read bytes, then decode, row by row.

Both take and return Ray Data batches (dicts of equal-length columns) but do not import Ray:
they are plain functions over numpy columns, tested without a cluster. A failure reading or
decoding one file sets that row's ``error`` and leaves the rest of the batch untouched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from segbatch import io
from segbatch.decode import decode_photo, resize_for_model
from segbatch.errors import DecodeError, SegbatchError
from segbatch.sources import extension_of

# Kinds of rows after decoding: the actor segments "image" rows from their array; "error" rows
# pass through as error rows.
KIND_IMAGE = "image"
KIND_ERROR = "error"

Batch = dict[str, Any]


def errors_in(column: Any) -> list[str | None]:
    """An ``error`` column as messages or None. Columns carry '' for "no error": Ray turns an
    all-None object column into nulls that come back as NaN."""
    return [e if isinstance(e, str) and e else None for e in column]


def errors_out(errors: list[str | None]) -> np.ndarray:
    return np.array([e or "" for e in errors], dtype=object)


def error_message(exc: BaseException) -> str:
    """A one-line error message for the row: the exception type when it says something."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, SegbatchError):
        return text or type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {text}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {text}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_batch(
    batch: Batch,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 5,
    threads: int = 8,
) -> Batch:
    """Add a ``data`` column (file bytes; empty on error) to a batch of ``uri``/``error`` rows.

    Reads run in a few threads: object stores are latency-bound, not CPU-bound.
    """
    uris = list(batch["uri"])
    errors = errors_in(batch["error"])

    def read_one(i: int) -> bytes:
        if errors[i] is not None:
            return b""
        try:
            return io.read_bytes(uris[i], storage_options, retries)
        except Exception as exc:
            errors[i] = error_message(exc)
            return b""

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(uris)))) as pool:
        data = list(pool.map(read_one, range(len(uris))))
    out = dict(batch)
    out["data"] = np.array([*data, b""], dtype=object)[:-1]  # keeps bytes objects intact
    out["error"] = errors_out(errors)
    return out


def decode_batch(
    batch: Batch,
    channels: int = 3,
    max_pixels: int = 89_478_485,
    resize: str | int | tuple[int, int] = "none",
) -> Batch:
    """Replace ``data`` by ``image`` ((H, W, C) arrays), ``kind``, ``width``, ``height``, ``meta``.

    Images are resized for the model here, on the CPU, as torchvision's preset does on a PIL
    image (so batches travel at the model's size); ``width``/``height`` stay the original size.
    Rows that fail get an empty image of shape (0, 0, C) and their error message.
    """
    n = len(batch["uri"])
    images: list[np.ndarray] = []
    kinds: list[str] = []
    widths: list[int] = []
    heights: list[int] = []
    metas: list[str] = []
    errors = errors_in(batch["error"])
    for i in range(n):
        height = width = -1
        image = np.zeros((0, 0, channels), dtype=np.uint8)
        kind = KIND_ERROR
        if errors[i] is None:
            try:
                image = decode_one(batch["data"][i], batch["uri"][i], channels, max_pixels)
                height, width = image.shape[:2]
                image = resize_for_model(image, resize)
                kind = KIND_IMAGE
            except Exception as exc:
                errors[i] = error_message(exc)
        images.append(image)
        kinds.append(kind)
        heights.append(int(height) if kind == KIND_IMAGE else -1)
        widths.append(int(width) if kind == KIND_IMAGE else -1)
        metas.append(json.dumps({}))
    out = {k: v for k, v in batch.items() if k != "data"}
    out["image"] = images
    out["kind"] = np.array(kinds, dtype=object)
    out["width"] = np.array(widths, dtype=np.int64)
    out["height"] = np.array(heights, dtype=np.int64)
    out["meta"] = np.array(metas, dtype=object)
    out["error"] = errors_out(errors)
    return out


def decode_one(data: bytes, uri: str, channels: int, max_pixels: int) -> np.ndarray:
    """One file's bytes -> (H, W, C) array, chosen by the file's extension."""
    ext = extension_of(uri)
    if ext in (".dcm", ".dicom", ".nii", ".nii.gz"):
        raise DecodeError(f"{ext} inputs are not decoded by this stage")
    return decode_photo(data, channels, max_pixels)
