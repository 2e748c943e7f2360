"""The whole job on local Ray: outputs, schema, statistics, bad inputs, exit codes."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from segbatch.config import load_job
from segbatch.pipeline import run_job
from segbatch.stats import class_columns
from tests.conftest import PHOTOS

pytestmark = pytest.mark.usefixtures("ray_session")


def job(tmp_path: Path, inputs: list[str], **overrides: Any) -> Any:
    base = {
        "input.paths": inputs,
        "output.path": str(tmp_path / "out"),
        "model.name": "lraspp_mobilenet_v3_large",
        "model.weights": "none",
        "inference.device": "cpu",
    }
    base.update(overrides)
    return load_job(None, base)


def read_results(out: Path) -> list[dict[str, Any]]:
    tables = [pq.read_table(p) for p in sorted((out / "results").glob("*.parquet"))]
    return [row for t in tables for row in t.to_pylist()]


@pytest.fixture(scope="module")
def nested_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nested")
    (root / "a" / "b").mkdir(parents=True)
    shutil.copy(PHOTOS / "chelsea_cat.png", root / "a" / "cat.png")
    shutil.copy(PHOTOS / "coffee.png", root / "a" / "b" / "coffee.PNG")
    Image.open(PHOTOS / "astronaut.png").convert("RGB").save(root / "astronaut.jpg", quality=92)
    Image.open(PHOTOS / "chelsea_cat.png").convert("L").save(root / "grey.png")
    Image.open(PHOTOS / "chelsea_cat.png").convert("P").save(root / "palette.png")
    Image.open(PHOTOS / "chelsea_cat.png").convert("RGBA").save(root / "rgba.png")
    grey16 = np.asarray(Image.open(PHOTOS / "coffee.png").convert("L")).astype(np.uint16) * 257
    Image.fromarray(grey16).save(root / "grey16.png")
    return root


def test_outputs_follow_the_contract(
    tmp_path: Path, nested_photos: Path, calibrated_checkpoint: dict[str, Any]
) -> None:
    cfg = job(
        tmp_path,
        [str(nested_photos)],
        **{
            "model.name": calibrated_checkpoint["name"],
            "model.weights": calibrated_checkpoint["path"],
            "output.overlays": 2,
            "output.rows_per_file": 3,
            "inference.batch_size": 2,
        },
    )
    assert run_job(cfg) == 0
    out = tmp_path / "out"
    rows = read_results(out)
    expected_rel = [
        "a/b/coffee.png",
        "a/cat.png",
        "astronaut.png",
        "grey.png",
        "grey16.png",
        "palette.png",
        "rgba.png",
    ]
    assert [r["index"] for r in rows] == list(range(7))
    masks = sorted(p.relative_to(out / "masks").as_posix() for p in (out / "masks").rglob("*.png"))
    assert masks == expected_rel
    # Deterministic part files: 7 rows at 3 per file.
    assert sorted(p.name for p in (out / "results").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    schema = pq.read_schema(out / "results" / "part-00000.parquet")
    classes = json.loads(schema.metadata[b"segbatch.classes"])
    assert classes[:2] == ["__background__", "aeroplane"] and len(classes) == 21
    cols = class_columns(classes)
    assert cols[0] == "px_background" and cols[-1] == "px_tvmonitor"
    assert schema.names[:9] == [
        "index",
        "path",
        "width",
        "height",
        "status",
        "error",
        "mask_path",
        "model",
        "px_nodata",
    ]
    assert schema.names[9:] == cols
    for row in rows:
        assert row["status"] == "ok" and row["error"] is None
        assert row["model"] == "deeplabv3_mobilenet_v3_large"
        mask = np.asarray(Image.open(row["mask_path"]))
        assert mask.shape == (row["height"], row["width"])
        counts = np.bincount(mask.ravel(), minlength=21)
        assert [row[c] for c in cols] == counts.tolist()
        assert sum(row[c] for c in cols) == row["width"] * row["height"]
    mask_im = Image.open(out / "masks" / "a" / "cat.png")
    assert mask_im.mode == "P" and mask_im.getpalette()[3:6] == [128, 0, 0]
    # Grey, palette, RGBA and 16-bit variants of one photo: converted, not rejected.
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["grey16.png"]["width"] == 600
    # Overlays for the first two inputs only.
    overlays = sorted(
        p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png")
    )
    assert overlays == expected_rel[:2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == {"total": 7, "ok": 7, "error": 0, "not_run": 0}
    total_px = sum(r["width"] * r["height"] for r in rows)
    assert sum(summary["pixels"].values()) == total_px
    assert abs(sum(summary["fractions"].values()) - 1) < 1e-9
    assert set(summary["versions"]) >= {"segbatch", "torch", "torchvision", "ray"}
    assert summary["images_per_s"] > 0
    resolved = yaml.safe_load((out / "job.yaml").read_text())
    assert resolved["inference"]["batch_size"] == 2
    assert resolved["model"]["classes"][:2] == ["__background__", "aeroplane"]


def test_bad_inputs_become_error_rows(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(PHOTOS / "chelsea_cat.png", src / "a_good.png")
    shutil.copy(PHOTOS / "coffee.png", src / "z_good.png")
    (src / "b_empty.png").write_bytes(b"")
    jpeg = (PHOTOS / "astronaut.png").read_bytes()
    Image.open(PHOTOS / "astronaut.png").save(tmp_path / "full.jpg")
    (src / "c_truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:5000])
    (src / "d_text.png").write_text("this is not a png")
    (src / "e_notes.docx").write_bytes(jpeg[:100])
    # Over Pillow's own pixel limit (89,478,485): a tiny file, a huge header.
    Image.new("1", (10_000, 9_000)).save(src / "f_huge.png")
    manifest = tmp_path / "list.txt"
    names = sorted(p.name for p in src.iterdir())
    manifest.write_text("\n".join([*(str(src / n) for n in names), str(src / "g_missing.png")]))
    cfg = job(tmp_path, [str(manifest)], **{"inference.batch_size": 4, "max_error_fraction": 0.9})
    assert run_job(cfg) == 0
    rows = {Path(r["path"]).name: r for r in read_results(tmp_path / "out")}
    assert len(rows) == 8
    assert rows["a_good.png"]["status"] == "ok" and rows["z_good.png"]["status"] == "ok"
    expected = {
        "b_empty.png": "empty",
        "c_truncated.jpg": "truncated",
        "d_text.png": "not an image",
        "e_notes.docx": "unsupported file type",
        "f_huge.png": "input.max_image_pixels",
        "g_missing.png": "not found",
    }
    for name, words in expected.items():
        assert rows[name]["status"] == "error", name
        assert words in rows[name]["error"], (name, rows[name]["error"])
        assert rows[name]["mask_path"] is None and rows[name]["px_background"] is None
    assert (tmp_path / "out" / "masks" / "a_good.png").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"]["ok"] == 2 and summary["images"]["error"] == 6


def test_inputs_whose_names_collide_get_one_mask_each(tmp_path: Path) -> None:
    """Seven inputs whose mask names collide once cleaned and case-folded: seven ok rows, seven
    mask files, each of its own image's size. The output folder lives inside the input folder,
    holding a previous run's files: none of them is an input."""
    src = tmp_path / "in"
    names = [
        "x/img.png",
        "x/img.jpg",
        "x/img~1.png",
        "x/n\nl.png",
        "x/n_l.png",
        "x/A.png",
        "x/a.PNG",
    ]
    sizes = {}
    rng = np.random.default_rng(0)
    for k, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        size = (40 + 8 * k, 32 + 4 * k)  # (width, height): a mask of another image shows
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            src / name, format="JPEG" if name.endswith(".jpg") else "PNG"
        )
        sizes[str(src / name)] = size
    # What a first run left inside the input folder: a second run must not read it.
    out = src / "out"
    (out / "masks" / "x").mkdir(parents=True)
    (out / "job.yaml").write_text("input: {}\n")
    Image.new("L", (5, 5)).save(out / "masks" / "x" / "img.png")
    tiny_unet = {
        "model.name": "unet",
        "model.num_classes": 3,
        "model.unet.depth": 2,
        "model.unet.base_channels": 4,
    }
    cfg = job(
        tmp_path, [str(src)], **{"output.path": str(out), "output.overwrite": True}, **tiny_unet
    )
    assert run_job(cfg) == 0
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(sizes)
    assert all(r["status"] == "ok" for r in rows)
    assert len({r["mask_path"] for r in rows}) == 7
    assert len(list((out / "masks").rglob("*.png"))) == 7
    for r in rows:
        with Image.open(r["mask_path"]) as mask:
            assert mask.size == (r["width"], r["height"]) == sizes[r["path"]], r["path"]


