"""DICOM and NIfTI reading, windows, and NIfTI label volumes (segbatch.medical)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segbatch import medical
from segbatch.errors import ConfigError, DecodeError, MissingDependencyError

DATA = Path(__file__).parent / "data" / "medical"
CT = DATA / "ct_small.dcm"
MR = DATA / "mr_small.dcm"
EPI = DATA / "epi_example4d.nii.gz"


# --- names and windows (no optional packages needed) ---------------------------------------------


@pytest.mark.parametrize(
    ("uri", "dicom", "nifti"),
    [
        ("s3://b/scan/IM0001.dcm", True, False),
        ("/data/a.DICOM", True, False),
        ("https://host/a.dcm?sig=abc", True, False),
        ("brain.nii", False, True),
        ("gs://b/brain.NII.GZ", False, True),
        ("photo.png", False, False),
        ("archive.gz", False, False),
    ],
)
def test_is_dicom_is_nifti_by_extension(uri: str, dicom: bool, nifti: bool) -> None:
    assert medical.is_dicom(uri) is dicom
    assert medical.is_nifti(uri) is nifti


def test_window_presets_have_the_radiology_values() -> None:
    assert medical.WINDOW_PRESETS == {
        "ct_lung": (-600, 1500),
        "ct_soft_tissue": (40, 400),
        "ct_bone": (400, 1800),
        "ct_brain": (40, 80),
        "ct_liver": (60, 160),
        "ct_mediastinum": (50, 350),
    }


def test_ct_lung_window_maps_its_edges_and_center() -> None:
    window = medical.resolve_window("ct_lung")
    assert window == (-600.0, 1500.0)
    hu = np.array([[-2000.0, -1350.0, -600.0], [150.0, 3000.0, -975.0]], dtype=np.float32)
    out = medical.apply_window(hu, window)
    assert out.dtype == np.float32 and out.shape == hu.shape
    np.testing.assert_array_equal(out, [[0.0, 0.0, 0.5], [1.0, 1.0, 0.25]])


def test_window_from_center_and_width() -> None:
    window = medical.resolve_window({"center": 40, "width": 400})
    assert window == (40.0, 400.0)
    out = medical.apply_window(np.array([-160.0, 40.0, 140.0, 240.0]), window)
    np.testing.assert_allclose(out, [0.0, 0.5, 0.75, 1.0], rtol=0, atol=1e-7)


def test_unknown_preset_names_the_closest_and_lists_all() -> None:
    with pytest.raises(ConfigError) as info:
        medical.resolve_window("ct_lungs")
    message = str(info.value)
    assert "did you mean 'ct_lung'?" in message
    assert all(name in message for name in medical.WINDOW_PRESETS)


@pytest.mark.parametrize(
    "bad",
    [{"center": 40, "width": 0}, {"center": 40, "width": -5}, {"center": 40}, {"c": 1, "w": 2}],
)
def test_invalid_window_mappings_are_config_errors(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=r"preprocess\.window"):
        medical.resolve_window(bad)


def test_no_window_is_min_max_per_array() -> None:
    assert medical.resolve_window(None) is None
    assert medical.resolve_window("none") is None
    values = np.array([[10.0, 20.0], [30.0, 50.0]])
    np.testing.assert_allclose(medical.apply_window(values, None), [[0, 0.25], [0.5, 1.0]])
    constant = medical.apply_window(np.full((3, 4), 7.0), None)
    assert constant.dtype == np.float32
    np.testing.assert_array_equal(constant, np.zeros((3, 4)))
    with_nan = medical.apply_window(np.array([np.nan, 0.0, 2.0]), None)
    np.testing.assert_array_equal(with_nan, [0.0, 0.0, 1.0])


def test_invert_flips_after_windowing() -> None:
    out = medical.apply_window(np.array([-1350.0, -600.0, 150.0]), (-600.0, 1500.0), invert=True)
    np.testing.assert_array_equal(out, [1.0, 0.5, 0.0])


def test_volume_and_area_from_counts() -> None:
    counts = np.array([0, 10, 1000])
    np.testing.assert_allclose(medical.volume_ml(counts, (2.0, 2.0, 2.5, 3000.0)), [0, 0.1, 10.0])
    area = medical.area_mm2(counts, (0.5, 0.25))
    assert area is not None
    np.testing.assert_allclose(area, [0, 1.25, 125.0])
    assert medical.area_mm2(counts, None) is None


# --- DICOM ---------------------------------------------------------------------------------------


def _dicom_bytes(ds: Any) -> bytes:
    pydicom = pytest.importorskip("pydicom")
    buf = io.BytesIO()
    try:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    except TypeError:  # pydicom < 3
        pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def _multiframe(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Any:
    """An uncompressed (F, H, W) uint16 multi-frame dataset with a patient name to leak."""
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.InstanceNumber = 7
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-0042"
    ds.Modality = "OT"
    frames, rows, cols = pixels.shape
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


@pytest.mark.parametrize("path", [CT, MR], ids=["ct", "mr"])
def test_read_dicom_gives_modality_values_and_only_identifiers(path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * ds.get("RescaleSlope", 1) + ds.get("RescaleIntercept", 0)

    got = medical.read_dicom(path.read_bytes())

    assert got.frames.dtype == np.float32
    assert got.frames.shape == (1, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(got.frames[0], expected.astype(np.float32))
    assert got.pixel_spacing_mm == tuple(float(v) for v in ds.PixelSpacing)
    assert got.ids == {
        "StudyInstanceUID": str(ds.StudyInstanceUID),
        "SeriesInstanceUID": str(ds.SeriesInstanceUID),
        "SOPInstanceUID": str(ds.SOPInstanceUID),
        "InstanceNumber": int(ds.InstanceNumber),
    }
    assert got.monochrome1 is False
    assert [f.name for f in dataclasses.fields(got)] == [
        "frames",
        "pixel_spacing_mm",
        "ids",
        "monochrome1",
    ]
    assert str(ds.PatientName) not in repr(got)


def test_ct_frames_are_hounsfield_units() -> None:
    pytest.importorskip("pydicom")
    got = medical.read_dicom(CT.read_bytes())
    # CT_small: stored 128..2191, slope 1, intercept -1024.
    assert got.pixel_spacing_mm == (0.661468, 0.661468)
    assert (got.frames.min(), got.frames.max()) == (128 - 1024, 2191 - 1024)


def test_multiframe_dicom_reads_to_frames_height_width() -> None:
    pytest.importorskip("pydicom")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4000, size=(3, 5, 4), dtype=np.uint16)
    ds = _multiframe(pixels)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.PixelSpacing = [0.5, 0.75]

    got = medical.read_dicom(_dicom_bytes(ds))

    assert got.frames.shape == (3, 5, 4)
    np.testing.assert_array_equal(got.frames, pixels.astype(np.float32) * 2 - 100)
    assert got.pixel_spacing_mm == (0.5, 0.75)
    assert got.ids["InstanceNumber"] == 7 and got.ids["StudyInstanceUID"] == "1.2.3.4"
    assert "Doe" not in repr(got) and "PID-0042" not in repr(got)


def test_enhanced_multiframe_uses_per_frame_rescale_and_shared_spacing() -> None:
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    pixels = np.arange(2 * 2 * 3, dtype=np.uint16).reshape(2, 2, 3)
    ds = _multiframe(pixels)
    groups = []
    for slope, intercept in ((1.0, -1024.0), (0.5, 10.0)):
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = slope, intercept
        group = Dataset()
        group.PixelValueTransformationSequence = Sequence([transform])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    measures = Dataset()
    measures.PixelSpacing = [0.8, 0.9]
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    got = medical.read_dicom(_dicom_bytes(ds))

    np.testing.assert_array_equal(got.frames[0], pixels[0] - 1024.0)
    np.testing.assert_array_equal(got.frames[1], pixels[1] * 0.5 + 10.0)
    assert got.pixel_spacing_mm == (0.8, 0.9)


def test_monochrome1_is_reported_not_inverted() -> None:
    pytest.importorskip("pydicom")
    pixels = np.array([[[0, 100], [200, 400]]], dtype=np.uint16)
    got = medical.read_dicom(_dicom_bytes(_multiframe(pixels, photometric="MONOCHROME1")))
    assert got.monochrome1 is True
    np.testing.assert_array_equal(got.frames, pixels.astype(np.float32))
    shown = medical.apply_window(got.frames[0], None, invert=got.monochrome1)
    np.testing.assert_array_equal(shown, [[1.0, 0.75], [0.5, 0.0]])


def _compressed(transfer_syntax: str) -> bytes:
    """CT_small relabelled as compressed, with junk in place of the codestream."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(CT)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.PixelData = encapsulate([b"\x00\x01junk" * 20])
    return _dicom_bytes(ds)


