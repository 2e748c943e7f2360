"""DICOM and NIfTI: reading modality values, intensity windows, and NIfTI label volumes.

Both formats are the optional extra ``segbatch[medical]``: pydicom and nibabel are imported only
when a medical file is read, and their absence names the extra to install.

Array conventions here:
- DICOM frames are ``(F, H, W) float32`` modality values (CT: Hounsfield units), one frame for a
  single-frame file. Colour DICOM (SamplesPerPixel > 1) is refused: the models segbatch runs on
  medical images take intensities, and a silent RGB -> grey conversion would hide that.
- NIfTI volumes stay in storage order, ``(X, Y, Z)`` or ``(X, Y, Z, T)``. Slices are taken with
  :func:`numpy.take` along one spatial axis and are not reoriented for display, so a mask slice
  goes back into the volume by the same index with no transposition (:func:`assemble_nifti_mask`).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, NamedTuple

import numpy as np

from segbatch import errors
from segbatch.errors import ConfigError, DecodeError

# (center, width) in Hounsfield units; the usual radiology display windows.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "ct_lung": (-600.0, 1500.0),
    "ct_soft_tissue": (40.0, 400.0),
    "ct_bone": (400.0, 1800.0),
    "ct_brain": (40.0, 80.0),
    "ct_liver": (60.0, 160.0),
    "ct_mediastinum": (50.0, 350.0),
}

DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")

# The DICOM attributes a result may carry: identifiers that let a row be joined back to the
# archive. Nothing that names or describes the patient ever leaves read_dicom.
DICOM_ID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber")

# pip packages that decode each compressed transfer syntax (pydicom's own plugins); python-gdcm
# is the alternative for all but HTJ2K.
_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg"
_OPENJPEG = "pylibjpeg pylibjpeg-openjpeg"
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _LIBJPEG,  # JPEG baseline
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG extended
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": _LIBJPEG,  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": _LIBJPEG,  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": _OPENJPEG,  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": _OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _OPENJPEG,  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": _OPENJPEG,  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": _OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless
}
_ANY_DECODER = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"

# NIfTI header fields that place the voxels in space; copied verbatim into label volumes so the
# mask overlays its image exactly (the quaternion is not re-derived from the affine, which
# would round).
_NIFTI_GEOMETRY_FIELDS = (
    "pixdim",
    "xyzt_units",
    "dim_info",
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
)
_NIFTI_INTENT_LABEL = 1002  # NIFTI_INTENT_LABEL: voxel values are label indices


def _import_pydicom() -> ModuleType:
    try:
        import pydicom
    except ImportError as exc:
        raise errors.missing_dependency("pydicom", "medical", "reading DICOM") from exc
    return pydicom


def _import_nibabel() -> ModuleType:
    try:
        import nibabel
    except ImportError as exc:
        raise errors.missing_dependency("nibabel", "medical", "reading NIfTI") from exc
    return nibabel


def _path_part(uri: str) -> str:
    # Query strings and fragments (signed URLs) are not part of the file name.
    return uri.split("?", 1)[0].split("#", 1)[0].lower()


def is_dicom(uri: str) -> bool:
    """True for a ``.dcm`` / ``.dicom`` file name (case-insensitive)."""
    return _path_part(uri).endswith(DICOM_EXTENSIONS)


def is_nifti(uri: str) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` file name (case-insensitive)."""
    return _path_part(uri).endswith(NIFTI_EXTENSIONS)


# --- windows -------------------------------------------------------------------------------------


def resolve_window(window: str | Mapping[str, float] | None) -> tuple[float, float] | None:
    """``preprocess.window`` as ``(center, width)``; None (or "none") means min-max scaling.

    Accepts a preset name from :data:`WINDOW_PRESETS` or a mapping ``{center: c, width: w}``.
    Raises :class:`ConfigError` for an unknown preset, other keys, or ``width <= 0``.
    """
    if window is None:
        return None
    if isinstance(window, str):
        name = window.strip().lower()
        if name == "none":  # `--set preprocess.window=none` arrives as the string
            return None
        if name not in WINDOW_PRESETS:
            raise ConfigError(
                f"preprocess.window: unknown preset {window!r}"
                f"{errors.closest(name, WINDOW_PRESETS)}; known: {', '.join(WINDOW_PRESETS)}, "
                "or {center: C, width: W}"
            )
        return WINDOW_PRESETS[name]
    if isinstance(window, Mapping):
        keys = set(window)
        if keys != {"center", "width"}:
            raise ConfigError(
                f"preprocess.window: expected exactly the keys center and width, got "
                f"{sorted(map(str, keys))}"
            )
        center, width = window["center"], window["width"]
        for key, value in (("center", center), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"preprocess.window.{key}: expected a number, got {value!r}")
        if not width > 0:
            raise ConfigError(f"preprocess.window.width must be above 0, got {width!r}")
        return float(center), float(width)
    raise ConfigError(
        f"preprocess.window: expected a preset name or {{center, width}}, got {window!r}"
    )


