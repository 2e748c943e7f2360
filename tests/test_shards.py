"""Tar and Parquet shards: listing, range reads, rows of one shard read together, a whole job."""

from __future__ import annotations

import io as stdio
import tarfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segbatch import shards
from segbatch.config import InputConfig, load_job
from segbatch.loader import decode_batch, errors_in, read_batch
from segbatch.sources import list_inputs
from tests.conftest import PHOTOS


def png_bytes(name: str, size: tuple[int, int], fmt: str = "PNG") -> bytes:
    im = Image.open(PHOTOS / name).convert("RGB").resize(size)
    buf = stdio.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


# Members in archive order: (name, bytes); None is a directory entry.
MEMBERS: list[tuple[str, bytes | None]] = [
    ("cat.png", png_bytes("chelsea_cat.png", (48, 32))),
    ("sub", None),
    ("sub/coffee.jpg", png_bytes("coffee.png", (40, 30), "JPEG")),
    ("sub/notes.txt", b"not an image"),
    ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
    ("astronaut.png", png_bytes("astronaut.png", (24, 24))),
]
IMAGES = {name: data for name, data in MEMBERS if data is not None}


def tar_bytes() -> bytes:
    buf = stdio.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in MEMBERS:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, stdio.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(with_paths: bool, row_group_rows: int = 2) -> bytes:
    names = ["a/cat.png", "b/coffee.jpg", "broken.png", "astronaut.png", "cat2.png"]
    data = [
        IMAGES["cat.png"],
        IMAGES["sub/coffee.jpg"],
        IMAGES["broken.png"],
        IMAGES["astronaut.png"],
        IMAGES["cat.png"],
    ]
    columns: dict[str, Any] = {"image": pa.array(data, type=pa.binary())}
    if with_paths:
        columns["path"] = pa.array(names)
    columns["label"] = pa.array(range(5))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), buf, row_group_size=row_group_rows)
    return bytes(buf.getvalue().to_pybytes())


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A folder URI: a local tmp folder or a fresh memory:// folder."""
    if request.param == "local":
        return str(tmp_path)
    return f"memory://shards-{uuid.uuid4().hex[:8]}"


def put(uri: str, data: bytes) -> str:
    with fsspec.open(uri, "wb") as fh:
        fh.write(data)
    return uri


def as_batch(items: list[Any], locations: bool = True) -> dict[str, np.ndarray]:
    batch = {
        "index": np.arange(len(items), dtype=np.int64),
        "uri": np.array([it.uri for it in items], dtype=object),
        "rel_path": np.array([it.rel_path for it in items], dtype=object),
        "error": np.array([it.error or "" for it in items], dtype=object),
    }
    if locations:
        batch["offset"] = np.array([-1 if it.offset is None else it.offset for it in items])
        batch["size"] = np.array([-1 if it.size is None else it.size for it in items])
    return batch


def test_split_member() -> None:
    assert shards.split_member("s3://b/x/a.tar#sub/1.png") == ("s3://b/x/a.tar", "sub/1.png")
    assert shards.split_member("/d/s.parquet#row=3") == ("/d/s.parquet", "row=3")
    assert shards.split_member("/d/a#1.png") is None
    assert shards.split_member("/d/a.tar") is None
    assert shards.member_rel_path("x/train-01.tar", "/sub/1.png") == "x/train-01/sub/1.png"


def test_tar_listing_gives_data_ranges(root: str) -> None:
    uri = put(f"{root}/train-0001.tar", tar_bytes())
    members = shards.list_tar(uri)
    assert [m.name for m in members] == [n for n, d in MEMBERS if d is not None]
    raw = tar_bytes()
    for m in members:
        assert m.size is not None
        assert raw[m.offset : m.offset + m.size] == IMAGES[m.name]
        assert shards.read_tar_member(uri, m.offset, m.size) == IMAGES[m.name]


def test_compressed_tar_is_refused_with_a_hint(tmp_path: Path) -> None:
    from segbatch.errors import ConfigError

    path = tmp_path / "x.tar"
    path.write_bytes(b"\x1f\x8b" + b"\x00" * 600)
    with pytest.raises(ConfigError, match="uncompressed tar"):
        shards.list_tar(str(path))


def test_tar_members_become_inputs_and_read_by_range(root: str) -> None:
    put(f"{root}/shards/train-0001.tar", tar_bytes())
    put(f"{root}/shards/train-0002.tar", tar_bytes())
    items = list_inputs(InputConfig(paths=(f"{root}/shards",)))
    # The listing's spelling of the shard (memory:// lists as memory:///).
    uri = items[0].uri.split("#", 1)[0]
    assert uri.endswith("/shards/train-0001.tar")
    first = [it for it in items if it.uri.startswith(uri + "#")]
    assert [it.uri for it in first] == [f"{uri}#{n}" for n, d in MEMBERS if d is not None]
    assert [it.rel_path for it in items[:2]] == ["train-0001/cat.png", "train-0001/sub/coffee.jpg"]
    # Members of the second shard get their own folder: no mask collides.
    assert len({it.rel_path for it in items}) == len(items) == 10
    by_name = {it.uri.split("#", 1)[1]: it for it in first}
    assert "unsupported file type (.txt)" in (by_name["sub/notes.txt"].error or "")
    assert all(by_name[n].error is None for n in ("cat.png", "broken.png", "astronaut.png"))

    for locations in (True, False):  # from the listing, or looked up in the shard's index
        read = read_batch(as_batch(first, locations))
        errors = errors_in(read["error"])
        for i, it in enumerate(first):
            name = it.uri.split("#", 1)[1]
            if it.error is None:
                assert read["data"][i] == IMAGES[name], (name, locations)
                assert errors[i] is None
        decoded = decode_batch(read)
        errors = errors_in(decoded["error"])
        sizes = {
            it.uri.split("#", 1)[1]: (int(decoded["width"][i]), int(decoded["height"][i]))
            for i, it in enumerate(first)
        }
        assert sizes["cat.png"] == (48, 32) and sizes["sub/coffee.jpg"] == (40, 30)
        assert sizes["astronaut.png"] == (24, 24)
        # The corrupt member is an error row; the rest of the batch decoded.
        bad = next(i for i, it in enumerate(first) if it.uri.endswith("#broken.png"))
        assert errors[bad] is not None and "image" in errors[bad]
        assert sum(e is None for e in errors) == 3


