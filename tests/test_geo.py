"""segbatch.geo against real GeoTIFF samples (tests/data/satellite) and small synthetic scenes."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

from segbatch import errors
from segbatch.config import PreprocessConfig
from segbatch.geo import (
    GeoInfo,
    GeoTiffMaskWriter,
    RasterScene,
    class_areas_m2,
    geo_columns,
    is_geotiff,
)

DATA = Path(__file__).parent / "data" / "satellite"
LANDSAT = DATA / "landsat7_andros_rgb.tif"
PAN = DATA / "spacenet4_atlanta_pan_uint16.tif"
BUILDINGS = DATA / "spacenet4_atlanta_buildings_mask.tif"
# Known truths of the samples, counted directly with numpy (see test_known_counts).
LANDSAT_NODATA_PX = 184_823
BUILDING_PX = 117_996

# rasterio warns on opening or writing a TIFF without georeference (matched by message, so this
# module still imports where rasterio is missing).
not_georeferenced = pytest.mark.filterwarnings("ignore:Dataset has no geotransform")


@pytest.fixture
def rio() -> Any:
    return pytest.importorskip("rasterio")


def read_direct(path: Path | str, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """rasterio's own read, as (C, h, w); window is (y0, x0, h, w)."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as ds:
        if window is None:
            return ds.read()
        y0, x0, h, w = window
        return ds.read(window=Window(x0, y0, w, h))


def north_up(rio: Any, west: float, north: float, pixel: float) -> Any:
    """A north-up affine transform with square pixels."""
    return rio.Affine(pixel, 0.0, west, 0.0, -pixel, north)


def test_is_geotiff() -> None:
    assert is_geotiff("a/b/scene.tif")
    assert is_geotiff("s3://bucket/SCENE.TIFF")
    assert is_geotiff("https://host/x.Tif?token=abc")
    assert not is_geotiff("photo.png")
    assert not is_geotiff("tif/photo.jpg")


def test_known_counts(rio: Any) -> None:
    landsat = read_direct(LANDSAT)
    assert int((landsat == 0).all(axis=0).sum()) == LANDSAT_NODATA_PX
    with pytest.warns(rio.errors.NotGeoreferencedWarning):
        buildings = read_direct(BUILDINGS)
    assert int((buildings == 255).sum()) == BUILDING_PX


# --- Landsat: uint8, 3 bands, nodata 0 in a rotated collar --------------------------------------


def test_landsat_window_equals_rasterio_read(rio: Any) -> None:
    window = (100, 150, 200, 300)
    with RasterScene(str(LANDSAT), PreprocessConfig()) as scene:
        assert (scene.height, scene.width, scene.count) == (718, 791, 3)
        assert scene.dtype == "uint8"
        image, valid = scene.read_window(*window)
    expected = read_direct(LANDSAT, window)
    assert image.dtype == np.uint8
    assert image.shape == (200, 300, 3)
    np.testing.assert_array_equal(image, np.moveaxis(expected, 0, -1))
    np.testing.assert_array_equal(valid, ~(expected == 0).all(axis=0))


def test_landsat_band_selection_orders_bands(rio: Any) -> None:
    with RasterScene(str(LANDSAT), PreprocessConfig(bands=(3, 1))) as scene:
        assert scene.count == 2
        image, _ = scene.read_window(300, 200, 64, 96)
    expected = read_direct(LANDSAT, (300, 200, 64, 96))
    np.testing.assert_array_equal(image[..., 0], expected[2])
    np.testing.assert_array_equal(image[..., 1], expected[0])


def test_band_out_of_range_names_band_count(rio: Any) -> None:
    with pytest.raises(errors.DecodeError, match=r"band 4.*3 bands"):
        RasterScene(str(LANDSAT), PreprocessConfig(bands=(1, 4)))


