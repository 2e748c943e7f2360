"""Outputs (segbatch.sinks): the results schema and writer, mask files, the output root."""

from __future__ import annotations

import errno
import io as stdio
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segbatch import io
from segbatch.errors import (
    NotSegbatchOutputError,
    OutputExistsError,
    OutputNotWritableError,
    OutputPathError,
    OutputWriteError,
    SegbatchUsageError,
    UnsafePathError,
)
from segbatch.overlays import flat_palette
from segbatch.sinks import (
    ResultsWriter,
    encode_mask_png,
    free_space,
    is_storage_full,
    mask_rel_path,
    prepare_output,
    read_done,
    results_schema,
    table_from_rows,
    write_mask,
    write_summary,
)

BASE = ["index", "path", "width", "height", "status", "error", "mask_path", "model", "px_nodata"]
CLASSES = ["__background__", "Road", "potted plant"]


def _row(i: int, **extra: Any) -> dict[str, Any]:
    return {"index": i, "path": f"img{i}.png", "status": "ok", "model": "m", **extra}


def test_results_schema_base_and_classes() -> None:
    schema = results_schema(CLASSES)
    assert schema.names == [*BASE, "px_background", "px_road", "px_potted_plant"]
    for name in ("px_background", "px_road", "px_potted_plant", "index", "width", "px_nodata"):
        assert schema.field(name).type == pa.int64()
    for name in ("path", "status", "error", "mask_path", "model"):
        assert schema.field(name).type == pa.string()
    assert not schema.field("index").nullable
    assert not schema.field("path").nullable
    assert schema.field("error").nullable
    assert json.loads(schema.metadata[b"segbatch.classes"]) == CLASSES


def test_results_schema_optional_groups() -> None:
    schema = results_schema(CLASSES, geo=True, dicom=True, volumes=True, component_classes=["Road"])
    names = schema.names
    assert names[: len(BASE)] == BASE
    geo = ["crs", "bounds_left", "bounds_bottom", "bounds_right", "bounds_top"]
    assert names.index("crs") < names.index("pixel_size_y") < names.index("area_m2_background")
    assert all(n in names for n in geo)
    assert [n for n in names if n.startswith("area_m2_")] == [
        "area_m2_background",
        "area_m2_road",
        "area_m2_potted_plant",
    ]
    assert [n for n in names if n.startswith("area_mm2_")] == [
        "area_mm2_background",
        "area_mm2_road",
        "area_mm2_potted_plant",
    ]
    assert [n for n in names if n.startswith("volume_ml_")] == [
        "volume_ml_background",
        "volume_ml_road",
        "volume_ml_potted_plant",
    ]
    assert "study_instance_uid" in names
    assert schema.field("instance_number").type == pa.int64()
    assert schema.field("area_m2_road").type == pa.float64()
    assert schema.field("volume_ml_road").type == pa.float64()
    assert [n for n in names if n.startswith("n_")] == ["n_road"]
    assert schema.field("n_road").type == pa.int64()
    assert len(set(names)) == len(names)


def test_results_schema_without_groups_has_none_of_them() -> None:
    names = results_schema(CLASSES).names
    assert not [n for n in names if n.startswith(("area_", "volume_", "n_", "bounds_"))]
    assert "crs" not in names


def test_table_from_rows_fills_missing_with_null() -> None:
    schema = results_schema(CLASSES)
    rows = [_row(0, width=4, height=3, px_road=12), _row(1, status="error", error="bad")]
    table = table_from_rows(rows, schema)
    assert table.schema.equals(schema, check_metadata=True)
    data = table.to_pydict()
    assert data["index"] == [0, 1]
    assert data["width"] == [4, None]
    assert data["px_road"] == [12, None]
    assert data["error"] == [None, "bad"]
    assert data["px_background"] == [None, None]
    assert data["mask_path"] == [None, None]


def _read_part(path: Path) -> dict[str, list[Any]]:
    return pq.read_table(path).to_pydict()


