"""The CPU stages before the model: read bytes, then decode, row by row.

Both take and return Ray Data batches (dicts of equal-length columns) but do not import Ray:
they are plain functions over numpy columns, tested without a cluster. A failure reading or
decoding one file sets that row's ``error`` and leaves the rest of the batch untouched.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segbatch import io, shards
from segbatch.config import PreprocessConfig
from segbatch.decode import check_model_input, decode_photo, resize_for_model
from segbatch.errors import DecodeError, SegbatchError
from segbatch.sources import extension_of

# Kinds of rows after decoding: the actor segments "image" rows from their array; "error" rows
# pass through as error rows.
KIND_IMAGE = "image"
KIND_ERROR = "error"
# "scene": a GeoTIFF too large to decode whole, segmented by windows inside the actor;
# "volume": a NIfTI volume or multi-frame DICOM, segmented slice by slice inside the actor.
KIND_SCENE = "scene"
KIND_VOLUME = "volume"

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
    image_column: str = "image",
    path_column: str = "path",
) -> Batch:
    """Add ``data`` (file bytes; empty on error) and ``retries`` (int64: transient storage errors
    retried while reading the row) to a batch of ``uri``/``error`` rows.

    A ``uri`` of the form ``shard_uri#member`` is a member of a tar or Parquet shard: a tar
    member is one range read; the rows of one Parquet shard are read together, each row group
    once. Optional ``offset``/``size`` columns (-1 when unknown) give a member's location as
    listed on the driver; without them the shard's index is looked up (and cached per process).
    Reads run in a few threads: object stores are latency-bound, not CPU-bound.
    """
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    errors = errors_in(batch["error"])
    offsets = _int_column(batch, "offset", n)
    sizes = _int_column(batch, "size", n)
    counters = [io.RetryCounter() for _ in range(n)]
    data: list[bytes] = [b""] * n
    parquet_rows: dict[str, list[int]] = {}
    singles: list[int] = []
    for i, uri in enumerate(uris):
        if errors[i] is not None:
            continue
        split = shards.split_member(uri)
        if split is not None and shards.is_parquet(split[0]):
            parquet_rows.setdefault(split[0], []).append(i)
        elif split is not None or not reads_itself(uri):
            singles.append(i)

    def read_one(i: int) -> None:
        try:
            split = shards.split_member(uris[i])
            if split is None:
                data[i] = io.read_bytes(uris[i], storage_options, retries, counter=counters[i])
                return
            shard_uri, name = split
            offset, size = offsets[i], sizes[i]
            if offset < 0 or size < 0:
                member = _find_member(shard_uri, name, path_column, storage_options)
                offset, size = member.offset, member.size or 0
            data[i] = shards.read_tar_member(
                shard_uri, offset, size, storage_options, retries, counters[i]
            )
        except Exception as exc:
            errors[i] = error_message(exc)

    def read_shard(shard_uri: str) -> None:
        rows = parquet_rows[shard_uri]
        try:
            wanted: dict[int, int] = {}
            for i in rows:
                if offsets[i] >= 0:
                    wanted[i] = offsets[i]
                    continue
                name = uris[i][len(shard_uri) + 1 :]
                try:
                    wanted[i] = _find_member(shard_uri, name, path_column, storage_options).offset
                except FileNotFoundError as exc:
                    errors[i] = error_message(exc)
            if not wanted:
                return
            counter = io.RetryCounter()
            got = shards.read_parquet_rows(
                shard_uri, list(wanted.values()), image_column, storage_options, retries, counter
            )
            for i, row in wanted.items():
                data[i] = got[row]
            # A retried shard read is one storage call: it is counted once, on its first row.
            counters[rows[0]].count += counter.count
        except Exception as exc:
            for i in rows:
                errors[i] = errors[i] or error_message(exc)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, n))) as pool:
        jobs = [pool.submit(read_one, i) for i in singles]
        jobs += [pool.submit(read_shard, s) for s in parquet_rows]
        for job in jobs:
            job.result()
    out = dict(batch)
    out["data"] = np.array([*data, b""], dtype=object)[:-1]  # keeps bytes objects intact
    out["error"] = errors_out(errors)
    out["retries"] = np.array([c.count for c in counters], dtype=np.int64)
    return out


def _int_column(batch: Batch, name: str, n: int) -> list[int]:
    """An optional int column as a list; -1 (unknown) when absent or null."""
    if name not in batch:
        return [-1] * n
    return [int(v) if v is not None and v == v else -1 for v in batch[name]]


def _find_member(
    shard_uri: str, name: str, path_column: str, storage_options: Mapping[str, Any] | None
) -> shards.Member:
    try:
        return shards.SHARD_INDEX.lookup(shard_uri, name, path_column, storage_options)
    except KeyError as exc:
        raise FileNotFoundError(exc.args[0]) from None


def reads_itself(uri: str) -> bool:
    """Inputs whose bytes are not read up front: GeoTIFFs (read by windows with rasterio, where
    installed) and NIfTI volumes (read whole by the actor, which writes one mask per volume)."""
    if shards.split_member(uri) is not None:
        return False
    ext = extension_of(uri)
    if ext in (".nii", ".nii.gz"):
        return True
    return ext in (".tif", ".tiff") and importlib.util.find_spec("rasterio") is not None


@dataclass
class Decoded:
    """One decoded input: what the actor needs, per kind."""

    kind: str
    image: np.ndarray  # (h, w, C), possibly resized for the model; (0, 0, C) otherwise
    height: int = -1  # the original size: the mask's
    width: int = -1
    valid: np.ndarray | None = None  # (height, width) bool, False at nodata
    meta: dict[str, Any] = field(default_factory=dict)


def decode_batch(
    batch: Batch,
    channels: int = 3,
    max_pixels: int = 89_478_485,
    resize: str | int | tuple[int, int] = "none",
    pre: PreprocessConfig | None = None,
    stream_above_px: int = 4096 * 4096,
    storage_options: Mapping[str, Any] | None = None,
) -> Batch:
    """Replace ``data`` by ``image``, ``valid``, ``kind``, ``width``, ``height``, ``meta``.

    ``image``: (h, w, C) arrays (as bytes, ``image_shape``, ``image_dtype``: read them with
    ``image_at``), uint8 images resized for the model here, on the CPU, as
    torchvision's preset does on a PIL image (so batches travel at the model's size);
    ``width``/``height`` stay the original size. ``valid``: (H, W) bool, False at nodata, or
    (0, 0). Large GeoTIFFs and volumes become ``scene``/``volume`` rows the actor reads itself.
    Rows that fail get an empty image and their error message, among them images whose size
    for the model is over ``max_pixels`` (decode.check_model_input).
    """
    pre = pre or PreprocessConfig()
    n = len(batch["uri"])
    empty_image = np.zeros((0, 0, channels), dtype=np.uint8)
    decoded: list[Decoded] = []
    errors = errors_in(batch["error"])
    for i in range(n):
        item = Decoded(KIND_ERROR, empty_image)
        if errors[i] is None:
            try:
                item = decode_one(
                    batch["data"][i],
                    str(batch["uri"][i]),
                    channels,
                    max_pixels,
                    pre,
                    stream_above_px,
                    storage_options,
                )
                if item.kind == KIND_IMAGE:
                    # The size the model will see, checked before anything is made at it.
                    check_model_input(item.height, item.width, resize, max_pixels)
                    item.image = resize_for_model(item.image, resize)
            except Exception as exc:
                errors[i] = error_message(exc)
                item = Decoded(KIND_ERROR, empty_image)
        decoded.append(item)
    out = {k: v for k, v in batch.items() if k != "data"}
    no_valid = np.zeros((0, 0), dtype=bool)
    # Images travel as raw bytes plus shape and dtype: as arrays, Ray Data types the column per
    # block (uint8 photos, float32 DICOM, the uint8 placeholders of error rows) and cannot
    # concatenate two blocks whose types differ, which crashed the whole job.
    out["image"] = np.array([*(d.image.tobytes() for d in decoded), b""], dtype=object)[:-1]
    out["image_shape"] = np.array([d.image.shape for d in decoded], dtype=np.int64).reshape(n, 3)
    out["image_dtype"] = np.array([d.image.dtype.str for d in decoded], dtype=object)
    out["valid"] = [d.valid if d.valid is not None else no_valid for d in decoded]
    out["kind"] = np.array([d.kind for d in decoded], dtype=object)
    out["width"] = np.array([d.width for d in decoded], dtype=np.int64)
    out["height"] = np.array([d.height for d in decoded], dtype=np.int64)
    out["meta"] = np.array([json.dumps(d.meta) for d in decoded], dtype=object)
    out["error"] = errors_out(errors)
    return out


def image_at(batch: Batch, i: int) -> np.ndarray:
    """Row ``i``'s ``(h, w, C)`` image from a decoded batch (read-only, no copy)."""
    shape = tuple(int(v) for v in batch["image_shape"][i])
    dtype = np.dtype(str(batch["image_dtype"][i]))
    return np.frombuffer(batch["image"][i], dtype=dtype).reshape(shape)