def test_landsat_nodata_mask(rio: Any) -> None:
    with RasterScene(str(LANDSAT), PreprocessConfig()) as scene:
        assert scene.nodata == 0.0
        image, valid = scene.read_all()
    direct = read_direct(LANDSAT)
    invalid = (direct == 0).all(axis=0)
    np.testing.assert_array_equal(~valid, invalid)
    assert int((~valid).sum()) == int(invalid.sum()) == LANDSAT_NODATA_PX > 0
    # A pixel with only some bands at 0 is still valid.
    partly_zero = (direct == 0).any(axis=0) & ~invalid
    assert partly_zero.any()
    assert valid[partly_zero].all()
    np.testing.assert_array_equal(image, np.moveaxis(direct, 0, -1))


def test_nodata_override(rio: Any) -> None:
    with RasterScene(str(LANDSAT), PreprocessConfig(nodata=255)) as scene:
        assert scene.nodata == 255.0
        _, valid = scene.read_all()
    direct = read_direct(LANDSAT)
    np.testing.assert_array_equal(~valid, (direct == 255).all(axis=0))


def test_landsat_geoinfo(rio: Any) -> None:
    with RasterScene(str(LANDSAT), PreprocessConfig()) as scene:
        geo = scene.geo
    with rio.open(LANDSAT) as ds:
        transform = tuple(ds.transform)[:6]
        bounds = tuple(ds.bounds)
    assert geo.crs == "EPSG:32618"
    assert geo.units_m
    assert geo.georeferenced
    assert geo.pixel_size == pytest.approx((300.0, 300.0), abs=0.05)
    assert geo.transform == pytest.approx(transform)
    assert geo.bounds == pytest.approx(bounds)
    cols = geo_columns(geo)
    assert cols == {
        "crs": "EPSG:32618",
        "bounds_left": pytest.approx(101985.0),
        "bounds_bottom": pytest.approx(2611485.0),
        "bounds_right": pytest.approx(339315.0),
        "bounds_top": pytest.approx(2826915.0),
        "pixel_size_x": pytest.approx(300.038, abs=1e-3),
        "pixel_size_y": pytest.approx(300.042, abs=1e-3),
    }


def test_class_areas_landsat(rio: Any) -> None:
    with RasterScene(str(LANDSAT), PreprocessConfig()) as scene:
        geo = scene.geo
    counts = np.array([0, 1, 10, 123_456], dtype=np.int64)
    areas = class_areas_m2(counts, geo)
    assert areas is not None
    assert areas.dtype == np.float64
    a, _, _, _, e, _ = geo.transform
    np.testing.assert_allclose(areas, counts * abs(a * e), rtol=1e-12)
    # The sample's pixels are 300.038 x 300.042 m: within 0.03 % of 90 000 m².
    np.testing.assert_allclose(areas, counts * 90_000.0, rtol=3e-4)


# --- SpaceNet pan: uint16, 1 band --------------------------------------------------------------


def test_pan_uint16_read_as_float32_raw(rio: Any) -> None:
    with RasterScene(str(PAN), PreprocessConfig()) as scene:
        assert scene.dtype == "uint16"
        assert scene.out_dtype == "float32"
        assert scene.geo.crs == "EPSG:32616"
        assert scene.geo.pixel_size == pytest.approx((0.5, 0.5))
        image, valid = scene.read_window(10, 20, 300, 250)
    expected = read_direct(PAN, (10, 20, 300, 250))[0]
    assert image.dtype == np.float32
    assert image.shape == (300, 250, 1)
    np.testing.assert_array_equal(image[..., 0], expected.astype(np.float32))
    assert image.max() > 255  # raw values, not rescaled
    assert valid.all()  # the tile has no nodata (min 54)