def test_blocks_of_different_image_types_in_one_job(tmp_path: Path) -> None:
    """uint8 photos, a float32 DICOM and error rows land in different blocks (1 row per block
    here); Ray Data must still hand them to the actors together, as one job."""
    pytest.importorskip("pydicom")
    medical = Path(__file__).parent / "data" / "medical"
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(PHOTOS / "chelsea_cat.png", src / "a_cat.png")
    (src / "b_broken.png").write_bytes(b"not a png")
    shutil.copy(medical / "ct_small.dcm", src / "c_ct.dcm")
    (src / "d_broken.png").write_bytes(b"")
    cfg = job(
        tmp_path,
        [str(src)],
        **{"inference.workers": 4, "inference.batch_size": 1, "max_error_fraction": 0.9},
    )
    assert run_job(cfg) == 0
    rows = {Path(r["path"]).name: r for r in read_results(tmp_path / "out")}
    assert {n: r["status"] for n, r in rows.items()} == {
        "a_cat.png": "ok",
        "b_broken.png": "error",
        "c_ct.dcm": "ok",
        "d_broken.png": "error",
    }
    assert rows["c_ct.dcm"]["width"] == rows["c_ct.dcm"]["height"] == 128


def test_error_fraction_above_limit_exits_1(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(PHOTOS / "chelsea_cat.png", src / "good.png")
    for i in range(3):
        (src / f"bad{i}.png").write_text("no")
    cfg = job(tmp_path, [str(src)], **{"max_error_fraction": 0.5})
    assert run_job(cfg) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"]["error"] == 3


def test_user_model_code_is_shipped_to_workers(tmp_path: Path) -> None:
    """A module:callable model from a .py file; logits at half resolution are resized back."""
    code = tmp_path / "code" / "tiny.py"
    code.parent.mkdir()
    code.write_text(
        "import torch\n"
        "class Half(torch.nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.num_classes = num_classes\n"
        "    def forward(self, x):\n"
        "        # class 1 where red beats blue, at half resolution, as a tuple\n"
        "        small = torch.nn.functional.avg_pool2d(x, 2)\n"
        "        score = small[:, :1] - small[:, 2:3]\n"
        "        return (torch.cat([-score, score], 1),)\n"
        "def build(num_classes):\n"
        "    return Half(num_classes)\n"
    )
    src = tmp_path / "in"
    src.mkdir()
    img = np.zeros((32, 48, 3), dtype=np.uint8)
    img[:, :24, 0] = 255  # left half red
    img[:, 24:, 2] = 255  # right half blue
    Image.fromarray(img).save(src / "split.png")
    cfg = job(
        tmp_path,
        [str(src)],
        **{
            "model.name": "tiny:build",
            "model.code_path": str(code),
            "model.weights": "default",
            "model.classes": ["blue", "red"],
            "preprocess.mean": [0.0, 0.0, 0.0],
            "preprocess.std": [1.0, 1.0, 1.0],
        },
    )
    assert run_job(cfg) == 0
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "split.png"))
    assert mask.shape == (32, 48)
    assert (mask[:, :23] == 1).all() and (mask[:, 25:] == 0).all()
    row = read_results(tmp_path / "out")[0]
    assert row["px_red"] + row["px_blue"] == 32 * 48