def _has_decoder(transfer_syntax: str) -> bool:
    try:
        from pydicom.pixels.decoders.base import get_decoder
    except ImportError:
        return False
    return bool(get_decoder(transfer_syntax).is_available)


def test_compressed_dicom_without_decoder_names_the_package() -> None:
    pytest.importorskip("pydicom")
    jpeg_ls = "1.2.840.10008.1.2.4.80"
    if _has_decoder(jpeg_ls):
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(DecodeError) as info:
        medical.read_dicom(_compressed(jpeg_ls))
    message = str(info.value)
    assert "JPEG-LS" in message
    assert "no decoder for it is installed" in message
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in message and "python-gdcm" in message


def test_corrupt_jpeg2000_names_a_decoder_package() -> None:
    pytest.importorskip("pydicom")
    with pytest.raises(DecodeError) as info:
        medical.read_dicom(_compressed("1.2.840.10008.1.2.4.90"))
    message = str(info.value)
    assert "JPEG 2000" in message
    assert "pylibjpeg-openjpeg" in message


@pytest.mark.parametrize(
    "make_bytes",
    [
        lambda ct: ct[: len(ct) // 2],  # cut inside the pixel data
        lambda ct: ct[:600],  # cut inside the header
        lambda ct: b"this is a text file, not a DICOM image\n" * 20,
        lambda ct: b"",
    ],
    ids=["truncated-pixels", "truncated-header", "text", "empty"],
)
def test_broken_dicom_is_a_decode_error(make_bytes: Callable[[bytes], bytes]) -> None:
    pytest.importorskip("pydicom")
    with pytest.raises(DecodeError):
        medical.read_dicom(make_bytes(CT.read_bytes()))


def test_colour_dicom_is_refused() -> None:
    pytest.importorskip("pydicom")
    ds = _multiframe(np.zeros((1, 2, 2), dtype=np.uint16))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(DecodeError, match="colour"):
        medical.read_dicom(_dicom_bytes(ds))


def test_missing_pydicom_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydicom", None)  # makes `import pydicom` fail
    with pytest.raises(MissingDependencyError, match=r"segbatch\[medical\]") as info:
        medical.read_dicom(b"")
    assert "'pydicom'" in str(info.value)


def test_missing_nibabel_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(MissingDependencyError, match=r"'nibabel'.*segbatch\[medical\]"):
        medical.read_nifti(b"", "a.nii")


# --- NIfTI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def epi() -> medical.NiftiVolume:
    pytest.importorskip("nibabel")
    return medical.read_nifti(EPI.read_bytes(), EPI.name)


def test_read_nifti_matches_nibabel(epi: medical.NiftiVolume) -> None:
    nib = pytest.importorskip("nibabel")
    ref = nib.load(EPI)
    assert epi.data.shape == (128, 96, 24, 2)
    assert epi.data.dtype == np.float32
    np.testing.assert_array_equal(epi.data, ref.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(epi.affine, ref.affine)
    assert epi.zooms_mm == tuple(float(z) for z in ref.header.get_zooms())
    np.testing.assert_allclose(epi.zooms_mm[:3], (2.0, 2.0, 2.2), rtol=1e-6)


def test_read_nifti_uncompressed_bytes(epi: medical.NiftiVolume) -> None:
    raw = medical.read_nifti(gzip.decompress(EPI.read_bytes()), "epi.nii")
    np.testing.assert_array_equal(raw.data, epi.data)
    np.testing.assert_array_equal(raw.affine, epi.affine)


@pytest.mark.parametrize(
    "data", [b"", b"not a nifti file at all" * 30, b"\x1f\x8b\x08garbage"], ids=str
)
def test_broken_nifti_is_a_decode_error(data: bytes) -> None:
    pytest.importorskip("nibabel")
    with pytest.raises(DecodeError, match=r"bad\.nii\.gz"):
        medical.read_nifti(data, "bad.nii.gz")


def test_slices_along_the_default_axis(epi: medical.NiftiVolume) -> None:
    one = medical.nifti_slices(epi, None, 0)
    assert len(one) == 24
    assert [(s.volume, s.slice_index) for s in one] == [(0, z) for z in range(24)]
    assert all(s.image.shape == (128, 96) and s.image.dtype == np.float32 for s in one)
    np.testing.assert_array_equal(one[5].image, epi.data[:, :, 5, 0])

    second = medical.nifti_slices(epi, 2, 1)
    np.testing.assert_array_equal(second[3].image, epi.data[:, :, 3, 1])

    every = medical.nifti_slices(epi, None, "all")
    assert len(every) == 48
    assert [(t, z) for t, z, _ in every] == [(t, z) for t in range(2) for z in range(24)]
    np.testing.assert_array_equal(every[24 + 7].image, epi.data[:, :, 7, 1])


def test_slices_along_axis_0(epi: medical.NiftiVolume) -> None:
    slices = medical.nifti_slices(epi, 0, 0)
    assert len(slices) == 128
    assert slices[0].image.shape == (96, 24)
    np.testing.assert_array_equal(slices[40].image, epi.data[40, :, :, 0])


def test_bad_slice_axis_and_volume_index(epi: medical.NiftiVolume) -> None:
    with pytest.raises(ConfigError, match="slice_axis"):
        medical.nifti_slices(epi, 3, 0)
    with pytest.raises(DecodeError, match="2 volume"):
        medical.nifti_slices(epi, None, 2)


def test_3d_volume_has_one_volume(epi: medical.NiftiVolume) -> None:
    vol3 = dataclasses.replace(epi, data=epi.data[..., 0])
    assert len(medical.nifti_slices(vol3, None, "all")) == 24
    assert len(medical.nifti_slices(vol3, None, 0)) == 24
    with pytest.raises(DecodeError):
        medical.nifti_slices(vol3, None, 1)


def _threshold_masks(slices: list[medical.NiftiSlice]) -> list[tuple[int, int, np.ndarray]]:
    """A stand-in for the model: 0 background, 1 bright, 2 very bright (uint8)."""
    out = []
    for t, z, image in slices:
        mask = (image > 400).astype(np.uint8) + (image > 600).astype(np.uint8)
        out.append((t, z, mask))
    return out


def test_mask_round_trip_keeps_geometry_exactly(epi: medical.NiftiVolume) -> None:
    nib = pytest.importorskip("nibabel")
    slice_axis = 1  # not the default, so a transposition bug would show
    masks = _threshold_masks(medical.nifti_slices(epi, slice_axis, 0))
    labels = medical.assemble_nifti_mask(epi, masks, slice_axis, 0)
    expected = (epi.data[..., 0] > 400).astype(np.uint8) + (epi.data[..., 0] > 600)
    np.testing.assert_array_equal(labels, expected)
    assert labels.shape == (128, 96, 24) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2}

    written = medical.nifti_mask_bytes(labels, epi)
    assert written[:2] == b"\x1f\x8b"
    back = nib.Nifti1Image.from_bytes(gzip.decompress(written))
    assert np.array_equal(back.affine, epi.affine)
    assert back.shape == (128, 96, 24)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    header = back.header
    assert int(header["qform_code"]) == int(epi.header["qform_code"]) == 1
    assert int(header["sform_code"]) == int(epi.header["sform_code"]) == 1
    np.testing.assert_array_equal(header.get_qform(), epi.header.get_qform())
    np.testing.assert_array_equal(header.get_sform(), epi.header.get_sform())
    assert header.get_zooms() == tuple(epi.header.get_zooms()[:3])
    assert header.get_intent()[0] == "label"
    assert len(header.extensions) == 0 < len(epi.header.extensions)  # the input's are not copied
    assert medical.nifti_mask_bytes(labels, epi) == written  # no timestamp in the gzip stream


def test_mask_round_trip_for_every_volume(epi: medical.NiftiVolume) -> None:
    nib = pytest.importorskip("nibabel")
    masks = _threshold_masks(medical.nifti_slices(epi, None, "all"))
    labels = medical.assemble_nifti_mask(epi, masks, None, "all")
    assert labels.shape == (128, 96, 24, 2)
    np.testing.assert_array_equal(
        labels[..., 1], (epi.data[..., 1] > 400).astype(np.uint8) + (epi.data[..., 1] > 600)
    )

    back = nib.Nifti1Image.from_bytes(gzip.decompress(medical.nifti_mask_bytes(labels, epi)))
    assert np.array_equal(back.affine, epi.affine)
    assert back.shape == (128, 96, 24, 2)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    assert back.header.get_zooms() == epi.header.get_zooms()


def test_assemble_refuses_missing_slices_and_wrong_shapes(epi: medical.NiftiVolume) -> None:
    masks = _threshold_masks(medical.nifti_slices(epi, None, 0))
    with pytest.raises(ValueError, match="1 mask slice"):
        medical.assemble_nifti_mask(epi, masks[:-1], None, 0)
    t, z, mask = masks[0]
    with pytest.raises(ValueError, match="shape"):
        medical.assemble_nifti_mask(epi, [(t, z, mask.T), *masks[1:]], None, 0)
    with pytest.raises(ValueError, match="spatial shape"):
        medical.nifti_mask_bytes(np.zeros((128, 96, 23), dtype=np.uint8), epi)


def test_uint16_labels_stay_uint16(epi: medical.NiftiVolume) -> None:
    nib = pytest.importorskip("nibabel")
    labels = np.zeros((128, 96, 24), dtype=np.uint16)
    labels[10:20, 5:9, 3] = 300
    back = nib.Nifti1Image.from_bytes(gzip.decompress(medical.nifti_mask_bytes(labels, epi)))
    assert back.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)


def test_volume_ml_uses_the_voxel_size(epi: medical.NiftiVolume) -> None:
    labels = (epi.data[..., 0] > 400).astype(np.uint8)
    count = int(labels.sum())
    assert count > 0
    got = medical.volume_ml(np.array([count]), epi.zooms_mm)
    np.testing.assert_allclose(got, [count * 2 * 2 * 2.2 / 1000], rtol=1e-6)