def test_pan_percentile_stretch(rio: Any) -> None:
    pre = PreprocessConfig(stretch="percentile", stretch_percentiles=(2.0, 98.0))
    with RasterScene(str(PAN), pre) as scene:
        image, _ = scene.read_all()
    raw = read_direct(PAN)[0].astype(np.float64)
    p2, p98 = np.percentile(raw, (2.0, 98.0))
    assert image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == 1.0
    # 900 px is under the 1024 px sample, so the limits are the exact scene percentiles.
    expected = np.clip((raw - p2) / (p98 - p2), 0.0, 1.0)
    np.testing.assert_allclose(image[..., 0], expected, atol=1e-6)
    assert np.percentile(image, 2.0) == pytest.approx(0.0, abs=1e-3)
    assert np.percentile(image, 98.0) == pytest.approx(1.0, abs=1e-3)
    assert 0.01 < float((image == 0.0).mean()) < 0.03


def test_landsat_stretch_excludes_nodata(rio: Any) -> None:
    pre = PreprocessConfig(stretch="percentile")
    with RasterScene(str(LANDSAT), pre) as scene:
        image, valid = scene.read_all()
    direct = read_direct(LANDSAT).astype(np.float64)
    for band in range(3):
        values = direct[band][valid]
        lo, hi = np.percentile(values, (2.0, 98.0))
        assert lo > 0  # with the collar counted, the 2nd percentile would be 0
        expected = np.clip((direct[band] - lo) / (hi - lo), 0.0, 1.0)
        np.testing.assert_allclose(image[..., band][valid], expected[valid], atol=1e-5)


