"""A short smoke of ``segbatch bench``: every case runs and the JSON has positive figures.

Benchmarks are not timed tests; the figures themselves are in docs/performance.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from segbatch import bench, cli


def test_write_images_makes_jpegs_of_the_size(tmp_path: Path) -> None:
    paths = bench.write_images(tmp_path, 4, (40, 24))
    assert [p.name for p in paths] == [f"img_{i:05d}.jpg" for i in range(4)]
    for p in paths:
        with Image.open(p) as im:
            assert (im.format, im.size) == ("JPEG", (40, 24))


def test_steady_rate_skips_the_warm_up() -> None:
    # 1 s start-up, then 10 images/s: the warm-up mask is left out.
    times = [1.0 + 0.1 * i for i in range(20)]
    assert bench.steady_rate(times, batch_size=1) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="too few"):
        bench.steady_rate([1.0, 2.0], batch_size=1)


def test_steady_rate_with_actors_finishing_in_waves() -> None:
    # 2 actors, 4 s per image each: masks arrive in pairs at 5, 9, 13, 17 s. Steady rate 0.5/s;
    # measuring from the first mask alone would count 7 masks in 12 s (0.58/s).
    times = [t for t in (5.0, 9.0, 13.0, 17.0) for _ in range(2)]
    assert bench.steady_rate(times, batch_size=1, workers=2) == pytest.approx(0.5)


def test_bench_smoke(tmp_path: Path, ray_session: None) -> None:
    out = tmp_path / "bench.json"
    code = cli.main(
        [
            "bench",
            "--count", "6",
            "--size", "64x48",
            "--repeats", "1",
            "--set", "preprocess.resize=48",
            "--json", str(out),
            "--workdir", str(tmp_path / "work"),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["config"]["model_input_px"] == [64, 48]
    for case in ("model_only", "plain_loop", "end_to_end"):
        fig = result[case]["images_per_s"]
        assert fig["median"] > 0 and len(fig["runs"]) == 1
    assert result["end_to_end"]["inference"]["device"] == "cpu"
    assert result["startup"]["first_mask_s"] > 0
    assert set(result["ratios"]) == {"end_to_end_over_model_only", "end_to_end_over_plain_loop"}
    assert all(v["median"] > 0 for v in result["ratios"].values())
    assert all(v > 0 for v in result["stages_ms_per_image"].values())
    masks = sorted((tmp_path / "work" / "e2e-0" / "masks").glob("*.png"))
    assert len(masks) == 6