def check_channels(bands: int, channels: int, what: str) -> None:
    """An input of ``bands`` bands can feed a ``channels``-channel model: the same count, or one
    band repeated for a 3-channel model (as grey photos are)."""
    if bands != channels and not (bands == 1 and channels == 3):
        raise DecodeError(
            f"{what} has {bands} bands but the model takes {channels} channels; choose "
            "bands with preprocess.bands (1-based) or set model.in_channels"
        )


def fit_channels(image: np.ndarray, channels: int, what: str = "this image") -> np.ndarray:
    """(H, W, C) -> (H, W, channels), or a DecodeError when they cannot fit (check_channels)."""
    check_channels(image.shape[2], channels, what)
    return np.repeat(image, 3, axis=2) if image.shape[2] != channels else image


def decode_one(
    data: bytes,
    uri: str,
    channels: int,
    max_pixels: int,
    pre: PreprocessConfig | None = None,
    stream_above_px: int = 4096 * 4096,
    storage_options: Mapping[str, Any] | None = None,
) -> Decoded:
    """One input -> a Decoded row, chosen by the file's extension."""
    pre = pre or PreprocessConfig()
    ext = extension_of(uri)
    if ext in (".nii", ".nii.gz"):
        return Decoded(KIND_VOLUME, np.zeros((0, 0, channels), dtype=np.uint8))
    if ext in (".dcm", ".dicom"):
        return _decode_dicom(data, channels, pre)
    if ext in (".tif", ".tiff") and reads_itself(uri):
        return _decode_raster(uri, channels, max_pixels, pre, stream_above_px, storage_options)
    image = decode_photo(data, channels, max_pixels)
    return Decoded(KIND_IMAGE, image, int(image.shape[0]), int(image.shape[1]))