def test_stretch_on_decimated_read_of_a_large_scene(rio: Any, tmp_path: Path) -> None:
    height, width = 2400, 64  # long side above the 1024 px sample
    ramp = np.linspace(0, 10_000, height * width).reshape(height, width).astype(np.uint16)
    path = tmp_path / "ramp.tif"
    with rio.open(
        path,
        "w",
        driver="GTiff",
        height=height,
        width=width,
        count=1,
        dtype="uint16",
        crs="EPSG:32616",
        transform=north_up(rio, 1000.0, 5000.0, 1.0),
    ) as ds:
        ds.write(ramp, 1)
    with RasterScene(str(path), PreprocessConfig(stretch="percentile")) as scene:
        image, _ = scene.read_all()
    lo, hi = np.percentile(ramp.astype(np.float64), (2.0, 98.0))
    expected = np.clip((ramp - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(image[..., 0], expected, atol=0.01)


def test_window_past_the_edge_is_padded_invalid(rio: Any) -> None:
    with RasterScene(str(PAN), PreprocessConfig()) as scene:
        image, valid = scene.read_window(850, 880, 100, 40)
    expected = read_direct(PAN, (850, 880, 50, 20))[0]
    np.testing.assert_array_equal(image[:50, :20, 0], expected.astype(np.float32))
    assert valid[:50, :20].all()
    assert not valid[50:].any() and not valid[:, 20:].any()
    assert (image[50:] == 0).all() and (image[:, 20:] == 0).all()


# --- Non-georeferenced TIFF --------------------------------------------------------------------


@not_georeferenced
def test_building_mask_not_georeferenced(rio: Any) -> None:
    with RasterScene(str(BUILDINGS), PreprocessConfig()) as scene:
        geo = scene.geo
        assert scene.nodata is None
        image, valid = scene.read_all()
    assert not geo.georeferenced
    assert geo.crs is None
    assert not geo.units_m
    assert class_areas_m2(np.array([10, 20]), geo) is None
    assert all(v is None for v in geo_columns(geo).values())
    assert image.dtype == np.uint8
    assert valid.all()
    assert int((image == 255).sum()) == BUILDING_PX


@not_georeferenced
def test_mask_writer_without_georeference(rio: Any, tmp_path: Path) -> None:
    with RasterScene(str(BUILDINGS), PreprocessConfig()) as scene:
        image, _ = scene.read_all()
        geo = scene.geo
    mask = (image[..., 0] == 255).astype(np.uint8)
    out = tmp_path / "buildings_mask.tif"
    with GeoTiffMaskWriter(str(out), 900, 900, geo, "uint8", nodata_value=255) as writer:
        writer.write_block(0, 0, mask)
    with rio.open(out) as ds:
        assert ds.crs is None
        assert tuple(ds.transform)[:6] == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        np.testing.assert_array_equal(ds.read(1), mask)
    assert int(mask.sum()) == BUILDING_PX


# --- Mask writing ------------------------------------------------------------------------------


def landsat_mask(valid: np.ndarray, nodata_value: int = 255) -> np.ndarray:
    """(H, W) uint8 class indices 0..6 with nodata where invalid."""
    height, width = valid.shape
    rows, cols = np.mgrid[0:height, 0:width]
    mask = ((rows // 37 + cols // 53) % 7).astype(np.uint8)
    mask[~valid] = nodata_value
    return mask


def blocks_of(height: int, width: int, size_y: int, size_x: int) -> list[tuple[int, int]]:
    return [(y, x) for y in range(0, height, size_y) for x in range(0, width, size_x)]


def test_mask_writer_landsat_roundtrip(rio: Any, tmp_path: Path) -> None:
    with RasterScene(str(LANDSAT), PreprocessConfig()) as scene:
        _, valid = scene.read_all()
        geo = scene.geo
    mask = landsat_mask(valid)
    palette = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 8, 7), (1, 2, 3), (4, 5, 6)]
    out = tmp_path / "masks" / "landsat_mask.tif"
    blocks = blocks_of(718, 791, 300, 256)
    order = np.random.default_rng(0).permutation(len(blocks))
    with GeoTiffMaskWriter(str(out), 718, 791, geo, "uint8", 255, palette=palette) as writer:
        for i in order:
            y, x = blocks[i]
            writer.write_block(y, x, mask[y : y + 300, x : x + 256])
        assert not out.exists()  # nothing at the target until close
    assert out.exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left
    with rio.open(out) as ds, rio.open(LANDSAT) as src:
        assert ds.crs == src.crs
        assert ds.transform == src.transform
        assert (ds.height, ds.width, ds.count) == (718, 791, 1)
        assert ds.dtypes == ("uint8",)
        assert ds.nodata == 255
        profile = ds.profile
        assert profile["tiled"] is True
        assert profile["blockxsize"] in (256, 512) and profile["blockysize"] in (256, 512)
        assert profile["compress"] == "deflate"
        colormap = ds.colormap(1)
        assert colormap[1] == (255, 0, 0, 255)
        assert colormap[4] == (9, 8, 7, 255)
        written = ds.read(1)
    np.testing.assert_array_equal(written, mask)
    assert int((written == 255).sum()) == LANDSAT_NODATA_PX


def test_mask_writer_without_palette_has_no_colormap(rio: Any, tmp_path: Path) -> None:
    with RasterScene(str(PAN), PreprocessConfig()) as scene:
        geo = scene.geo
    out = tmp_path / "pan_mask.tif"
    mask = np.arange(900 * 900, dtype=np.int64).reshape(900, 900) % 3
    with GeoTiffMaskWriter(str(out), 900, 900, geo, "uint8", 255) as writer:
        writer.write_block(0, 0, mask[:450])
        writer.write_block(450, 0, mask[450:])
    with rio.open(out) as ds:
        assert ds.crs.to_string() == "EPSG:32616"
        assert ds.profile["blockxsize"] == 512
        np.testing.assert_array_equal(ds.read(1), mask)
        with pytest.raises(ValueError):
            ds.colormap(1)


@not_georeferenced
def test_mask_writer_aborts_on_error(rio: Any, tmp_path: Path) -> None:
    geo = GeoInfo(None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0, 64, 64, 0), (1.0, 1.0), False, False)
    out = tmp_path / "aborted.tif"
    with pytest.raises(RuntimeError), GeoTiffMaskWriter(str(out), 64, 64, geo, "uint8", 255) as w:
        w.write_block(0, 0, np.ones((32, 64), np.uint8))
        raise RuntimeError("model failed")
    assert list(tmp_path.iterdir()) == []


@not_georeferenced
def test_mask_writer_rejects_blocks_outside(rio: Any, tmp_path: Path) -> None:
    geo = GeoInfo(None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0, 64, 64, 0), (1.0, 1.0), False, False)
    writer = GeoTiffMaskWriter(str(tmp_path / "m.tif"), 64, 64, geo, "uint8", 255)
    with pytest.raises(ValueError, match="outside"):
        writer.write_block(40, 0, np.zeros((32, 64), np.uint8))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


