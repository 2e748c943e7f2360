"""Per-class statistics (segbatch.stats): column names, pixel counts, job totals."""

from __future__ import annotations

import numpy as np
import pytest

from segbatch.stats import Totals, class_columns, column_name, error_kind, pixel_counts

VOC = (
    "__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
    "sofa", "train", "tvmonitor",
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("__background__", "background"),
        ("diningtable", "diningtable"),
        ("potted plant", "potted_plant"),
        ("Potted Plant", "potted_plant"),
        ("A--B  c", "a_b_c"),
        ("traffic-light (red)", "traffic_light_red"),
        ("café", "caf"),
        ("___", "class"),
        ("", "class"),
    ],
)
def test_column_name(name: str, column: str) -> None:
    assert column_name(name) == column


def test_voc_columns() -> None:
    cols = class_columns(VOC)
    assert len(cols) == 21
    assert cols[0] == "px_background"
    assert cols[1] == "px_aeroplane"
    assert cols[11] == "px_diningtable"
    assert cols[-1] == "px_tvmonitor"
    assert len(set(cols)) == 21


def test_columns_made_unique() -> None:
    cols = class_columns(["Cat", "cat", "CAT!", "dog", "nodata"])
    assert cols == ["px_cat", "px_cat_1", "px_cat_2", "px_dog", "px_nodata_4"]
    assert "px_nodata" not in cols  # a base column of the results


def test_other_prefix() -> None:
    assert class_columns(["Road", "road"], "area_m2_") == ["area_m2_road", "area_m2_road_1"]


def test_columns_unique_when_suffix_is_taken() -> None:
    cols = class_columns(["x", "x_2", "x"])
    assert len(set(cols)) == 3


def test_pixel_counts_sum_to_area() -> None:
    mask = np.random.default_rng(0).integers(0, 5, size=(17, 23), dtype=np.uint8)
    counts = pixel_counts(mask, 5)
    assert counts.dtype == np.int64
    assert counts.sum() == 17 * 23
    assert list(counts) == [int((mask == k).sum()) for k in range(5)]


def test_pixel_counts_minlength() -> None:
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[0, 0] = 1
    assert list(pixel_counts(mask, 4)) == [23, 1, 0, 0]


def test_pixel_counts_ignores_nodata() -> None:
    mask = np.array([[0, 1, 255], [255, 2, 2]], dtype=np.uint8)
    counts = pixel_counts(mask, 3, nodata_value=255)
    assert list(counts) == [1, 1, 2]
    assert counts.sum() == mask.size - 2


def test_pixel_counts_uint16_many_classes() -> None:
    mask = np.array([[0, 300], [300, 999]], dtype=np.uint16)
    counts = pixel_counts(mask, 1000, nodata_value=65535)
    assert counts.shape == (1000,)
    assert (counts[0], counts[300], counts[999]) == (1, 2, 1)
    assert counts.sum() == 4


def test_totals() -> None:
    totals = Totals(num_classes=3)
    assert totals.error_fraction == 0.0
    assert totals.most_common_error() is None
    np.testing.assert_array_equal(totals.fractions(), [0.0, 0.0, 0.0])
    totals.add_ok(np.array([3, 1, 0]), nodata_px=2)
    totals.add_ok(np.array([1, 1, 2]))
    assert totals.ok == 2
    assert list(totals.pixels) == [4, 2, 2]
    assert totals.nodata_px == 2
    np.testing.assert_allclose(totals.fractions(), [0.5, 0.25, 0.25])


def test_totals_group_errors_by_kind() -> None:
    totals = Totals(num_classes=2)
    totals.add_error("file not found: 'a.png'")
    totals.add_error("file not found: 'b/c.png'")
    totals.add_error('file not found: "d.png"')
    totals.add_error("image is 40x40 = 1,600 pixels, over the decoder's limit of 1,000")
    totals.add_error("image is 50x50 = 2,500 pixels, over the decoder's limit of 1,000")
    totals.add_error("file is empty (0 bytes)")
    assert totals.error == 6
    assert totals.done == 6
    assert totals.error_fraction == 1.0
    assert sorted(totals.errors_by_message.values()) == [1, 2, 3]
    assert totals.most_common_error() == "file not found: _"
    totals.add_ok(np.array([1, 1]))
    totals.add_ok(np.array([1, 1]))
    assert totals.error_fraction == pytest.approx(6 / 8)


def test_totals_error_key_is_bounded() -> None:
    totals = Totals(num_classes=1)
    totals.add_error("x" * 1000)
    assert all(len(k) <= 160 for k in totals.errors_by_message)


@pytest.mark.parametrize(
    "messages",
    [
        # missing objects on S3, named the way s3fs names them (no scheme) and with one
        ["file not found: bkt/in/missing.png", "file not found: bkt/in/sub/other.jpg"],
        ["file not found: s3://bkt/in/a.png", "file not found: gs://b/deep/er/b.tif"],
        ["file not found: /data/in/a.png", "file not found: /data/b.png"],
        ["file not found: missing.png", "file not found: other-2.JPEG"],
        ["file not found: C:\\data\\a.png", "file not found: D:\\x\\b.png"],
        ["cannot decode 'a b.png': truncated", 'cannot decode "c/d.png": truncated'],
        ["member img/a.png of /d/shard-0.tar#img/a.png: missing",
         "member b.png of s.tar#b.png: missing"],
        ["https://h:8080/a.png?X-Amz-Signature=1: 403 Forbidden",
         "http://host/b.png: 403 Forbidden"],
        ["decode failed: cannot identify image file <_io.BytesIO object at 0x7f3a2b9c>",
         "decode failed: cannot identify image file <_io.BytesIO object at 0x7f00aa10>"],
    ],
)  # fmt: skip
def test_error_kind_folds_every_name_out(messages: list[str]) -> None:
    kinds = {error_kind(m) for m in messages}
    assert len(kinds) == 1, kinds
    (kind,) = kinds
    assert ".png" not in kind.lower() and ".tif" not in kind and "bkt" not in kind


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("file not found: bkt/in/missing.png", "file not found: _"),
        ("file not found: s3://bkt/in/missing.png", "file not found: _"),
        ("file not found: missing.png. Check the path", "file not found: _. Check the path"),
        ("member b.png of s.tar#b.png: missing", "member _ of _: missing"),
        ("permission denied: /d/a.png", "permission denied: _"),
    ],
)
def test_error_kind_keeps_the_words(message: str, kind: str) -> None:
    assert error_kind(message) == kind


def test_error_kinds_stay_apart() -> None:
    kinds = {
        error_kind(m)
        for m in (
            "file not found: bkt/in/a.png",
            "permission denied: bkt/in/a.png",
            "unsupported file type (.xyz); supported: png, jpg",
            "inference failed: RuntimeError: out of memory",
        )
    }
    assert len(kinds) == 4


def test_totals_one_kind_for_many_missing_s3_objects() -> None:
    totals = Totals(num_classes=2)
    for i in range(50):
        totals.add_error(f"file not found: bkt/in/missing-{i}.png")
        totals.add_error(f"file not found: s3://bkt/in/part{i}/img_{i}.tif")
    assert totals.errors_by_message == {"file not found: _": 100}