def apply_window(
    values: np.ndarray, window: tuple[float, float] | None, invert: bool = False
) -> np.ndarray:
    """Intensities of any shape -> the same shape as float32 in [0, 1].

    With ``(center, width)``: ``clip((v - (center - width/2)) / width, 0, 1)``. With None: min-max
    scaling over the whole array given (pass one slice for per-slice scaling); a constant array
    gives zeros. Non-finite values are ignored for the min-max and NaN maps to 0.
    ``invert`` flips the result (``1 - x``), for DICOM MONOCHROME1 where low values are bright;
    it is applied after the window, as the DICOM display pipeline does.
    """
    v = np.asarray(values, dtype=np.float32)
    if window is not None:
        center, width = window
        lower = np.float32(center - width / 2.0)
        out = (v - lower) / np.float32(width)
    else:
        finite = np.isfinite(v)
        if not finite.any():
            out = np.zeros(v.shape, dtype=np.float32)
        else:
            lo, hi = v[finite].min(), v[finite].max()
            # A constant image has no contrast to stretch: zeros, not a division by zero.
            out = (v - lo) / (hi - lo) if hi > lo else np.zeros(v.shape, dtype=np.float32)
    out = np.nan_to_num(np.clip(out, 0.0, 1.0), nan=0.0).astype(np.float32, copy=False)
    if invert:
        out = np.float32(1.0) - out
    return out


# --- DICOM ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomFrames:
    """The pixels of one DICOM file and the few attributes segbatch keeps.

    ``frames``: ``(F, H, W) float32`` modality values (Rescale Slope/Intercept applied), not
    inverted. ``monochrome1``: the file's PhotometricInterpretation is MONOCHROME1 (low values
    display bright); pass it as ``apply_window(..., invert=frames.monochrome1)``.
    """

    frames: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None
    ids: dict[str, str | int | None]
    monochrome1: bool = False


def _first_item(ds: Any, *keywords: str) -> Any:
    """``ds.K1[0].K2[0]...`` or None when any sequence is missing or empty."""
    node = ds
    for keyword in keywords:
        seq = node.get(keyword) if node is not None else None
        if not seq:
            return None
        node = seq[0]
    return node