def test_missing_member_is_an_error_row(tmp_path: Path) -> None:
    uri = put(str(tmp_path / "a.tar"), tar_bytes())
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{uri}#cat.png\n{uri}#nope.png\n")
    items = list_inputs(InputConfig(paths=(str(manifest),)))
    assert [it.rel_path for it in items] == ["a/cat.png", "a/nope.png"]
    read = read_batch(as_batch(items, locations=False))
    errors = errors_in(read["error"])
    assert read["data"][0] == IMAGES["cat.png"] and errors[0] is None
    assert errors[1] is not None and "not in shard" in errors[1]


@pytest.mark.parametrize("with_paths", [True, False])
def test_parquet_shard_rows_read_each_row_group_once(
    root: str, with_paths: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = list_inputs(
        InputConfig(paths=(put(f"{root}/part-7.parquet", parquet_bytes(with_paths)),))
    )
    uri = items[0].uri.split("#", 1)[0]
    assert uri.endswith("/part-7.parquet")
    names = (
        ["a/cat.png", "b/coffee.jpg", "broken.png", "astronaut.png", "cat2.png"]
        if with_paths
        else [f"row={i}" for i in range(5)]
    )
    assert [it.uri for it in items] == [f"{uri}#{n}" for n in names]
    assert [it.rel_path for it in items] == [f"part-7/{n}" for n in names]
    assert [it.offset for it in items] == list(range(5))

    calls: list[int] = []
    original = pq.ParquetFile.read_row_group

    def counting(self: pq.ParquetFile, i: int, *args: Any, **kwargs: Any) -> pa.Table:
        calls.append(i)
        assert kwargs.get("columns") == ["image"]  # never the other columns
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    for locations in (True, False):
        calls.clear()
        read = read_batch(as_batch(items, locations))
        assert sorted(calls) == [0, 1, 2]  # 5 rows in groups of 2: each group read once
        assert [bytes(d) for d in read["data"]] == [
            IMAGES["cat.png"],
            IMAGES["sub/coffee.jpg"],
            IMAGES["broken.png"],
            IMAGES["astronaut.png"],
            IMAGES["cat.png"],
        ]
    decoded = decode_batch(read)
    errors = errors_in(decoded["error"])
    assert [e is None for e in errors] == [True, True, False, True, True]
    assert int(decoded["width"][3]) == 24


def test_parquet_format_and_columns(tmp_path: Path) -> None:
    from segbatch.errors import ConfigError

    shard = put(str(tmp_path / "in" / "s.parquet"), parquet_bytes(True))
    # A folder of Parquet shards is expanded when they hold the image column.
    items = list_inputs(InputConfig(paths=(str(tmp_path / "in"),)))
    assert len(items) == 5 and items[0].uri == f"{shard}#a/cat.png"
    # Without the image column, auto reads the file as a manifest of paths.
    renamed = InputConfig(paths=(shard,), image_column="pixels", path_column="uri")
    with pytest.raises(ConfigError, match=r"manifest .* has no 'uri' column"):
        list_inputs(renamed)
    forced = InputConfig(paths=(shard,), image_column="pixels", format="parquet")
    with pytest.raises(ConfigError, match="no image column 'pixels'"):
        list_inputs(forced)


@pytest.mark.usefixtures("ray_session")
def test_whole_job_on_a_tar_shard(tmp_path: Path) -> None:
    from segbatch.pipeline import run_job

    shard = put(str(tmp_path / "in" / "train-0001.tar"), tar_bytes())
    out = tmp_path / "out"
    cfg = load_job(
        None,
        {
            "input.paths": [str(tmp_path / "in")],
            "output.path": str(out),
            "model.name": "lraspp_mobilenet_v3_large",
            "model.weights": "none",
            "inference.device": "cpu",
            "inference.batch_size": 2,
            "max_error_fraction": 0.9,
        },
    )
    assert run_job(cfg) == 0
    rows = [r for p in sorted(out.glob("results/*.parquet")) for r in pq.read_table(p).to_pylist()]
    names = [n for n, d in MEMBERS if d is not None]
    assert [r["path"] for r in rows] == [f"{shard}#{n}" for n in names]
    status = {r["path"].split("#", 1)[1]: r for r in rows}
    for name in ("cat.png", "sub/coffee.jpg", "astronaut.png"):
        row = status[name]
        assert row["status"] == "ok", row["error"]
        mask = np.asarray(Image.open(out / "masks" / "train-0001" / Path(name).with_suffix(".png")))
        assert mask.shape == (row["height"], row["width"])
        assert row["mask_path"].endswith(f"masks/train-0001/{Path(name).with_suffix('.png')}")
        assert sum(v for k, v in row.items() if k.startswith("px_") and k != "px_nodata") == (
            row["width"] * row["height"]
        )
    assert status["broken.png"]["status"] == "error"
    assert "unsupported" in status["sub/notes.txt"]["error"]
