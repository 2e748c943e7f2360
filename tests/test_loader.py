"""Read and decode stages over Ray-style batches (segbatch.loader), without Ray."""

from __future__ import annotations

import io as stdio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segbatch.errors import DecodeError
from segbatch.loader import (
    KIND_ERROR,
    KIND_IMAGE,
    decode_batch,
    decode_one,
    error_message,
    errors_in,
    image_at,
    read_batch,
)

SAMPLES = Path(__file__).resolve().parents[1] / "jobs" / "samples" / "photos"


def _batch(uris: list[str], errors: list[str | None] | None = None) -> dict[str, np.ndarray]:
    """A batch as Ray Data hands it to map_batches(batch_format='numpy')."""
    n = len(uris)
    return {
        "index": np.arange(n, dtype=np.int64),
        "uri": np.array(uris, dtype=object),
        "rel_path": np.array([u.rsplit("/", 1)[-1] for u in uris], dtype=object),
        "error": np.array(errors if errors is not None else [None] * n, dtype=object),
    }


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    grey16 = np.arange(0, 65536, 65536 // 20, dtype=np.uint16)[:20].reshape(4, 5)
    small = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    paths = {
        "cat": SAMPLES / "chelsea_cat.png",
        "small": tmp_path / "small.png",
        "grey16": tmp_path / "grey16.png",
        "missing": tmp_path / "missing.png",
        "empty": tmp_path / "empty.png",
        "text": tmp_path / "text.png",
    }
    Image.fromarray(small).save(paths["small"])
    Image.fromarray(grey16).save(paths["grey16"])
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("this is not a picture\n")
    return paths


def test_read_then_decode_mixed_batch(files: dict[str, Path]) -> None:
    order = ["cat", "missing", "small", "empty", "text", "grey16"]
    batch = _batch([str(files[k]) for k in order])
    read = read_batch(batch, retries=0, threads=3)

    assert list(read["index"]) == list(range(6))
    data = read["data"]
    assert data.dtype == object
    assert data.shape == (6,)
    assert data[0] == files["cat"].read_bytes()
    assert data[1] == b""
    assert data[3] == b""
    read_errors = errors_in(read["error"])
    assert read_errors[1] is not None
    assert read_errors[1].startswith("file not found")
    assert "missing.png" in read_errors[1]
    assert [e is None for e in read_errors] == [True, False, True, True, True, True]

    out = decode_batch(read)
    assert "data" not in out
    assert list(out["rel_path"]) == list(batch["rel_path"])
    assert list(out["kind"]) == [
        KIND_IMAGE,
        KIND_ERROR,
        KIND_IMAGE,
        KIND_ERROR,
        KIND_ERROR,
        KIND_IMAGE,
    ]
    errors = errors_in(out["error"])
    assert errors[0] is None and errors[2] is None and errors[5] is None
    assert errors[1].startswith("file not found")
    assert "empty" in errors[3]
    assert "not an image" in errors[4]

    cat = image_at(out, 0)
    assert cat.shape == (300, 451, 3)
    with Image.open(files["cat"]) as im:
        np.testing.assert_array_equal(cat, np.asarray(im.convert("RGB")))
    small = image_at(out, 2)
    np.testing.assert_array_equal(small, np.asarray(Image.open(files["small"])))
    grey = image_at(out, 5)
    assert grey.shape == (4, 5, 3)
    assert grey.dtype == np.uint8
    assert grey[0, 0, 0] == 0
    assert grey[-1, -1, 0] == round(19 * (65536 // 20) / 257)

    for i in (1, 3, 4):
        assert image_at(out, i).shape == (0, 0, 3)
        assert image_at(out, i).dtype == np.uint8
    assert list(out["width"]) == [451, -1, 7, -1, -1, 5]
    assert list(out["height"]) == [300, -1, 5, -1, -1, 4]
    assert out["width"].dtype == np.int64
    assert [json.loads(m) for m in out["meta"]] == [{}] * 6


def test_preset_errors_pass_through_untouched(files: dict[str, Path]) -> None:
    message = "unsupported file type (.txt); supported: png"
    batch = _batch(
        [str(files["small"]), str(files["missing"]), str(files["text"])],
        errors=[None, message, "already broken"],
    )
    read = read_batch(batch, retries=0)
    assert errors_in(read["error"]) == [None, message, "already broken"]
    assert read["data"][1] == b"" and read["data"][2] == b""  # not read at all
    out = decode_batch(read)
    assert errors_in(out["error"]) == [None, message, "already broken"]
    assert list(out["kind"]) == [KIND_IMAGE, KIND_ERROR, KIND_ERROR]
    assert image_at(out, 0).shape == (5, 7, 3)


def test_one_channel_decoding(files: dict[str, Path]) -> None:
    out = decode_batch(read_batch(_batch([str(files["grey16"]), str(files["empty"])])), channels=1)
    assert image_at(out, 0).shape == (4, 5, 1)
    assert image_at(out, 0).dtype == np.float32
    assert image_at(out, 0)[-1, -1, 0] == pytest.approx(19 * (65536 // 20) / 65535)
    assert image_at(out, 1).shape == (0, 0, 1)


def test_pixel_limit_is_an_error_row(files: dict[str, Path]) -> None:
    out = decode_batch(read_batch(_batch([str(files["small"]), str(files["cat"])])), max_pixels=35)
    assert list(out["kind"]) == [KIND_IMAGE, KIND_ERROR]
    assert "input.max_image_pixels" in errors_in(out["error"])[1]


def test_size_for_the_model_over_the_limit_is_an_error_row_before_resizing(
    tmp_path: Path,
) -> None:
    """A strip within the pixel limit whose preset resize would not be: 2 x 400 (800 px)
    scaled to a shorter side of 64 is 64 x 12,800 = 819,200 px, over 100,000."""
    Image.fromarray(np.full((2, 400, 3), 9, np.uint8)).save(tmp_path / "strip.png")
    Image.fromarray(np.full((20, 30, 3), 9, np.uint8)).save(tmp_path / "small.png")
    batch = _batch([str(tmp_path / "strip.png"), str(tmp_path / "small.png")])
    out = decode_batch(read_batch(batch), max_pixels=100_000, resize=64)
    assert list(out["kind"]) == [KIND_ERROR, KIND_IMAGE]
    assert out["image_shape"].tolist() == [[0, 0, 3], [64, 96, 3]]
    error = errors_in(out["error"])[0]
    assert error is not None
    for words in ("400x2", "12800x64", "819,200", "100,000", "input.max_image_pixels"):
        assert words in error, (words, error)
    assert "preprocess.resize" in error and "tiling.enabled" in error
    assert (out["width"][0], out["height"][0]) == (-1, -1)

    # The strip at the default limit and lraspp's preset (520): 520 x 10,400,000,
    # about 16 GB, is refused before it is made.
    Image.fromarray(np.full((1, 20_000, 3), 9, np.uint8)).save(tmp_path / "long.png")
    out = decode_batch(read_batch(_batch([str(tmp_path / "long.png")])), resize=520)
    error = errors_in(out["error"])[0]
    assert error is not None and "10400000x520 = 5,408,000,000 pixels" in error


def test_size_for_the_model_is_checked_without_resize_too() -> None:
    """resize none: the model (tiled or not) holds logits at the image's own size, so the
    limit applies to it; DICOM images, which the photo decoder's check does not see, too."""
    pytest.importorskip("pydicom")
    data = (Path(__file__).parent / "data" / "medical" / "ct_small.dcm").read_bytes()
    batch = {**_batch(["ct.dcm", "ct2.dcm"]), "data": np.array([data, data], dtype=object)}
    out = decode_batch(batch, max_pixels=128 * 128, resize="none")
    assert list(out["kind"]) == [KIND_IMAGE, KIND_IMAGE]
    out = decode_batch(batch, max_pixels=128 * 128 - 1, resize="none")
    assert list(out["kind"]) == [KIND_ERROR, KIND_ERROR]
    error = errors_in(out["error"])[0]
    assert error is not None
    assert "128x128" in error and "16,384 pixels" in error and "resize: none" in error


def test_empty_batch() -> None:
    read = read_batch(_batch([]))
    assert read["data"].shape == (0,)
    out = decode_batch(read)
    assert list(out["image"]) == [] and out["image_shape"].shape == (0, 3)
    assert out["kind"].shape == (0,)


def test_nifti_volumes_are_left_to_the_actor() -> None:
    """NIfTI inputs are not decoded by this stage: the actor reads the whole volume itself."""
    item = decode_one(b"", "s3://b/scan.NII.GZ", 3, 100)
    assert item.kind == "volume"
    assert item.image.shape == (0, 0, 3)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (DecodeError("file is empty (0 bytes)\nsecond line"), "file is empty (0 bytes)"),
        (FileNotFoundError("/x/a.png"), "file not found: /x/a.png"),
        (PermissionError("/x/a.png"), "permission denied: /x/a.png"),
        (RuntimeError("boom"), "RuntimeError: boom"),
        (RuntimeError(), "RuntimeError"),
        (DecodeError(""), "DecodeError"),
    ],
)
def test_error_message(exc: BaseException, expected: str) -> None:
    assert error_message(exc) == expected


def test_read_batch_keeps_bytes_with_nul_bytes_intact(tmp_path: Path) -> None:
    # numpy would strip trailing NULs from a bytes array; the data column must not.
    payload = b"\x89PNG\x00\x00"
    (tmp_path / "a.png").write_bytes(payload)
    (tmp_path / "b.png").write_bytes(b"\x00")
    read = read_batch(_batch([str(tmp_path / "a.png"), str(tmp_path / "b.png")]))
    assert read["data"][0] == payload
    assert read["data"][1] == b"\x00"
    assert isinstance(read["data"][0], bytes)


def test_read_batch_memory_filesystem() -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    im = np.full((3, 4, 3), 77, dtype=np.uint8)
    buf = stdio.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    fs.pipe("/loader-test/a.png", buf.getvalue())
    try:
        out = decode_batch(read_batch(_batch(["memory://loader-test/a.png"])))
        np.testing.assert_array_equal(image_at(out, 0), im)
    finally:
        fs.rm("/loader-test", recursive=True)


def test_errors_in_reads_every_no_error_form() -> None:
    # Ray hands an all-None object column back as NaN; '' is what the stages write.
    column = np.array([None, float("nan"), "", "bad file", np.nan], dtype=object)
    assert errors_in(column) == [None, None, None, "bad file", None]


def test_nan_error_column_from_ray_means_no_error(files: dict[str, Path]) -> None:
    batch = _batch([str(files["small"]), str(files["small"])])
    batch["error"] = np.array([np.nan, np.nan], dtype=object)
    out = decode_batch(read_batch(batch))
    assert list(out["kind"]) == [KIND_IMAGE, KIND_IMAGE]
    assert errors_in(out["error"]) == [None, None]
    assert all(isinstance(e, str) for e in out["error"])  # a column Arrow can type as string


def test_resize_keeps_original_size_columns(files: dict[str, Path]) -> None:
    read = read_batch(_batch([str(files["cat"]), str(files["empty"])]))
    out = decode_batch(read, resize=150)
    assert image_at(out, 0).shape == (150, 225, 3)  # shorter side 300 -> 150
    assert image_at(out, 0).dtype == np.uint8
    assert list(out["width"]) == [451, -1]
    assert list(out["height"]) == [300, -1]
    assert image_at(out, 1).shape == (0, 0, 3)
    fixed = decode_batch(read, resize=(64, 32))
    assert image_at(fixed, 0).shape == (64, 32, 3)
    same = decode_batch(read, resize="none")
    assert image_at(same, 0).shape == (300, 451, 3)