def test_results_writer_parts_by_index(tmp_path: Path) -> None:
    schema = results_schema(CLASSES)
    writer = ResultsWriter(str(tmp_path), schema, total=7, rows_per_file=3)
    order = [5, 1, 6, 0, 3, 2, 4]
    results = tmp_path / "results"
    written_after: list[list[str]] = []
    for i in order:
        writer.add(_row(i, px_road=i * 10))
        written_after.append(sorted(p.name for p in results.glob("*")) if results.exists() else [])
    # part 2 (index 6) is complete after the third row; part 0 after index 2; part 1 last.
    assert written_after == [
        [],
        [],
        ["part-00002.parquet"],
        ["part-00002.parquet"],
        ["part-00002.parquet"],
        ["part-00000.parquet", "part-00002.parquet"],
        ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"],
    ]
    assert writer.written == [writer.part_uri(p) for p in (2, 0, 1)]
    assert writer.part_uri(1) == f"{tmp_path}/results/part-00001.parquet"
    assert _read_part(results / "part-00000.parquet")["index"] == [0, 1, 2]
    assert _read_part(results / "part-00001.parquet")["index"] == [3, 4, 5]
    assert _read_part(results / "part-00001.parquet")["px_road"] == [30, 40, 50]
    assert _read_part(results / "part-00002.parquet")["index"] == [6]
    whole = pq.read_table(results)
    assert sorted(whole.column("index").to_pylist()) == list(range(7))
    assert json.loads(whole.schema.metadata[b"segbatch.classes"]) == CLASSES
    writer.close()  # nothing pending: writes nothing more
    assert len(writer.written) == 3
    assert sorted(p.name for p in results.iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]  # and no temporary files


def test_results_writer_is_deterministic(tmp_path: Path) -> None:
    schema = results_schema(["a", "b"])
    contents = []
    for seed in (1, 2):
        out = tmp_path / str(seed)
        writer = ResultsWriter(str(out), schema, total=10, rows_per_file=4)
        order = list(range(10))
        random.Random(seed).shuffle(order)
        for i in order:
            writer.add(_row(i))
        writer.close()
        names = sorted(p.name for p in (out / "results").iterdir())
        contents.append([(n, _read_part(out / "results" / n)) for n in names])
    assert [n for n, _ in contents[0]] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert contents[0] == contents[1]


def test_results_writer_close_flushes_partial_parts(tmp_path: Path) -> None:
    writer = ResultsWriter(str(tmp_path), results_schema(["a"]), total=6, rows_per_file=3)
    for i in (4, 0, 2):  # an early stop: no part is complete
        writer.add(_row(i))
    assert not (tmp_path / "results").exists()
    writer.close()
    assert _read_part(tmp_path / "results" / "part-00000.parquet")["index"] == [0, 2]
    assert _read_part(tmp_path / "results" / "part-00001.parquet")["index"] == [4]
    assert writer.pending == {}


def test_results_writer_resume_keeps_previous_ok_rows(tmp_path: Path) -> None:
    """On resume only some rows are still to come: a part is complete when those arrived, and
    it keeps its previous ok rows while the error row it replaces is gone."""
    schema = results_schema(["a"])
    first = ResultsWriter(str(tmp_path), schema, total=6, rows_per_file=3)
    for i in range(6):
        row = dict(_row(i))
        if i == 4:
            row.update(status="error", error="boom", mask_path=None)
        first.add(row)
    todo = np.zeros(6, dtype=bool)
    todo[4] = True
    again = ResultsWriter(str(tmp_path), schema, total=6, rows_per_file=3, todo=todo)
    assert again.expected == {1: 1}
    again.add(_row(4))
    part = _read_part(tmp_path / "results" / "part-00001.parquet")
    assert part["index"] == [3, 4, 5]
    assert part["status"] == ["ok", "ok", "ok"]


def test_results_writer_keeps_a_repeated_row_once(tmp_path: Path) -> None:
    writer = ResultsWriter(str(tmp_path), results_schema(["a"]), total=3, rows_per_file=3)
    writer.add(_row(0))
    writer.add(_row(0))  # a retried task delivering its rows again
    assert not (tmp_path / "results").exists()
    writer.add(_row(1))
    writer.add(_row(2))
    assert _read_part(tmp_path / "results" / "part-00000.parquet")["index"] == [0, 1, 2]


