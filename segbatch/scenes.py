"""Inputs the actor segments straight from their URI, writing the mask as it is produced.

- Raster scenes (GeoTIFFs above ``tiling.stream_above_px``): read window by window, tiles blended
  column segment by column segment (``tiling.segment_scene``), finished mask rows written to a
  tiled GeoTIFF at once. Memory does not grow with the scene.
- Volumes (NIfTI, multi-frame DICOM): every slice is a model input; slices of one volume batch
  together; the mask goes back in the input's space (a NIfTI label volume with the input's
  affine, or one PNG per DICOM frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from segbatch import io, sinks
from segbatch.config import JobConfig
from segbatch.decode import check_model_input
from segbatch.loader import fit_channels
from segbatch.models import ModelInfo
from segbatch.overlays import palette
from segbatch.predictor import Predictor, mask_dtype
from segbatch.stats import pixel_counts
from segbatch.tiling import segment_scene


@dataclass
class SceneResult:
    """What one scene or volume adds to its result row."""

    mask_uri: str
    height: int
    width: int
    counts: np.ndarray  # (K,) int64, nodata excluded
    nodata_px: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    mask: np.ndarray | None = None  # the label array when it is small enough to keep (volumes)


def mask_palette(num_classes: int) -> list[tuple[int, int, int]] | None:
    """The colour table of a uint8 GeoTIFF mask (256 entries, 255 = nodata); none above 256."""
    return palette(num_classes)[:256] if num_classes <= 256 else None


def segment_raster(
    predictor: Predictor, uri: str, rel_path: str, job: JobConfig, info: ModelInfo
) -> SceneResult:
    """Segment a large GeoTIFF by windows into ``OUT/masks/<rel>.tif`` (tiled, same CRS)."""
    from segbatch.geo import GeoTiffMaskWriter, RasterScene, geo_info_to_dict

    options = dict(job.storage.options)
    dtype = mask_dtype(info.num_classes)
    nodata_value = job.output.nodata_value
    k = info.num_classes
    counts = np.zeros(k, dtype=np.int64)
    nodata_px = 0
    with RasterScene(uri, job.preprocess, options) as scene:
        mask_uri = sinks.mask_uri(job.output.path, rel_path, ".tif")
        meta = {"geo": geo_info_to_dict(scene.geo)}

        def read_tiles(windows: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
            tiles = [fit_channels(scene.read_window(*w)[0], info.in_channels) for w in windows]
            return predictor.prepare(np.stack(tiles))

        with GeoTiffMaskWriter(
            mask_uri,
            scene.height,
            scene.width,
            scene.geo,
            dtype.name,
            nodata_value,
            mask_palette(k),
            options,
        ) as writer:

            def write_block(y0: int, x0: int, block: np.ndarray) -> None:
                nonlocal nodata_px
                _, valid = scene.read_window(y0, x0, block.shape[0], block.shape[1])
                out = block.astype(dtype)
                out[~valid] = nodata_value
                counts[:] += pixel_counts(out, k, nodata_value)
                nodata_px += int((~valid).sum())
                writer.write_block(y0, x0, out)

            with torch.inference_mode():
                segment_scene(
                    scene.height,
                    scene.width,
                    read_tiles,
                    predictor.forward,
                    write_block,
                    job.tiling,
                    job.tiling.segment_width_px,
                )
        return SceneResult(mask_uri, scene.height, scene.width, counts, nodata_px, meta)


def _volume_window(values: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    """The configured window, or one spanning the volume's own range (one scaling per volume,
    not per slice, so a slice keeps its brightness relative to the others)."""
    if window is not None:
        return window
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    width = hi - lo if hi > lo else 1.0
    return (lo + width / 2.0, width)


def _check_slices(images: Sequence[np.ndarray], info: ModelInfo, job: JobConfig) -> None:
    """Every slice's size for the model within input.max_image_pixels, as for a photo."""
    for height, width in {im.shape[:2] for im in images}:
        check_model_input(height, width, info.resize, job.input.max_image_pixels)


def segment_volume(
    predictor: Predictor,
    uri: str,
    rel_path: str,
    job: JobConfig,
    info: ModelInfo,
    batch_size: int,
) -> SceneResult:
    """Segment a NIfTI volume or a multi-frame DICOM slice by slice; masks in the input's space."""
    from segbatch.medical import (
        apply_window,
        assemble_nifti_mask,
        is_nifti,
        nifti_mask_bytes,
        nifti_slices,
        read_dicom,
        read_nifti,
        resolve_window,
        volume_ml,
    )

    options = job.storage.options
    data = io.read_bytes(uri, options, job.storage.retries)
    window = resolve_window(job.preprocess.window)
    masks_root = io.join(job.output.path, sinks.MASKS_DIR)
    k = info.num_classes
    if is_nifti(uri):
        vol = read_nifti(data, uri.rsplit("/", 1)[-1])
        axis, index = job.input.slice_axis, job.input.volume_index
        slices = nifti_slices(vol, axis, index)
        win = _volume_window(vol.data, window)
        images = [
            fit_channels(apply_window(s.image, win)[:, :, None], info.in_channels) for s in slices
        ]
        _check_slices(images, info, job)
        masks = predictor.segment(images, None, batch_size)
        label = assemble_nifti_mask(
            vol,
            [(s.volume, s.slice_index, m) for s, m in zip(slices, masks, strict=True)],
            axis,
            index,
        )
        mask_uri = sinks.mask_uri(job.output.path, rel_path, ".nii.gz")
        io.write_bytes_atomic(mask_uri, nifti_mask_bytes(label, vol), options)
        counts = pixel_counts(label, k)
        meta = {"volume_ml": volume_ml(counts, vol.zooms_mm).tolist()}
        height, width = masks[0].shape if masks else (0, 0)
        return SceneResult(mask_uri, height, width, counts, 0, meta, label)

    dicom = read_dicom(data)
    images = [
        fit_channels(
            apply_window(f, window, invert=dicom.monochrome1)[:, :, None], info.in_channels
        )
        for f in dicom.frames
    ]
    _check_slices(images, info, job)
    masks = predictor.segment(images, None, batch_size)
    folder = sinks.mask_rel_path(rel_path, "")
    counts = np.zeros(k, dtype=np.int64)
    for f, mask in enumerate(masks, start=1):
        sinks.write_mask(job.output.path, f"{folder}/frame_{f:05d}.png", mask, k, options)
        counts += pixel_counts(mask, k)
    height, width = dicom.frames.shape[1:]
    meta = {"dicom": {"ids": dicom.ids, "spacing_mm": dicom.pixel_spacing_mm}}
    return SceneResult(
        io.under_root(masks_root, folder), height, width, counts, 0, meta, np.stack(masks)
    )