# --- Synthetic tiled scenes of other dtypes ----------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "nodata"), [("uint16", 0), ("int16", -9999), ("float32", -9999.0)]
)
def test_synthetic_tiled_scene_roundtrip(
    rio: Any, tmp_path: Path, dtype: str, nodata: float
) -> None:
    height, width = 300, 280
    rng = np.random.default_rng(42)
    info = np.iinfo(dtype) if dtype != "float32" else None
    low, high = (1, 5000) if info is None else (max(info.min + 1, -3000), min(info.max, 30_000))
    bands = rng.integers(low, high, size=(4, height, width)).astype(dtype)
    if dtype == "float32":
        bands += rng.random(bands.shape, dtype=np.float32)
    bands[:, 10:40, 20:70] = nodata  # every band nodata: invalid
    bands[2, 100:120, 100:130] = nodata  # one band nodata: still valid
    path = tmp_path / f"scene_{dtype}.tif"
    transform = north_up(rio, 500_000.0, 4_200_000.0, 10.0)
    with rio.open(
        path,
        "w",
        driver="GTiff",
        height=height,
        width=width,
        count=4,
        dtype=dtype,
        crs="EPSG:32633",
        transform=transform,
        nodata=nodata,
        tiled=True,
        blockxsize=128,
        blockysize=128,
        compress="deflate",
    ) as ds:
        ds.write(bands)

    with RasterScene(str(path), PreprocessConfig(bands=(4, 2))) as scene:
        assert (scene.count, scene.dtype, scene.out_dtype) == (2, dtype, "float32")
        assert scene.geo.crs == "EPSG:32633"
        assert scene.geo.units_m and scene.geo.pixel_size == (10.0, 10.0)
        image, valid = scene.read_window(5, 15, 200, 150)
        full, full_valid = scene.read_all()
        geo = scene.geo
    window = bands[:, 5:205, 15:165]
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image[..., 0], window[3].astype(np.float32))
    np.testing.assert_array_equal(image[..., 1], window[1].astype(np.float32))
    expected_invalid = np.zeros((height, width), bool)
    expected_invalid[10:40, 20:70] = True
    np.testing.assert_array_equal(~full_valid, expected_invalid)
    np.testing.assert_array_equal(~valid, expected_invalid[5:205, 15:165])
    np.testing.assert_array_equal(full[..., 0], bands[3].astype(np.float32))
    areas = class_areas_m2(np.array([3, 4]), geo)
    assert areas is not None
    np.testing.assert_array_equal(areas, [300.0, 400.0])

    # A uint16 mask (more than 256 classes) of the same scene round trips.
    mask = (np.arange(height * width).reshape(height, width) % 1000).astype(np.uint16)
    mask[expected_invalid] = 65535
    out = tmp_path / f"mask_{dtype}.tif"
    with GeoTiffMaskWriter(str(out), height, width, geo, "uint16", 65535) as writer:
        for y, x in reversed(blocks_of(height, width, 128, 100)):
            writer.write_block(y, x, mask[y : y + 128, x : x + 100])
    with rio.open(out) as ds:
        assert ds.dtypes == ("uint16",)
        assert ds.nodata == 65535
        assert ds.transform == transform
        assert ds.profile["tiled"] is True and ds.profile["blockxsize"] == 256
        np.testing.assert_array_equal(ds.read(1), mask)