def test_results_writer_ignores_a_row_of_a_complete_part(tmp_path: Path) -> None:
    """A retried task delivering a row again after its part was written must not start the part
    anew: close() would then overwrite the complete file with that one row."""
    writer = ResultsWriter(str(tmp_path), results_schema(["a"]), total=6, rows_per_file=3)
    for i in range(3):
        writer.add(_row(i))
    writer.add(_row(1))  # part 0 is complete; its row 1 arrives again
    writer.add(_row(3))
    writer.close()
    assert _read_part(tmp_path / "results" / "part-00000.parquet")["index"] == [0, 1, 2]
    assert _read_part(tmp_path / "results" / "part-00001.parquet")["index"] == [3]


def test_results_writer_memory(memfs: Any) -> None:
    writer = ResultsWriter("memory://out", results_schema(["a"]), total=2, rows_per_file=5)
    writer.add(_row(1))
    writer.add(_row(0))
    data = io.read_bytes("memory://out/results/part-00000.parquet")
    assert pq.read_table(stdio.BytesIO(data)).column("index").to_pylist() == [0, 1]


def test_prepare_output_missing_or_empty_is_fine(tmp_path: Path) -> None:
    prepare_output(str(tmp_path / "new"), overwrite=False, resume=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    prepare_output(str(tmp_path / "empty"), overwrite=False, resume=False)


def _write_part(path: Path, mask_paths: list[str | None]) -> None:
    """A results part whose rows name ``mask_paths`` (None: an error row)."""
    rows = [
        _row(i, mask_path=m) if m else _row(i, status="error", error="bad")
        for i, m in enumerate(mask_paths)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table_from_rows(rows, results_schema(["a"])), path)


def _fill_output(root: Path) -> None:
    for name in [
        "masks/a.png",
        "overlays/a.png",
        "summary.json",
        "job.yaml",
        "notes.txt",
        "mine/keep.png",
    ]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    _write_part(root / "results" / "part-00000.parquet", [f"{root}/masks/a.png"])


def test_prepare_output_refuses_non_empty(tmp_path: Path) -> None:
    _fill_output(tmp_path)
    with pytest.raises(OutputExistsError) as info:
        prepare_output(str(tmp_path), overwrite=False, resume=False)
    assert "--overwrite" in str(info.value)
    assert isinstance(info.value, FileExistsError)
    assert (tmp_path / "masks" / "a.png").exists()


def test_prepare_output_overwrite_removes_only_own_outputs(tmp_path: Path) -> None:
    _fill_output(tmp_path)
    prepare_output(str(tmp_path), overwrite=True, resume=False)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["mine", "mine/keep.png", "notes.txt"]


def test_prepare_output_resume_keeps_everything(tmp_path: Path) -> None:
    _fill_output(tmp_path)
    prepare_output(str(tmp_path), overwrite=False, resume=True)
    assert (tmp_path / "results" / "part-00000.parquet").exists()
    assert (tmp_path / "summary.json").exists()


def test_prepare_output_on_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        prepare_output(str(tmp_path / "f"), overwrite=True, resume=False)


def test_prepare_output_memory(memfs: Any) -> None:
    memfs.pipe("/out/job.yaml", b"output: {path: 'memory://out'}\n")
    memfs.pipe("/out/masks/a.png", b"x")
    memfs.pipe("/out/masks/mine.png", b"x")
    memfs.pipe("/out/other.txt", b"x")
    buf = pa.BufferOutputStream()
    rows = [_row(0, mask_path="memory://out/masks/a.png")]
    pq.write_table(table_from_rows(rows, results_schema(["a"])), buf)
    memfs.pipe("/out/results/part-00000.parquet", buf.getvalue().to_pybytes())
    with pytest.raises(OutputExistsError):
        prepare_output("memory://out", overwrite=False, resume=False)
    prepare_output("memory://out", overwrite=True, resume=False)
    assert io.list_files("memory://out") == [
        "memory:///out/masks/mine.png",
        "memory:///out/other.txt",
    ]


def test_overwrite_refuses_an_output_segbatch_did_not_write(tmp_path: Path) -> None:
    """No OUT/job.yaml: nothing there is segbatch's, whatever the folder names say."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "thesis.docx").write_bytes(b"chapter 1")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "ground_truth.png").write_bytes(b"labels")
    with pytest.raises(OutputExistsError, match=r"no job\.yaml") as info:
        prepare_output(str(tmp_path), overwrite=True, resume=False)
    assert "empty or new --output" in str(info.value)
    assert (tmp_path / "results" / "thesis.docx").read_bytes() == b"chapter 1"
    assert (tmp_path / "masks" / "ground_truth.png").read_bytes() == b"labels"


def test_overwrite_deletes_only_the_files_segbatch_wrote(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ours = [
        "job.yaml",
        "summary.json",
        "masks/a.png",
        "masks/sub/b.tif",
        "masks/vol.nii.gz",
        "masks/scan/frame_00001.png",  # a multi-frame DICOM: its row names the folder
        "masks/scan/frame_00002.png",
        "overlays/a.png",
        "overlays/sub/b.png",
        "masks/.a.png.tmp-0123abcd",  # temps a killed run left
        "masks/sub/.c.tif.0123456789abcdef0123456789abcdef.tmp",
        "results/.part-00001.parquet.tmp-deadbeef",
        ".summary.json.tmp-00ff00ff",
    ]
    theirs = [
        "notes.txt",
        "masks/ground_truth.png",  # no row names it
        "masks/scan/notes.txt",
        "masks/sub/.hidden.tmp",
        "results/thesis.docx",
        "results/extra.parquet",  # not segbatch's part name
        "overlays/mine.png",
    ]
    for name in ours + theirs:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    # Rows written by a run whose output was spelled differently (job.yaml records it).
    first_root = "./somewhere/../out-as-written"
    (out / "job.yaml").write_text(f"output:\n  path: {first_root}\n")
    _write_part(
        out / "results" / "part-00000.parquet",
        [f"{first_root}/masks/a.png", f"{out}/masks/sub/b.tif", None],
    )
    _write_part(
        out / "results" / "part-00001.parquet",
        [
            f"{out}/masks/vol.nii.gz",
            f"{out}/masks/scan",
            f"{tmp_path}/elsewhere/masks/notes.txt",  # outside OUT: never deleted
        ],
    )
    (tmp_path / "elsewhere" / "masks").mkdir(parents=True)
    (tmp_path / "elsewhere" / "masks" / "notes.txt").write_bytes(b"x")
    prepare_output(str(out), overwrite=True, resume=False)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == sorted(theirs)
    # Folders left empty are gone; those still holding the user's files stay.
    assert not (out / "overlays" / "sub").exists()
    assert (out / "masks" / "sub").is_dir() and (out / "masks" / "scan").is_dir()
    assert (tmp_path / "elsewhere" / "masks" / "notes.txt").exists()


def test_overwrite_removes_folders_left_empty(tmp_path: Path) -> None:
    _write_part(tmp_path / "results" / "part-00000.parquet", [f"{tmp_path}/masks/d/a.png"])
    (tmp_path / "masks" / "d").mkdir(parents=True)
    (tmp_path / "masks" / "d" / "a.png").write_bytes(b"x")
    (tmp_path / "job.yaml").write_text("output: {}\n")
    prepare_output(str(tmp_path), overwrite=True, resume=False)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_refuses_an_unreadable_part(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("output: {}\n")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"x")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(OutputExistsError, match="cannot be read"):
        prepare_output(str(tmp_path), overwrite=True, resume=False)
    assert (tmp_path / "masks" / "a.png").exists() and (tmp_path / "job.yaml").exists()


@pytest.mark.parametrize("make", ["missing", "empty", "user files"])
def test_resume_refuses_an_output_without_job_yaml(tmp_path: Path, make: str) -> None:
    out = tmp_path / "out"
    if make != "missing":
        out.mkdir()
    if make == "user files":
        (out / "masks").mkdir()
        (out / "masks" / ".draft.png.tmp-0123abcd").write_bytes(b"mine")
    with pytest.raises(NotSegbatchOutputError, match=r"no job\.yaml") as info:
        prepare_output(str(out), overwrite=False, resume=True)
    assert isinstance(info.value, SegbatchUsageError)
    assert "without --resume" in str(info.value)
    if make == "user files":
        assert (out / "masks" / ".draft.png.tmp-0123abcd").exists()


def test_resume_removes_stale_temps_in_segbatch_folders_only(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("output: {}\n")
    stale = [
        ".job.yaml.tmp-0123abcd",
        "results/.part-00000.parquet.tmp-0123abcd",
        "masks/a/b/.c.png.tmp-0123abcd",
        "masks/a/.d.tif.0123456789abcdef0123456789abcdef.tmp",
        "overlays/x/.y.png.tmp-0123abcd",
    ]
    kept = [
        "home/user/.bashrc.tmp-0123abcd",  # OUT is someone's home: not segbatch's folder
        "results/deep/.p.parquet.tmp-0123abcd",  # results/ is flat
        "masks/.e.png.tmp-XYZ",  # not segbatch's temp name
        "masks/a.png",
    ]
    for name in stale + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    prepare_output(str(tmp_path), overwrite=False, resume=True)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([*kept, "job.yaml"])


def test_output_below_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "report.pdf").write_bytes(b"%PDF")
    with pytest.raises(OutputPathError, match=r"report\.pdf") as info:
        prepare_output(str(tmp_path / "report.pdf" / "out" / "run1"), False, False)
    assert isinstance(info.value, SegbatchUsageError)
    assert (tmp_path / "report.pdf").read_bytes() == b"%PDF"


def test_output_on_a_read_only_filesystem_is_refused() -> None:
    # /sys is mounted read-only (or refuses new files) even for root; the probe must notice.
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    with pytest.raises(OutputNotWritableError, match="not writable") as info:
        prepare_output("/sys/segbatch-out", overwrite=False, resume=False)
    assert "'/sys'" in str(info.value)
    assert isinstance(info.value, SegbatchUsageError)


def test_output_not_writable_is_refused_when_the_probe_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    real_open = os.open

    def read_only(path: str, flags: int, mode: int = 0o777) -> int:
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputNotWritableError, match="Read-only file system"):
        prepare_output(str(tmp_path / "out"), overwrite=False, resume=False)


def test_cli_refuses_an_unwritable_output_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from segbatch import pipeline
    from segbatch.cli import main
    from tests.conftest import PHOTOS

    def no_ray(job: Any) -> None:
        raise AssertionError("Ray must not start for an output that cannot be written")

    monkeypatch.setattr(pipeline, "_init_ray", no_ray)
    (tmp_path / "file").write_text("x")
    argv = ["run", "--input", str(PHOTOS), "--output", str(tmp_path / "file" / "out")]
    assert main([*argv, "--model", "unet", "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and str(tmp_path / "file") in err


@pytest.mark.parametrize(
    ("rel", "suffix", "expected"),
    [
        ("a/b/c.JPG", ".png", "a/b/c.png"),
        ("photo.jpeg", ".png", "photo.png"),
        ("x.nii.gz", ".nii.gz", "x.nii.gz"),
        ("dir/X.NII.GZ", ".nii.gz", "dir/X.nii.gz"),
        ("scan.nii.gz", ".png", "scan.png"),
        ("scene.tif", ".tif", "scene.tif"),
        ("noext", ".png", "noext.png"),
        ("v1.2/img", ".png", "v1.2/img.png"),
        ("x~1.png", ".png", "x~1.png"),
        ("../../etc/passwd", ".png", "etc/passwd.png"),
        ("C:\\data\\a.PNG", ".png", "data/a.png"),
    ],
)
def test_mask_rel_path(rel: str, suffix: str, expected: str) -> None:
    assert mask_rel_path(rel, suffix) == expected


def test_encode_mask_png_uint8_palette_round_trip() -> None:
    mask = np.random.default_rng(0).integers(0, 21, size=(13, 17), dtype=np.uint8)
    mask[0, 0] = 255
    data = encode_mask_png(mask, 21)
    with Image.open(stdio.BytesIO(data)) as im:
        assert im.format == "PNG"
        assert im.mode == "P"
        assert im.getpalette() == flat_palette(21)
        np.testing.assert_array_equal(np.asarray(im), mask)


def test_encode_mask_png_uint16_round_trip() -> None:
    mask = np.random.default_rng(1).integers(0, 1000, size=(9, 11), dtype=np.uint16)
    mask[0, :3] = [0, 999, 65535]
    data = encode_mask_png(mask, 1000)
    with Image.open(stdio.BytesIO(data)) as im:
        assert im.mode in ("I;16", "I")
        np.testing.assert_array_equal(np.asarray(im).astype(np.int64), mask.astype(np.int64))
    # The PNG header says 16 bits per sample, grey.
    assert data[24] == 16
    assert data[25] == 0


def test_write_mask_stays_under_root(tmp_path: Path) -> None:
    out = tmp_path / "out"
    mask = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    for rel in ["../../evil.png", "/abs/x.JPG", "sub/../../y.png", "a\x00b.png"]:
        uri = write_mask(str(out), rel, mask, 3)
        assert uri.startswith(f"{out}/masks/")
        assert Path(uri).is_file()
        with Image.open(uri) as im:
            np.testing.assert_array_equal(np.asarray(im), mask)
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [
        "out/masks/a_b.png",
        "out/masks/abs/x.png",
        "out/masks/evil.png",
        "out/masks/sub/y.png",
    ]
    with pytest.raises(UnsafePathError):
        write_mask(str(out), "..", mask, 3)


def test_write_mask_memory(memfs: Any) -> None:
    mask = np.full((3, 3), 2, dtype=np.uint8)
    uri = write_mask("memory://out", "a/b.jpg", mask, 3)
    assert uri == "memory://out/masks/a/b.png"
    with Image.open(stdio.BytesIO(io.read_bytes(uri))) as im:
        np.testing.assert_array_equal(np.asarray(im), mask)


def test_write_summary(tmp_path: Path) -> None:
    write_summary(str(tmp_path), {"ok": 3, "classes": ["a", "b"]})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"ok": 3, "classes": ["a", "b"]}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def _full_disk_after(monkeypatch: pytest.MonkeyPatch, n_ok: int) -> list[str]:
    """Let ``n_ok`` atomic writes through, then fail every write as a full disk does."""
    real = io.write_bytes_atomic
    done: list[str] = []

    def write(uri: str, data: bytes, storage_options: Any = None, retries: int = 5) -> None:
        if len(done) >= n_ok:
            raise OSError(errno.ENOSPC, "No space left on device", uri)
        real(uri, data, storage_options, retries)
        done.append(uri)

    monkeypatch.setattr(io, "write_bytes_atomic", write)
    return done


def test_results_writer_keeps_rows_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = ResultsWriter(str(tmp_path), results_schema(["a"]), total=6, rows_per_file=3)
    _full_disk_after(monkeypatch, n_ok=1)
    for i in (0, 1, 2):
        writer.add(_row(i))  # part 0 is written
    writer.add(_row(3))
    writer.add(_row(4))
    with pytest.raises(OutputWriteError) as info:
        writer.add(_row(5))
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert f"{tmp_path}/results/part-00001.parquet" in message
    assert "No space left on device" in message
    assert re.search(r"\d+\.\d (B|KiB|MiB|GiB|TiB) free on /", message), message
    assert "--resume" in message
    # The rows of the part that failed are still there; the part written before is intact.
    assert sorted(writer.pending) == [1] and sorted(writer.pending[1]) == [3, 4, 5]
    assert _read_part(tmp_path / "results" / "part-00000.parquet")["index"] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["part-00000.parquet"]
    with pytest.raises(OutputWriteError):
        writer.close()  # still full: still kept
    assert sorted(writer.pending[1]) == [3, 4, 5]
    monkeypatch.undo()  # room again
    writer.close()
    assert _read_part(tmp_path / "results" / "part-00001.parquet")["index"] == [3, 4, 5]
    assert writer.pending == {}


def test_storage_full_is_recognised_also_when_wrapped() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    assert is_storage_full(full)
    assert is_storage_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        raise RuntimeError("write failed") from full
    except RuntimeError as exc:
        assert is_storage_full(exc)
    assert not is_storage_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_storage_full(ValueError("x"))


def test_free_space_of_a_local_path(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    text = free_space(str(tmp_path / "not" / "yet" / "made"))
    number, unit, rest = text.split(" ", 2)
    scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
    assert rest == f"free on {tmp_path}"
    assert abs(float(number) * scale - free) <= 0.05 * scale + 2**20
    assert free_space("s3://bucket/out") == ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_results_writer_flushes_a_filling_part_every_flush_every_s(tmp_path: Path) -> None:
    clock = FakeClock()
    schema = results_schema(["a"])
    writer = ResultsWriter(
        str(tmp_path), schema, total=10, rows_per_file=100, flush_every_s=30, clock=clock
    )
    part = tmp_path / "results" / "part-00000.parquet"
    for i in (3, 0, 1):
        writer.add(_row(i, px_a=i))
        clock.now += 9.0
    assert not part.exists()  # 27 s: not yet
    clock.now += 3.0
    writer.add(_row(7, px_a=7))  # 30 s after the start: every row so far goes to the part
    assert _read_part(part)["index"] == [0, 1, 3, 7]
    assert _read_part(part)["px_a"] == [0, 1, 3, 7]
    assert sorted(writer.pending[0]) == [0, 1, 3, 7]  # kept until the part is complete
    clock.now += 29.0
    writer.add(_row(2))
    assert _read_part(part)["index"] == [0, 1, 3, 7]  # 29 s after that flush: not yet
    clock.now += 1.0
    writer.add(_row(4))
    assert _read_part(part)["index"] == [0, 1, 2, 3, 4, 7]
    for i in (5, 6, 8, 9):
        writer.add(_row(i, px_a=i))
    assert writer.pending == {}
    # The complete part is the very file a writer without flushes writes.
    plain = ResultsWriter(str(tmp_path / "plain"), schema, total=10, rows_per_file=100)
    for i in (3, 0, 1, 7, 2, 4, 5, 6, 8, 9):
        plain.add(_row(i, px_a=i if i not in (2, 4) else None))
    assert part.read_bytes() == (tmp_path / "plain" / "results" / "part-00000.parquet").read_bytes()
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["part-00000.parquet"]


def test_results_writer_flushes_every_flush_every_rows(tmp_path: Path) -> None:
    writer = ResultsWriter(
        str(tmp_path),
        results_schema(["a"]),
        total=20,
        rows_per_file=10,
        flush_every_rows=3,
        clock=FakeClock(),  # never advances: only the row count flushes
    )
    results = tmp_path / "results"
    for i in (0, 10, 1):
        writer.add(_row(i))
    # Three rows since the start: both parts still filling are written with what they have.
    assert _read_part(results / "part-00000.parquet")["index"] == [0, 1]
    assert _read_part(results / "part-00001.parquet")["index"] == [10]
    writer.add(_row(2))
    writer.add(_row(3))
    assert _read_part(results / "part-00000.parquet")["index"] == [0, 1]
    writer.add(_row(4))
    assert _read_part(results / "part-00000.parquet")["index"] == [0, 1, 2, 3, 4]
    assert _read_part(results / "part-00001.parquet")["index"] == [10]


def test_resume_from_a_flushed_part_runs_only_the_rest(tmp_path: Path) -> None:
    """A driver killed after a flush: the part's ok rows count as done, its error row and the
    inputs without a row run again, and the finished part equals an uninterrupted run's."""
    schema = results_schema(["a"])
    clock = FakeClock()
    first = ResultsWriter(
        str(tmp_path), schema, total=8, rows_per_file=100, flush_every_s=30, clock=clock
    )
    first.add(_row(0, px_a=0))
    first.add(_row(1, status="error", error="boom"))
    first.add(_row(5, px_a=5))
    clock.now += 30
    first.add(_row(2, px_a=2))  # flushed: rows 0, 1, 2, 5; then the driver dies
    first.add(_row(3, px_a=3))
    paths = [f"img{i}.png" for i in range(8)]
    done = read_done(str(tmp_path), paths)
    assert np.flatnonzero(done).tolist() == [0, 2, 5]
    again = ResultsWriter(str(tmp_path), schema, total=8, rows_per_file=100, todo=~done)
    for i in (7, 1, 3, 6, 4):
        again.add(_row(i, px_a=i))
    part = tmp_path / "results" / "part-00000.parquet"
    assert _read_part(part)["index"] == list(range(8))
    plain = ResultsWriter(str(tmp_path / "plain"), schema, total=8, rows_per_file=100)
    for i in range(8):
        plain.add(_row(i, px_a=i))
    assert part.read_bytes() == (tmp_path / "plain" / "results" / "part-00000.parquet").read_bytes()