def _decode_dicom(data: bytes, channels: int, pre: PreprocessConfig) -> Decoded:
    from segbatch.medical import apply_window, read_dicom, resolve_window

    if not data:
        raise DecodeError("file is empty (0 bytes)")
    dicom = read_dicom(data)
    meta: dict[str, Any] = {"dicom": {"ids": dicom.ids, "spacing_mm": dicom.pixel_spacing_mm}}
    frames, height, width = dicom.frames.shape
    if frames > 1:
        # Multi-frame: the actor reads the file again and writes one mask per frame.
        return Decoded(KIND_VOLUME, np.zeros((0, 0, channels), np.uint8), height, width, meta=meta)
    window = resolve_window(pre.window)
    image = apply_window(dicom.frames[0], window, invert=dicom.monochrome1)[:, :, None]
    image = fit_channels(image, channels, "this DICOM image")
    return Decoded(KIND_IMAGE, image, height, width, meta=meta)


def _decode_raster(
    uri: str,
    channels: int,
    max_pixels: int,
    pre: PreprocessConfig,
    stream_above_px: int,
    storage_options: Mapping[str, Any] | None,
) -> Decoded:
    from segbatch.geo import RasterScene, geo_info_to_dict

    with RasterScene(uri, pre, dict(storage_options or {})) as scene:
        meta = {"geo": geo_info_to_dict(scene.geo)}
        check_channels(scene.count, channels, "this raster")
        if scene.height * scene.width > stream_above_px:
            empty = np.zeros((0, 0, channels), dtype=np.uint8)
            return Decoded(KIND_SCENE, empty, scene.height, scene.width, meta=meta)
        image, valid = scene.read_all()
    image = fit_channels(image, channels, "this raster")
    return Decoded(KIND_IMAGE, image, image.shape[0], image.shape[1], valid, meta)