def test_internal_mask_and_alpha_mark_invalid(rio: Any, tmp_path: Path) -> None:
    height, width = 64, 80
    rng = np.random.default_rng(1)
    rgb = rng.integers(1, 255, size=(3, height, width), dtype=np.uint8)
    gdal_mask = np.full((height, width), 255, np.uint8)
    gdal_mask[:16, :] = 0
    profile = dict(
        driver="GTiff",
        height=height,
        width=width,
        dtype="uint8",
        crs="EPSG:3857",
        transform=north_up(rio, 0.0, 0.0, 2.0),
    )
    with rio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rio.open(tmp_path / "masked.tif", "w", count=3, **profile) as ds:
            ds.write(rgb)
            ds.write_mask(gdal_mask)
        rgba = {"count": 4, "photometric": "RGB", "alpha": "YES"}
        with rio.open(tmp_path / "rgba.tif", "w", **rgba, **profile) as ds:
            ds.write(np.concatenate([rgb, gdal_mask[None]]))
    for name in ("masked.tif", "rgba.tif"):
        with RasterScene(str(tmp_path / name), PreprocessConfig()) as scene:
            assert scene.count == 3  # the alpha band is a mask, not a channel
            image, valid = scene.read_all()
        np.testing.assert_array_equal(image, np.moveaxis(rgb, 0, -1))
        np.testing.assert_array_equal(valid, gdal_mask > 0)


# --- Remote URIs through fsspec ----------------------------------------------------------------


def test_memory_filesystem_read_and_write(rio: Any) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/segbatch-test-{uuid.uuid4().hex}"
    fs.pipe(f"{root}/in/landsat.tif", LANDSAT.read_bytes())
    try:
        with RasterScene(f"memory://{root}/in/landsat.tif", PreprocessConfig()) as scene:
            image, valid = scene.read_window(0, 0, 718, 791)
            geo = scene.geo
        np.testing.assert_array_equal(image, np.moveaxis(read_direct(LANDSAT), 0, -1))
        assert int((~valid).sum()) == LANDSAT_NODATA_PX
        assert geo.crs == "EPSG:32618"

        mask = landsat_mask(valid)
        uri = f"memory://{root}/out/landsat_mask.tif"
        with GeoTiffMaskWriter(uri, 718, 791, geo, "uint8", 255, palette=[(1, 2, 3)]) as writer:
            for y, x in blocks_of(718, 791, 256, 512)[::-1]:
                writer.write_block(y, x, mask[y : y + 256, x : x + 512])
            assert not fs.exists(f"{root}/out/landsat_mask.tif")
        with rio.MemoryFile(fs.cat(f"{root}/out/landsat_mask.tif")) as mem, mem.open() as ds:
            assert ds.crs.to_string() == "EPSG:32618"
            assert tuple(ds.transform)[:6] == pytest.approx(geo.transform)
            assert ds.nodata == 255
            assert ds.colormap(1)[0] == (1, 2, 3, 255)
            np.testing.assert_array_equal(ds.read(1), mask)
    finally:
        fs.rm(root, recursive=True)


def test_unreadable_file_is_a_decode_error(rio: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(errors.DecodeError, match=r"bad\.tif"):
        RasterScene(str(bad), PreprocessConfig())


# --- Without rasterio --------------------------------------------------------------------------


def test_missing_rasterio_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rasterio", None)  # makes `import rasterio` fail
    with pytest.raises(errors.MissingDependencyError, match=r"segbatch\[geo\]") as info:
        RasterScene(str(LANDSAT), PreprocessConfig())
    assert isinstance(info.value, ImportError)
    assert "rasterio" in str(info.value)
    geo = GeoInfo(None, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0, 8, 8, 0), (1.0, 1.0), False, False)
    with pytest.raises(errors.MissingDependencyError, match=r"segbatch\[geo\]"):
        GeoTiffMaskWriter("unused.tif", 8, 8, geo, "uint8", 255)