@pytest.mark.timeout(120)
def test_cuda_without_a_gpu_exits_2_within_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray would wait forever for a GPU actor it cannot place; a local Ray without GPUs is
    refused once Ray is up, before anything is written or deleted (--overwrite of an earlier
    run deletes nothing when the job is refused)."""
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("this Ray has a GPU")
    from segbatch.cli import main

    earlier = tmp_path / "out"
    earlier.mkdir()
    (earlier / "job.yaml").write_text("model: {name: unet}\n")
    (earlier / "summary.json").write_text("{}")
    started = time.perf_counter()
    code = main(
        [
            "run",
            "--input",
            str(PHOTOS / "coffee.png"),
            "--output",
            str(tmp_path / "out"),
            "--weights",
            "none",
            "--device",
            "cuda",
            "--overwrite",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "inference.device is cuda" in err and "sees no GPU" in err
    assert "--device cpu" in err
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out" / "results").exists()
    assert sorted(p.name for p in earlier.iterdir()) == ["job.yaml", "summary.json"]


def test_cuda_on_an_attached_cluster_without_gpus_warns_and_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An attached cluster may start GPU nodes on demand: no refusal, a warning saying so."""
    from segbatch.errors import DeviceUnavailableError
    from segbatch.pipeline import _check_gpus

    cuda = load_job(None, {"inference.device": "cuda", "ray.address": "auto"})
    with caplog.at_level(logging.WARNING, logger="segbatch"):
        _check_gpus(cuda, {"CPU": 8.0})
    assert "waits until GPU nodes join" in caplog.text and "--device cpu" in caplog.text
    # Enough GPUs, or not asking for one: nothing to say; a local Ray without: refused.
    caplog.clear()
    _check_gpus(cuda, {"CPU": 8.0, "GPU": 1.0})
    _check_gpus(load_job(None, {"inference.device": "auto"}), {"CPU": 8.0})
    assert caplog.text == ""
    local = load_job(None, {"inference.device": "cuda", "inference.gpus_per_worker": 2})
    with pytest.raises(DeviceUnavailableError, match="sees 1 GPU;"):
        _check_gpus(local, {"CPU": 8.0, "GPU": 1.0})
