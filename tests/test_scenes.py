"""GeoTIFF scenes and medical volumes through the whole job, on the real samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from segbatch.config import load_job
from segbatch.pipeline import run_job
from segbatch.stats import pixel_counts
from tests.conftest import DATA

rasterio = pytest.importorskip("rasterio")
pytestmark = pytest.mark.usefixtures("ray_session")
SAT = DATA / "satellite"
MED = DATA / "medical"

POINTWISE = """
import torch

class Pointwise(torch.nn.Module):
    # A 1x1 'convolution' as explicit per-pixel sums: the same numbers whatever the batch or
    # tile, so tiled and untiled masks must be identical.
    def __init__(self, in_channels, num_classes):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(num_classes, in_channels, generator=g))
        self.b = torch.nn.Parameter(torch.randn(num_classes, generator=g) * 0.1)

    def forward(self, x):
        return (x[:, None] * self.w[None, :, :, None, None]).sum(2) + self.b[None, :, None, None]

def build(in_channels, num_classes):
    return Pointwise(in_channels, num_classes)

class Threshold(torch.nn.Module):
    def forward(self, x):
        return torch.cat([0.5 - x[:, :1], x[:, :1] - 0.5], 1)

def threshold():
    return Threshold()
"""


@pytest.fixture(scope="module")
def code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("code") / "models_here.py"
    path.write_text(POINTWISE)
    return path


def run(out: Path, inputs: list[str], **overrides: Any) -> list[dict[str, Any]]:
    cfg = {
        "input.paths": inputs,
        "output.path": str(out),
        "output.overlays": 0,
        "inference.device": "cpu",
        "preprocess.resize": "none",
    }
    cfg.update(overrides)
    assert run_job(load_job(None, cfg)) == 0
    return pq.read_table(out / "results").to_pylist()


def pointwise(code: Path, classes: int = 4) -> dict[str, Any]:
    return {
        "model.name": "models_here:build",
        "model.code_path": str(code),
        "model.num_classes": classes,
        "preprocess.mean": [0.0, 0.0, 0.0],
        "preprocess.std": [1.0, 1.0, 1.0],
    }


def test_landsat_tiled_streamed_and_whole_agree_exactly(tmp_path: Path, code: Path) -> None:
    scene = str(SAT / "landsat7_andros_rgb.tif")
    whole = run(tmp_path / "whole", [scene], **pointwise(code), **{"tiling.enabled": False})
    tiled = run(
        tmp_path / "tiled",
        [scene],
        **pointwise(code),
        **{"tiling.tile_size_px": 200, "tiling.overlap": 0.25, "tiling.batch_tiles": 3},
    )
    streamed = run(
        tmp_path / "streamed",
        [scene],
        **pointwise(code),
        **{
            "tiling.tile_size_px": 200,
            "tiling.stream_above_px": 100_000,
            "tiling.segment_width_px": 300,
        },
    )
    masks = []
    with rasterio.open(scene) as src:
        crs, transform = src.crs, src.transform
        collar = int((src.read() == 0).all(axis=0).sum())
    for rows in (whole, tiled, streamed):
        (row,) = rows
        assert row["status"] == "ok", row["error"]
        assert row["mask_path"].endswith(".tif")
        with rasterio.open(row["mask_path"]) as m:
            assert m.crs == crs and m.transform == transform
            assert m.nodata == 255 and m.profile["tiled"]
            mask = m.read(1)
        masks.append(mask)
        assert row["px_nodata"] == collar == 184_823
        assert int((mask == 255).sum()) == collar
        px = [row[f"px_class_{k}"] for k in range(4)]
        assert px == pixel_counts(mask, 4, 255).tolist()
        assert sum(px) + row["px_nodata"] == row["width"] * row["height"] == 791 * 718
        assert row["crs"] == "EPSG:32618"
        area = row["area_m2_class_0"]
        assert area == pytest.approx(px[0] * 300.0379266750948 * 300.041782729805, rel=1e-9)
    assert len(np.unique(masks[0])) >= 3  # not one class everywhere
    assert np.array_equal(masks[0], masks[1])
    assert np.array_equal(masks[0], masks[2])


def test_spacenet_uint16_single_band(tmp_path: Path) -> None:
    scene = str(SAT / "spacenet4_atlanta_pan_uint16.tif")
    (row,) = run(
        tmp_path / "out",
        [scene],
        **{
            "model.name": "unet",
            "model.weights": "none",
            "model.in_channels": 1,
            "model.num_classes": 2,
            "model.unet.depth": 2,
            "model.unet.base_channels": 8,
            "preprocess.mean": [400.0],
            "preprocess.std": [200.0],
        },
    )
    assert row["status"] == "ok", row["error"]
    with rasterio.open(scene) as src, rasterio.open(row["mask_path"]) as m:
        assert m.crs == src.crs and m.transform == src.transform
        assert (m.width, m.height) == (900, 900)
    assert row["px_class_0"] + row["px_class_1"] + row["px_nodata"] == 900 * 900


def test_building_mask_statistics_equal_ground_truth(tmp_path: Path, code: Path) -> None:
    """The SpaceNet building mask through segbatch: exactly its known building pixel count."""
    truth = str(SAT / "spacenet4_atlanta_buildings_mask.tif")
    with rasterio.open(truth) as src:
        known = int((src.read(1) == 255).sum())
    assert known == 117_996
    (row,) = run(
        tmp_path / "out",
        [truth],
        **{
            "model.name": "models_here:threshold",
            "model.code_path": str(code),
            "model.classes": ["ground", "building"],
            "model.in_channels": 1,
            "preprocess.mean": [0.0],
            "preprocess.std": [1.0],
        },
    )
    assert row["px_building"] == known
    assert row["px_ground"] == 900 * 900 - known
    assert row["crs"] is None and row["area_m2_building"] is None  # no georeference


def test_medical_inputs(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("pydicom")
    rows = run(
        tmp_path / "out",
        [str(MED / "ct_small.dcm"), str(MED / "mr_small.dcm"), str(MED / "epi_example4d.nii.gz")],
        **{
            "model.name": "unet",
            "model.weights": "none",
            "model.in_channels": 1,
            "model.num_classes": 3,
            "model.unet.depth": 2,
            "model.unet.base_channels": 8,
            "preprocess.window": "ct_soft_tissue",
            "stats.count_components": ["class_1"],
        },
    )
    by_name = {Path(r["path"]).name: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    ct = by_name["ct_small.dcm"]
    assert (ct["width"], ct["height"]) == (128, 128)
    assert ct["sop_instance_uid"] and ct["instance_number"] is not None
    assert ct["n_class_1"] is not None
    total_mm2 = sum(ct[f"area_mm2_class_{k}"] for k in range(3))
    import pydicom

    ds = pydicom.dcmread(MED / "ct_small.dcm")
    spacing = [float(v) for v in ds.PixelSpacing]
    assert total_mm2 == pytest.approx(128 * 128 * spacing[0] * spacing[1])
    epi = by_name["epi_example4d.nii.gz"]
    src = nib.load(MED / "epi_example4d.nii.gz")
    mask = nib.load(epi["mask_path"])
    assert np.array_equal(mask.affine, src.affine)
    assert mask.shape == src.shape[:3]
    labels = np.asarray(mask.dataobj)
    counts = [epi[f"px_class_{k}"] for k in range(3)]
    assert counts == np.bincount(labels.ravel(), minlength=3).tolist()
    voxel_ml = float(np.prod(src.header.get_zooms()[:3])) / 1000
    for k in range(3):
        assert epi[f"volume_ml_class_{k}"] == pytest.approx(counts[k] * voxel_ml)
    # No patient data copied into outputs.
    text = json.dumps(rows, default=str) + (tmp_path / "out" / "summary.json").read_text()
    assert str(ds.PatientName) not in text


def test_bands_select_channels_and_set_in_channels(tmp_path: Path) -> None:
    """preprocess.bands picks and orders bands (1-based); a U-Net's in_channels follows them."""
    (row,) = run(
        tmp_path / "out",
        [str(SAT / "landsat7_andros_rgb.tif")],
        **{
            "model.name": "unet",
            "model.weights": "none",
            "model.unet.depth": 2,
            "model.unet.base_channels": 8,
            "preprocess.bands": [3, 1],
            "preprocess.stretch": "percentile",
        },
    )
    assert row["status"] == "ok", row["error"]
    assert row["px_class_0"] + row["px_class_1"] + row["px_nodata"] == 791 * 718
    job = (tmp_path / "out" / "job.yaml").read_text()
    assert "in_channels: 2" in job
