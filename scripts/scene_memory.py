#!/usr/bin/env python3
"""Peak memory of segmenting one large GeoTIFF scene, as an inference worker does it.

Writes a synthetic tiled 3-band uint8 GeoTIFF of SIZE x SIZE pixels (if not there yet), then
runs segbatch's scene path (``scenes.segment_raster``: windowed reads, blended tiles, mask
written strip by strip) in this process with a 21-class pointwise model, and prints the peak
RSS (``ru_maxrss``) and the time. Run each size in a fresh process:

    .venv/bin/python scripts/scene_memory.py 8000
    .venv/bin/python scripts/scene_memory.py 32000
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_scene(path: Path, size: int) -> None:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff",
        "width": size,
        "height": size,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32618",
        "transform": from_origin(300000.0, 2900000.0, 10.0, 10.0),
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "nodata": 0,
    }
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for y0 in range(0, size, 1024):
            h = min(1024, size - y0)
            yy, xx = np.mgrid[y0 : y0 + h, 0:size]
            base = ((np.sin(xx / 700.0) + np.cos(yy / 500.0)) * 60 + 128).astype(np.uint8)
            noise = rng.integers(0, 16, size=(3, h, size), dtype=np.uint8)
            dst.write(base[None] + noise, window=Window(0, y0, size, h))


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    work = Path(tempfile.gettempdir()) / "segbatch-scene-memory"
    work.mkdir(exist_ok=True)
    scene = work / f"scene_{size}.tif"
    if not scene.exists():
        # In a child process, so that writing the scene does not count in this one's peak.
        import multiprocessing

        t = time.perf_counter()
        tmp = scene.with_suffix(".partial.tif")
        child = multiprocessing.get_context("spawn").Process(target=make_scene, args=(tmp, size))
        child.start()
        child.join()
        tmp.rename(scene)
        print(f"wrote {scene} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    from segbatch.config import load_job
    from segbatch.models import resolve_model
    from segbatch.predictor import Predictor
    from segbatch.scenes import segment_raster

    code = work / "pointwise21.py"
    code.write_text(
        "import torch\n"
        "def build(in_channels, num_classes):\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Conv2d(in_channels, num_classes, 1)\n"
    )
    job = load_job(
        None,
        {
            "input.paths": [str(scene)],
            "output.path": str(work / f"out_{size}"),
            "model.name": "pointwise21:build",
            "model.code_path": str(code),
            "model.num_classes": 21,
            "inference.device": "cpu",
            "tiling.tile_size_px": 1024,
            "tiling.overlap": 0.25,
            "tiling.batch_tiles": 4,
            "tiling.stream_above_px": 0,
        },
    )
    info = resolve_model(job.model, job.preprocess)
    predictor = Predictor(info, job.inference, job.tiling)
    t = time.perf_counter()
    result = segment_raster(predictor, str(scene), scene.name, job, info)
    elapsed = time.perf_counter() - t
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "size_px": size,
                "peak_rss_mib": round(peak_kib / 1024, 1),
                "rss_before_import_mib": round(rss_before / 1024, 1),
                "elapsed_s": round(elapsed, 1),
                "megapixels_per_s": round(size * size / elapsed / 1e6, 2),
                "classes_counted_px": int(result.counts.sum()),
                "nodata_px": result.nodata_px,
            }
        )
    )


if __name__ == "__main__":
    main()