def _spacing(value: Any) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """(row, col) spacing in mm: PixelSpacing, else ImagerPixelSpacing (projection radiography),
    else the shared functional groups of an enhanced multi-frame object."""
    for value in (ds.get("PixelSpacing"), ds.get("ImagerPixelSpacing")):
        if value is not None:
            return _spacing(value)
    measures = _first_item(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
    if measures is not None and measures.get("PixelSpacing") is not None:
        return _spacing(measures.PixelSpacing)
    return None


def _rescale(ds: Any, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame ``(F,) float64`` slopes and intercepts.

    Classic objects carry RescaleSlope/Intercept at the top level; enhanced multi-frame objects
    (enhanced CT/MR) carry them in the shared or per-frame functional groups instead.
    """
    # `or`: an element that is present but empty means the default, not zero.
    slope = np.ones(n_frames)
    intercept = np.zeros(n_frames)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope[:] = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept[:] = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        return slope, intercept
    shared = _first_item(ds, "SharedFunctionalGroupsSequence", "PixelValueTransformationSequence")
    if shared is not None:
        slope[:] = float(shared.get("RescaleSlope", 1.0) or 1.0)
        intercept[:] = float(shared.get("RescaleIntercept", 0.0) or 0.0)
        return slope, intercept
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for i, group in enumerate(list(per_frame)[:n_frames]):
        item = _first_item(group, "PixelValueTransformationSequence")
        if item is not None:
            slope[i] = float(item.get("RescaleSlope", 1.0) or 1.0)
            intercept[i] = float(item.get("RescaleIntercept", 0.0) or 0.0)
    return slope, intercept


def _dicom_ids(ds: Any) -> dict[str, str | int | None]:
    ids: dict[str, str | int | None] = {}
    for keyword in DICOM_ID_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            ids[keyword] = None
        elif keyword == "InstanceNumber":
            try:
                ids[keyword] = int(value)
            except (TypeError, ValueError):
                ids[keyword] = None
        else:
            ids[keyword] = str(value)
    return ids


def _decoder_missing(uid: Any) -> bool | None:
    """Whether no installed plugin decodes ``uid``; None when this pydicom cannot tell (< 3)."""
    try:
        from pydicom.pixels.decoders.base import get_decoder
    except ImportError:
        return None
    try:
        return not get_decoder(uid).is_available
    except Exception:  # no decoder class at all for this syntax
        return None


def _pixel_error(ds: Any, exc: Exception) -> DecodeError:
    """A DecodeError for pixels that pydicom could not decode, naming a decoder when one is due."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None or not getattr(uid, "is_compressed", False):
        return DecodeError(f"DICOM pixel data cannot be read: {exc}")
    name = getattr(uid, "name", str(uid))
    packages = _DECODER_PACKAGES.get(str(uid), _ANY_DECODER)
    install = f"pip install {packages} (or python-gdcm)"
    missing = _decoder_missing(uid)
    if missing:
        return DecodeError(
            f"DICOM pixel data is compressed as {name} and no decoder for it is installed: "
            f"{install}"
        )
    if missing is False:
        # A decoder ran and failed: the data is damaged, or uses a feature that plugin lacks.
        return DecodeError(
            f"DICOM {name} pixel data could not be decoded ({exc}); if the file is sound, "
            f"another decoder may read it: {install}"
        )
    return DecodeError(f"DICOM {name} pixel data could not be decoded ({exc}); {install}")


def read_dicom(data: bytes) -> DicomFrames:
    """The bytes of one DICOM Part 10 file -> :class:`DicomFrames` (frames ``(F, H, W) float32``).

    Single- and multi-frame files; modality values are ``stored * slope + intercept`` computed
    in float64. MONOCHROME1 is not inverted here (the values stay modality values, so windows
    in their units still apply); it is reported as ``monochrome1``. Raises :class:`DecodeError`
    for anything that is not a readable monochrome DICOM image, naming the decoder package when
    a compressed transfer syntax has none installed.
    """
    pydicom = _import_pydicom()
    try:
        # force=False: bytes without the 'DICM' marker are refused instead of parsed as garbage.
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
    except Exception as exc:
        raise DecodeError(f"not a readable DICOM file: {exc}") from exc
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DecodeError("DICOM file holds no image (no Pixel Data element)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise DecodeError(
            f"DICOM colour images ({ds.get('PhotometricInterpretation', '?')}, "
            f"{samples} samples per pixel) are not supported; segbatch reads monochrome images"
        )
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise _pixel_error(ds, exc) from exc
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.ndim != 3:
        raise DecodeError(f"DICOM pixel array has unexpected shape {pixels.shape}")
    try:
        slope, intercept = _rescale(ds, pixels.shape[0])
        spacing = _pixel_spacing(ds)
        ids = _dicom_ids(ds)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # malformed values
        raise DecodeError(f"DICOM attributes cannot be read: {exc}") from exc
    frames = pixels.astype(np.float64) * slope[:, None, None] + intercept[:, None, None]
    return DicomFrames(
        frames=frames.astype(np.float32),
        pixel_spacing_mm=spacing,
        ids=ids,
        monochrome1=photometric == "MONOCHROME1",
    )


# --- NIfTI ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NiftiVolume:
    """One NIfTI image: ``data`` ``(X, Y, Z)`` or ``(X, Y, Z, T)`` float32 with scl_slope/inter
    applied, as stored (a 2-D file is ``(X, Y)``); ``affine`` ``(4, 4)`` float64 voxel -> world
    (mm); ``zooms_mm`` the header's pixdim per axis; ``header`` the nibabel header."""

    data: np.ndarray
    affine: np.ndarray
    zooms_mm: tuple[float, ...]
    header: Any


class NiftiSlice(NamedTuple):
    """One 2-D slice of a NIfTI volume: ``volume`` is the index along the 4th axis (0 for a 3-D
    image), ``slice_index`` the position along the slice axis, ``image`` ``(H, W) float32``."""

    volume: int
    slice_index: int
    image: np.ndarray


def read_nifti(data: bytes, name: str) -> NiftiVolume:
    """The bytes of a ``.nii`` or ``.nii.gz`` file -> :class:`NiftiVolume`.

    Gzip is recognised by its magic bytes as well as by ``name`` (only used in messages and as a
    hint). NIfTI-1 and NIfTI-2 single files; raises :class:`DecodeError` for anything else.
    """
    nib = _import_nibabel()
    try:
        if data[:2] == b"\x1f\x8b" or name.lower().endswith(".gz"):
            data = gzip.decompress(data)
        img = None
        for image_class in (nib.Nifti1Image, nib.Nifti2Image):
            try:
                img = image_class.from_bytes(data)
                break
            except Exception:  # the wrong header size for this class; try the next one
                continue
        if img is None:
            raise DecodeError("no NIfTI-1 or NIfTI-2 header")
        volume = img.get_fdata(dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:
        raise DecodeError(f"{name}: not a readable NIfTI file: {exc}") from exc
    if volume.ndim not in (2, 3, 4):
        raise DecodeError(
            f"{name}: NIfTI image of shape {volume.shape}; segbatch reads 2-D, 3-D and 4-D images"
        )
    return NiftiVolume(data=volume, affine=affine, zooms_mm=zooms, header=img.header)


def _as_4d(data: np.ndarray) -> np.ndarray:
    """``(X, Y)``, ``(X, Y, Z)`` or ``(X, Y, Z, T)`` -> ``(X, Y, Z, T)`` view."""
    if data.ndim == 2:
        return data[:, :, np.newaxis, np.newaxis]
    if data.ndim == 3:
        return data[..., np.newaxis]
    return data


def _slice_axis(slice_axis: int | None) -> int:
    axis = 2 if slice_axis is None else slice_axis
    if axis not in (0, 1, 2):
        raise ConfigError(
            f"input.slice_axis: {slice_axis!r}; use 0, 1 or 2 (a spatial axis) or null for 2"
        )
    return axis


def _volume_indices(vol: NiftiVolume, volume_index: int | str) -> list[int]:
    n_volumes = vol.data.shape[3] if vol.data.ndim == 4 else 1
    if volume_index == "all":
        return list(range(n_volumes))
    if isinstance(volume_index, bool) or not isinstance(volume_index, int):
        raise ConfigError(f"input.volume_index: {volume_index!r}; use a number or 'all'")
    if not 0 <= volume_index < n_volumes:
        raise DecodeError(
            f"input.volume_index {volume_index} is out of range: this image has {n_volumes} "
            f"volume(s) (0..{n_volumes - 1}); use 'all' for every one"
        )
    return [volume_index]


def nifti_slices(
    vol: NiftiVolume, slice_axis: int | None, volume_index: int | Literal["all"]
) -> list[NiftiSlice]:
    """The 2-D slices to segment: ``(volume, slice_index, (H, W) float32)`` for each.

    ``slice_axis`` (0, 1, 2; None means 2, the through-plane axis) is the axis sliced along;
    ``(H, W)`` are the two remaining spatial axes in storage order (axis 2 -> ``(X, Y)``).
    ``volume_index`` picks one volume of a 4-D image, or "all" for every volume (volume-major
    order); a 3-D image has the single volume 0. Put the masks back with
    :func:`assemble_nifti_mask`.
    """
    axis = _slice_axis(slice_axis)
    data4 = _as_4d(vol.data)
    out = []
    for t in _volume_indices(vol, volume_index):
        volume = data4[..., t]
        for z in range(volume.shape[axis]):
            image = np.ascontiguousarray(np.take(volume, z, axis=axis), dtype=np.float32)
            out.append(NiftiSlice(t, z, image))
    return out


def assemble_nifti_mask(
    vol: NiftiVolume,
    slice_masks: Iterable[tuple[int, int, np.ndarray]],
    slice_axis: int | None,
    volume_index: int | Literal["all"],
) -> np.ndarray:
    """Mask slices ``(volume, slice_index, (H, W) mask)`` -> a label volume to write.

    The inverse of :func:`nifti_slices` with the same ``slice_axis`` and ``volume_index``:
    ``(X, Y, Z)`` for one volume, ``(X, Y, Z, T)`` for "all" on a 4-D image; the dtype of the
    first mask (uint8 or uint16). Raises ValueError when a slice is missing or misshapen.
    """
    axis = _slice_axis(slice_axis)
    volumes = _volume_indices(vol, volume_index)
    spatial = _as_4d(vol.data).shape[:3]
    per_volume = volume_index == "all" and vol.data.ndim == 4
    slot = {t: i for i, t in enumerate(volumes)}
    out: np.ndarray | None = None
    seen = np.zeros((len(volumes), spatial[axis]), dtype=bool)
    for t, z, mask in slice_masks:
        mask = np.asarray(mask)
        if out is None:
            out = np.zeros((*spatial, len(volumes)), dtype=mask.dtype)
        if t not in slot or not 0 <= z < spatial[axis]:
            raise ValueError(f"mask slice (volume {t}, index {z}) is not a slice of this image")
        target = np.take(out[..., slot[t]], 0, axis=axis).shape
        if mask.shape != target:
            raise ValueError(f"mask slice {(t, z)} has shape {mask.shape}, expected {target}")
        index: list[Any] = [slice(None)] * 3 + [slot[t]]
        index[axis] = z
        out[tuple(index)] = mask
        seen[slot[t], z] = True
    if out is None or not seen.all():
        raise ValueError(f"{int((~seen).sum())} mask slice(s) missing for this image")
    return out if per_volume else out[..., 0]


def _label_dtype(mask: np.ndarray) -> np.dtype:
    if mask.dtype in (np.uint8, np.uint16):
        return mask.dtype
    if mask.dtype == bool:
        return np.dtype(np.uint8)
    if not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"a label volume must hold integers, got {mask.dtype}")
    lo, hi = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"labels from {lo} to {hi} do not fit uint16")
    return np.dtype(np.uint8 if hi < 256 else np.uint16)


def nifti_mask_bytes(mask: np.ndarray, vol: NiftiVolume) -> bytes:
    """A label volume ``(X, Y, Z)`` or ``(X, Y, Z, T)`` (uint8/uint16) -> ``.nii.gz`` bytes.

    The header is new (no extensions, description or intensity calibration of the input are
    copied: they may identify the patient or describe intensities the labels do not have) but
    its geometry fields are the input's, verbatim: the reloaded affine, qform/sform codes and
    spatial zooms equal the input's exactly. The intent is NIFTI_INTENT_LABEL. The gzip stream
    has no timestamp, so equal masks give equal bytes.
    """
    nib = _import_nibabel()
    mask = np.asarray(mask)
    spatial = _as_4d(vol.data).shape[:3]
    if mask.ndim not in (3, 4) or mask.shape[:3] != spatial:
        raise ValueError(
            f"mask of shape {mask.shape} does not match the image's spatial shape {spatial}"
        )
    mask = mask.astype(_label_dtype(mask), copy=False)
    src = vol.header
    is_nifti2 = isinstance(src, nib.Nifti2Header)
    header = nib.Nifti2Header() if is_nifti2 else nib.Nifti1Header()
    header.set_data_dtype(mask.dtype)
    header.set_data_shape(mask.shape)
    for field in _NIFTI_GEOMETRY_FIELDS:
        header[field] = src[field]
    header.set_intent(_NIFTI_INTENT_LABEL)
    header["descrip"] = b"segbatch labels"
    image_class = nib.Nifti2Image if is_nifti2 else nib.Nifti1Image
    # affine=None: the image takes its geometry from the copied header fields untouched.
    image = image_class(mask, None, header=header)
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


# --- physical sizes ------------------------------------------------------------------------------


def volume_ml(counts: np.ndarray, zooms_mm: tuple[float, ...]) -> np.ndarray:
    """Voxel counts (any shape) -> float64 millilitres: ``counts * prod(zooms_mm[:3]) / 1000``."""
    if len(zooms_mm) < 3:
        raise ValueError(f"a volume needs 3 voxel sizes, got {zooms_mm}")
    voxel_mm3 = float(np.prod(np.asarray(zooms_mm[:3], dtype=np.float64)))
    return np.asarray(counts, dtype=np.float64) * voxel_mm3 / 1000.0


def area_mm2(counts: np.ndarray, pixel_spacing_mm: tuple[float, float] | None) -> np.ndarray | None:
    """Pixel counts (any shape) -> float64 mm² (``counts * row * col``); None without spacing."""
    if pixel_spacing_mm is None:
        return None
    row, col = pixel_spacing_mm
    return np.asarray(counts, dtype=np.float64) * (float(row) * float(col))
