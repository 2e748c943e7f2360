"""GeoTIFF scenes: windows, bands, nodata and stretch in; georeferenced masks and areas out.

rasterio is the optional extra ``segbatch[geo]`` and is imported inside the functions that need it,
so the rest of segbatch works without it.

Reading follows the array conventions of ``docs/architecture.md``: a window comes back as an
``(h, w, C)`` image plus an ``(h, w)`` bool validity mask. ``uint8`` scenes stay ``uint8``; any
other dtype comes back as raw ``float32`` values (the predictor normalizes with mean/std), and a
percentile stretch turns every band into ``float32`` in ``[0, 1]``.

Writing streams blocks into a tiled, deflate-compressed GeoTIFF in a local temporary file, which
is moved (local) or uploaded (fsspec) to its URI only when the writer is closed without error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import uuid
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

import fsspec
import fsspec.implementations.local
import numpy as np

from segbatch import errors
from segbatch.config import PreprocessConfig

GEOTIFF_EXTENSIONS = (".tif", ".tiff")
# Long side of the decimated read that per-scene stretch percentiles are computed on.
STRETCH_SAMPLE_PX = 1024
MASK_DTYPES = ("uint8", "uint16")


# GDAL's block cache defaults to 5% of the machine's memory and fills as a scene is read, so a
# worker's memory would grow with the scene up to that cap. segbatch reads each window about
# once: a small cache loses nothing. A GDAL_CACHEMAX set by the user wins.
GDAL_CACHE_MB = 256


def _rasterio() -> ModuleType:
    """The rasterio module, or the error naming the extra that installs it."""
    os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MB))
    try:
        import rasterio
        import rasterio.enums
        import rasterio.errors
        import rasterio.windows
    except ImportError as exc:
        raise errors.missing_dependency("rasterio", "geo", "reading GeoTIFF") from exc
    return rasterio


def is_geotiff(uri_or_path: str) -> bool:
    """True for a ``.tif`` / ``.tiff`` name (any case), ignoring a URL query or fragment."""
    name = uri_or_path.split("?", 1)[0].split("#", 1)[0]
    return name.lower().endswith(GEOTIFF_EXTENSIONS)


@dataclass(frozen=True)
class GeoInfo:
    """Where a raster lies on the ground; plain values, picklable across Ray tasks."""

    crs: str | None  # "EPSG:xxxx" where the CRS has an EPSG code, else WKT
    transform: tuple[float, ...]  # affine (a, b, c, d, e, f), as rasterio's Affine[:6]
    bounds: tuple[float, float, float, float]  # left, bottom, right, top, in CRS units
    pixel_size: tuple[float, float]  # (x, y), absolute, in CRS units
    units_m: bool  # the CRS is projected with metre units
    georeferenced: bool  # has a CRS or a non-identity transform

    @property
    def pixel_area(self) -> float:
        """Ground area of one pixel in CRS units squared (the transform's determinant)."""
        a, b, _, d, e, _ = self.transform[:6]
        return abs(a * e - b * d)


_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def geo_info_from_dataset(ds: Any) -> GeoInfo:
    """GeoInfo of an open rasterio dataset."""
    crs = ds.crs
    transform = tuple(float(v) for v in tuple(ds.transform)[:6])
    a, b, _, d, e, _ = transform
    units_m = False
    if crs is not None and crs.is_projected:
        with contextlib.suppress(Exception):  # a CRS without linear units is simply not metric
            units_m = math.isclose(float(crs.linear_units_factor[1]), 1.0)
    left, bottom, right, top = ds.bounds
    return GeoInfo(
        crs=crs.to_string() if crs is not None else None,
        transform=transform,
        bounds=(float(left), float(bottom), float(right), float(top)),
        pixel_size=(math.hypot(a, d), math.hypot(b, e)),
        units_m=units_m,
        georeferenced=crs is not None or transform != _IDENTITY,
    )


def geo_columns(geo: GeoInfo) -> dict[str, object]:
    """Parquet values for one scene: ``crs`` (str | None) and the float bounds and pixel size.

    A scene without georeference gets ``None`` everywhere: pixel coordinates are not places.
    """
    if not geo.georeferenced:
        return {
            "crs": None,
            "bounds_left": None,
            "bounds_bottom": None,
            "bounds_right": None,
            "bounds_top": None,
            "pixel_size_x": None,
            "pixel_size_y": None,
        }
    left, bottom, right, top = geo.bounds
    return {
        "crs": geo.crs,
        "bounds_left": float(left),
        "bounds_bottom": float(bottom),
        "bounds_right": float(right),
        "bounds_top": float(top),
        "pixel_size_x": float(geo.pixel_size[0]),
        "pixel_size_y": float(geo.pixel_size[1]),
    }


def class_areas_m2(counts: np.ndarray, geo: GeoInfo) -> np.ndarray | None:
    """Per-class pixel counts ``(K,)`` -> ``(K,)`` float64 areas in m², or None without metres."""
    if not (geo.georeferenced and geo.units_m):
        return None
    return np.asarray(counts, dtype=np.float64) * geo.pixel_area


def _split_uri(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str, bool]:
    """(filesystem, path in it, is_local) for a local path or an fsspec URI."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    return fs, path, local


def _invalid_where(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """``(C, h, w)`` bands -> ``(h, w)`` bool, True where every band equals ``nodata``."""
    if nodata is None:
        return np.zeros(data.shape[1:], dtype=bool)
    if math.isnan(nodata):
        return np.isnan(data).all(axis=0)
    return (data == nodata).all(axis=0)


class RasterScene:
    """One GeoTIFF (or any raster GDAL reads), opened once and read window by window.

    Attributes: ``height``, ``width``; ``count`` (bands after selection); ``dtype`` (the file's
    dtype of the selected bands, e.g. ``"uint16"``); ``out_dtype`` (what reads return: ``"uint8"``
    or ``"float32"``); ``geo``; ``nodata`` (the value that marks invalid pixels, from
    ``pre.nodata`` or else the file; None when the file has none).

    A remote URI is read through fsspec into memory whole (rasterio's file-object path), so very
    large remote scenes cost their file size in RAM; local paths are read window by window.
    """

    def __init__(
        self,
        uri: str,
        pre: PreprocessConfig,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        rasterio = _rasterio()
        self.uri = uri
        self._pre = pre
        fs, path, local = _split_uri(uri, storage_options)
        try:
            if local:
                self._ds = rasterio.open(path)
            else:
                with fs.open(path, "rb") as fh:
                    self._ds = rasterio.open(fh)
        except (rasterio.errors.RasterioIOError, OSError) as exc:
            raise errors.DecodeError(f"cannot read {uri!r} as a raster: {exc}") from exc
        try:
            self._setup(pre)
        except BaseException:
            self._ds.close()
            raise

    def _setup(self, pre: PreprocessConfig) -> None:
        rasterio = _rasterio()
        ds = self._ds
        ColorInterp = rasterio.enums.ColorInterp
        MaskFlags = rasterio.enums.MaskFlags
        if pre.bands is None:
            # An alpha band is a mask, not a channel for the model.
            indexes = [
                i
                for i, ci in zip(ds.indexes, ds.colorinterp, strict=True)
                if ci != ColorInterp.alpha
            ] or list(ds.indexes)
        else:
            for band in pre.bands:
                if not 1 <= band <= ds.count:
                    raise errors.DecodeError(
                        f"preprocess.bands asks for band {band}, but {self.uri!r} has {ds.count} "
                        f"band{'s' if ds.count != 1 else ''} (1..{ds.count})"
                    )
            indexes = list(pre.bands)
        self._indexes = indexes
        self.height: int = int(ds.height)
        self.width: int = int(ds.width)
        self.count: int = len(indexes)
        self.dtype: str = str(ds.dtypes[indexes[0] - 1])
        self.geo: GeoInfo = geo_info_from_dataset(ds)
        file_nodata = ds.nodatavals[indexes[0] - 1]
        self.nodata: float | None = (
            float(pre.nodata)
            if pre.nodata is not None
            else (float(file_nodata) if file_nodata is not None else None)
        )
        # Without a nodata value, an internal mask or alpha band says which pixels are valid.
        self._use_dataset_mask = self.nodata is None and any(
            MaskFlags.per_dataset in flags or MaskFlags.alpha in flags
            for flags in ds.mask_flag_enums
        )
        self._stretch: tuple[np.ndarray, np.ndarray] | None = None
        if pre.stretch == "percentile":
            self.out_dtype = "float32"
            self._stretch = self._stretch_limits(pre.stretch_percentiles)
        else:
            self.out_dtype = "uint8" if self.dtype == "uint8" else "float32"

    def _stretch_limits(self, percentiles: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """Per-band ``(C,)`` float64 low and high values from a decimated read of valid pixels."""
        rasterio = _rasterio()
        p_lo, p_hi = percentiles
        if not 0 <= p_lo < p_hi <= 100:
            raise errors.ConfigError(
                f"preprocess.stretch_percentiles {percentiles!r}: need 0 <= low < high <= 100"
            )
        scale = min(1.0, STRETCH_SAMPLE_PX / max(self.height, self.width))
        out_h = max(1, round(self.height * scale))
        out_w = max(1, round(self.width * scale))
        # Nearest keeps nodata values intact, so the validity rule below still applies.
        nearest = rasterio.enums.Resampling.nearest
        data = self._ds.read(
            self._indexes, out_shape=(self.count, out_h, out_w), resampling=nearest
        )
        mask = None
        if self._use_dataset_mask:
            mask = self._ds.dataset_mask(out_shape=(out_h, out_w), resampling=nearest)
        valid = self._validity(data, mask)
        lows = np.zeros(self.count)
        highs = np.ones(self.count)
        for c in range(self.count):
            values = data[c][valid]
            values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
            if values.size:
                lows[c], highs[c] = np.percentile(values.astype(np.float64), (p_lo, p_hi))
        return lows, highs

    def _validity(self, data: np.ndarray, dataset_mask: np.ndarray | None) -> np.ndarray:
        """``(C, h, w)`` bands (+ optional ``(h, w)`` GDAL mask) -> ``(h, w)`` bool validity."""
        valid = ~_invalid_where(data, self.nodata)
        if dataset_mask is not None:
            valid &= dataset_mask > 0
        return valid

    def read_window(self, y0: int, x0: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``y0:y0+h``, columns ``x0:x0+w`` -> ``(h, w, C)`` image and ``(h, w)`` bool valid.

        The image is ``uint8`` for a ``uint8`` scene without stretch, else ``float32`` (raw values,
        or ``[0, 1]`` after a percentile stretch). Parts of the window outside the raster come
        back as 0 and invalid, so edge tiles keep their full size.
        """
        if h <= 0 or w <= 0:
            raise ValueError(f"window size must be positive, got h={h}, w={w}")
        rasterio = _rasterio()
        ry0, rx0 = max(0, y0), max(0, x0)
        ry1, rx1 = min(self.height, y0 + h), min(self.width, x0 + w)
        out_dtype = np.dtype(self.out_dtype)
        image = np.zeros((h, w, self.count), dtype=out_dtype)
        valid = np.zeros((h, w), dtype=bool)
        if ry0 >= ry1 or rx0 >= rx1:
            return image, valid
        window = rasterio.windows.Window(rx0, ry0, rx1 - rx0, ry1 - ry0)
        data = self._ds.read(self._indexes, window=window)  # (C, h', w')
        mask = self._ds.dataset_mask(window=window) if self._use_dataset_mask else None
        part_valid = self._validity(data, mask)
        if self._stretch is not None:
            lows, highs = self._stretch
            spans = np.where(highs > lows, highs - lows, 1.0)
            offset = lows.astype(np.float32)[:, None, None]
            span = spans.astype(np.float32)[:, None, None]
            stretched = (data.astype(np.float32) - offset) / span
            part = np.nan_to_num(np.clip(stretched, 0.0, 1.0), nan=0.0)
        else:
            part = data
        sy, sx = ry0 - y0, rx0 - x0
        image[sy : sy + (ry1 - ry0), sx : sx + (rx1 - rx0)] = np.moveaxis(part, 0, -1)
        valid[sy : sy + (ry1 - ry0), sx : sx + (rx1 - rx0)] = part_valid
        return image, valid

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole raster: ``(H, W, C)`` image and ``(H, W)`` bool valid, as ``read_window``."""
        return self.read_window(0, 0, self.height, self.width)

    def close(self) -> None:
        self._ds.close()

    def __enter__(self) -> RasterScene:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class GeoTiffMaskWriter:
    """A single-band class mask written block by block to a georeferenced GeoTIFF.

    The file is tiled (256 or 512 px blocks), deflate-compressed, carries the scene's CRS and
    transform, ``nodata_value`` as nodata and, given a palette, a colormap. Blocks go to a local
    temporary file as they come; ``close`` moves it into place (``os.replace``) or uploads it
    (``fs.put``), so a reader never sees a half-written mask. ``abort`` (or leaving the ``with``
    block on an exception) removes the temporary file.
    """

    def __init__(
        self,
        uri: str,
        height: int,
        width: int,
        geo: GeoInfo,
        dtype: str,
        nodata_value: int,
        palette: list[tuple[int, int, int]] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        rasterio = _rasterio()
        if dtype not in MASK_DTYPES:
            raise ValueError(f"mask dtype {dtype!r}; use one of {', '.join(MASK_DTYPES)}")
        limit = np.iinfo(dtype).max
        if not 0 <= nodata_value <= limit:
            raise ValueError(f"nodata_value {nodata_value} does not fit a {dtype} mask")
        if palette is not None and len(palette) > limit + 1:
            raise ValueError(f"a palette of {len(palette)} colours does not fit a {dtype} mask")
        self.uri = uri
        self.height, self.width = int(height), int(width)
        self.dtype = dtype
        self._fs, self._path, self._local = _split_uri(uri, storage_options)
        if self._local:
            parent = os.path.dirname(self._path) or "."
            os.makedirs(parent, exist_ok=True)
            # Same directory as the target, so os.replace is an atomic rename.
            name = f".{os.path.basename(self._path)}.{uuid.uuid4().hex}.tmp"
            self._tmp_path = os.path.join(parent, name)
        else:
            fd, self._tmp_path = tempfile.mkstemp(prefix="segbatch-mask-", suffix=".tif")
            os.close(fd)
        block_px = 512 if min(self.height, self.width) >= 512 else 256
        profile: dict[str, Any] = {
            "driver": "GTiff",
            "height": self.height,
            "width": self.width,
            "count": 1,
            "dtype": dtype,
            "nodata": nodata_value,
            "tiled": True,
            "blockxsize": block_px,
            "blockysize": block_px,
            "compress": "deflate",
            "BIGTIFF": "IF_SAFER",
        }
        if geo.georeferenced:
            profile["crs"] = geo.crs
            profile["transform"] = rasterio.Affine(*geo.transform[:6])
        self._done = False
        try:
            self._ds = rasterio.open(self._tmp_path, "w", **profile)
            if palette is not None:
                colormap = {i: (*map(int, rgb), 255) for i, rgb in enumerate(palette)}
                self._ds.write_colormap(1, colormap)
        except BaseException:
            self._remove_tmp()
            raise

    def write_block(self, y0: int, x0: int, block: np.ndarray) -> None:
        """Write an ``(h, w)`` integer block of class indices at row ``y0``, column ``x0``."""
        if self._done:
            raise ValueError(f"mask writer for {self.uri!r} is already closed")
        block = np.asarray(block)
        if block.ndim != 2:
            raise ValueError(f"a mask block is (h, w), got shape {block.shape}")
        h, w = block.shape
        if y0 < 0 or x0 < 0 or y0 + h > self.height or x0 + w > self.width:
            raise ValueError(
                f"block {h}x{w} at (y={y0}, x={x0}) falls outside the "
                f"{self.height}x{self.width} mask"
            )
        window = _rasterio().windows.Window(x0, y0, w, h)
        self._ds.write(block.astype(self.dtype, copy=False), 1, window=window)

    def close(self) -> None:
        """Finish the file and move or upload it to ``uri``."""
        if self._done:
            return
        self._done = True
        try:
            self._ds.close()
            if self._local:
                os.replace(self._tmp_path, self._path)
            else:
                self._fs.put(self._tmp_path, self._path)
        finally:
            self._remove_tmp()

    def abort(self) -> None:
        """Drop the half-written mask; ``uri`` is left untouched."""
        if self._done:
            return
        self._done = True
        try:
            self._ds.close()
        finally:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp_path)

    def __enter__(self) -> GeoTiffMaskWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def geo_info_to_dict(geo: GeoInfo) -> dict[str, Any]:
    """A GeoInfo as JSON-able data, to travel in a row's ``meta``; see geo_info_from_dict."""
    return dataclasses.asdict(geo)


def geo_info_from_dict(data: dict[str, Any]) -> GeoInfo:
    """The inverse of ``geo_info_to_dict``, after a trip through JSON."""
    return GeoInfo(
        crs=data["crs"],
        transform=tuple(float(v) for v in data["transform"]),
        bounds=tuple(float(v) for v in data["bounds"]),  # type: ignore[arg-type]
        pixel_size=tuple(float(v) for v in data["pixel_size"]),  # type: ignore[arg-type]
        units_m=bool(data["units_m"]),
        georeferenced=bool(data["georeferenced"]),
    )
