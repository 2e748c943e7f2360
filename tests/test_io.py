"""The fsspec helper (segbatch.io): safe paths, atomic writes, retries, missing backends."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from segbatch import io
from segbatch.errors import MissingDependencyError, UnsafePathError


@pytest.fixture
def retry_count() -> Iterator[None]:
    io.RETRIES.take()
    yield
    io.RETRIES.take()


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("a/b.png", "a/b.png"),
        ("../../etc/passwd", "etc/passwd"),
        ("/abs/x.png", "abs/x.png"),
        ("C:\\a\\b.png", "a/b.png"),
        ("c:/a/b.png", "a/b.png"),
        ("\\\\server\\share\\x.png", "server/share/x.png"),
        ("a/../../b.png", "a/b.png"),
        ("./a//b.png", "a/b.png"),
        ("a/./b/../c.png", "a/b/c.png"),
        ("a\x00b\x1f.png", "a_b_.png"),
        ("dir\n/x\r.png", "dir_/x_.png"),
        ("...", "..."),  # a legal (if odd) name, not a parent reference
    ],
)
def test_safe_relpath(rel: str, expected: str) -> None:
    got = io.safe_relpath(rel)
    assert got == expected
    parts = got.split("/")
    assert ".." not in parts
    assert not got.startswith("/")
    assert all(ord(c) >= 0x20 for c in got)


@pytest.mark.parametrize("rel", ["..", "", "/", "./..", "C:\\", "../.././"])
def test_safe_relpath_rejects_names_with_no_file(rel: str) -> None:
    with pytest.raises(UnsafePathError):
        io.safe_relpath(rel)


@pytest.mark.parametrize(
    "rel",
    ["../../etc/passwd", "/abs/x.png", "C:\\a\\b.png", "a/../../b.png", "./a//b.png", "x\x00.png"],
)
@pytest.mark.parametrize("root", ["/srv/out", "out", "s3://bucket/out", "memory://out/"])
def test_under_root_stays_under_root(root: str, rel: str) -> None:
    got = io.under_root(root, rel)
    prefix = root.rstrip("/") + "/"
    assert got.startswith(prefix)
    assert ".." not in got[len(prefix) :].split("/")
    assert got == prefix + io.safe_relpath(rel)


def test_under_root_rejects_empty_names() -> None:
    with pytest.raises(UnsafePathError):
        io.under_root("/srv/out", "..")


def test_under_root_current_directory() -> None:
    assert io.under_root(".", "a.png") == "./a.png"


def test_write_bytes_atomic_writes_and_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "x.bin"
    io.write_bytes_atomic(str(target), b"first")
    assert target.read_bytes() == b"first"
    io.write_bytes_atomic(str(target), b"second, longer")
    assert target.read_bytes() == b"second, longer"
    io.write_bytes_atomic(str(target), b"")
    assert target.read_bytes() == b""
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.bin"]  # no temp files left


def test_write_bytes_atomic_file_uri(tmp_path: Path) -> None:
    target = tmp_path / "y.bin"
    io.write_bytes_atomic(f"file://{target}", b"abc")
    assert target.read_bytes() == b"abc"
    assert os.listdir(tmp_path) == ["y.bin"]


def test_write_bytes_atomic_leaves_no_temp_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "z.bin"
    target.write_bytes(b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        io.write_bytes_atomic(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["z.bin"]


def test_memory_filesystem_round_trip(memfs: Any) -> None:
    io.write_bytes_atomic("memory://bucket/a/b.bin", b"hello")
    io.write_bytes_atomic("memory://bucket/a/c.bin", b"world")
    assert io.read_bytes("memory://bucket/a/b.bin") == b"hello"
    assert io.exists("memory://bucket/a/c.bin")
    assert not io.exists("memory://bucket/a/d.bin")
    listed = io.list_files("memory://bucket")
    assert listed == ["memory:///bucket/a/b.bin", "memory:///bucket/a/c.bin"]
    assert io.read_bytes(listed[0]) == b"hello"
    io.write_bytes_atomic("memory://bucket/a/b.bin", b"again")
    assert io.read_bytes("memory://bucket/a/b.bin") == b"again"
    io.remove_tree("memory://bucket/a")
    assert io.list_files("memory://bucket") == []
    io.remove_tree("memory://bucket/not-there")  # no error


def test_list_files_local_is_sorted_and_recursive(tmp_path: Path) -> None:
    for name in ["b.png", "a/z.png", "a/c.png"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    got = io.list_files(str(tmp_path))
    assert got == [str(tmp_path / n) for n in ["a/c.png", "a/z.png", "b.png"]]
    assert io.list_files(str(tmp_path / "missing")) == []


def test_read_bytes_missing_file_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        io.read_bytes(str(tmp_path / "missing.png"), retries=0)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://user:secret@bucket/key.png", "s3://bucket/key.png"),
        ("https://host/x.png?X-Amz-Signature=abc&X-Amz-Credential=k", "https://host/x.png"),
        ("https://u:p@host/a/b.png?sig=1", "https://host/a/b.png"),
        ("/local/path.png", "/local/path.png"),
        ("s3://bucket/key@2x.png", "s3://bucket/key@2x.png"),  # '@' in the key is not a user
    ],
)
def test_redact(uri: str, expected: str) -> None:
    assert io.redact(uri) == expected


def test_redact_password_with_at_sign() -> None:
    assert io.redact("https://user:p@ss@host/x") == "https://host/x"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("/data/what?.png", "/data/what?.png"),  # '?' is part of a local file's name
        ("/data/me@home.png", "/data/me@home.png"),
        ("http://u:p@h/s.tar?sig=1#img/a.png", "http://h/s.tar#img/a.png"),  # the member stays
        ("s3://b/shard.tar#a.png", "s3://b/shard.tar#a.png"),
    ],
)
def test_redact_keeps_local_names_and_shard_members(uri: str, expected: str) -> None:
    assert io.redact(uri) == expected


def test_redact_text_redacts_every_uri_in_a_message() -> None:
    text = "file not found: http://alice:Pa55w0rd@h/a.png (from s3://k:s@b/x?token=t0k)"
    assert io.redact_text(text) == "file not found: http://h/a.png (from s3://b/x)"


@pytest.mark.parametrize(
    ("uri", "proto"),
    [
        ("s3://b/k", "s3"),
        ("GS://b/k", "gs"),
        ("/x/y", "file"),
        ("x/y", "file"),
        ("memory://a", "memory"),
    ],
)
def test_protocol_of(uri: str, proto: str) -> None:
    assert io.protocol_of(uri) == proto


def test_with_retries_retries_transient_errors(retry_count: None) -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionResetError("Connection reset by peer")
        return "done"

    assert io.with_retries(flaky, retries=5, base_delay_s=0.0) == "done"
    assert len(calls) == 3
    assert io.RETRIES.take() == 2
    assert io.RETRIES.take() == 0  # take() resets


@pytest.mark.parametrize(
    "exc",
    [
        OSError("SlowDown: please reduce your request rate"),
        RuntimeError("503 Service Unavailable"),
        TimeoutError(),
    ],
)
def test_with_retries_recognises_throttling(exc: Exception, retry_count: None) -> None:
    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return 7

    assert io.with_retries(flaky, base_delay_s=0.0) == 7
    assert io.RETRIES.take() == 1


def test_with_retries_gives_up_after_retries(retry_count: None) -> None:
    calls: list[int] = []

    def always() -> None:
        calls.append(1)
        raise ConnectionResetError("reset")

    with pytest.raises(ConnectionResetError):
        io.with_retries(always, retries=3, base_delay_s=0.0)
    assert len(calls) == 4  # the first try and three retries
    assert io.RETRIES.take() == 3


@pytest.mark.parametrize(
    "exc", [FileNotFoundError("gone"), PermissionError("no"), ValueError("bad value")]
)
def test_with_retries_does_not_retry_permanent_errors(exc: Exception, retry_count: None) -> None:
    calls: list[int] = []

    def fails() -> None:
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        io.with_retries(fails, retries=5, base_delay_s=0.0)
    assert len(calls) == 1
    assert io.RETRIES.take() == 0


def test_get_fs_missing_gcsfs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether or not gcsfs is installed here, the test sees it missing: a None entry in
    # sys.modules makes every import of it fail, and fsspec's cache of loaded classes is emptied.
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    loaded = sys.modules["fsspec.registry"]._registry
    for proto in ("gs", "gcs"):
        monkeypatch.delitem(loaded, proto, raising=False)
    with pytest.raises(MissingDependencyError) as info:
        io.get_fs("gs://user:pw@bucket/x.png")
    message = str(info.value)
    assert "segbatch[gcs]" in message
    assert "gcsfs" in message
    assert "pw" not in message
    assert isinstance(info.value, ImportError)


def test_get_fs_unknown_protocol() -> None:
    with pytest.raises(MissingDependencyError, match="nosuchproto://"):
        io.get_fs("nosuchproto://bucket/x.png")


def test_open_file_checks_backend_first() -> None:
    with pytest.raises(MissingDependencyError):
        io.open_file("nosuchproto://bucket/x.png")


def test_join_keeps_protocol() -> None:
    assert io.join("s3://b/out/", "masks", "/a/b.png") == "s3://b/out/masks/a/b.png"
    assert io.join("out", "x") == "out/x"


def test_remove_stale_temps_only_segbatch_names_and_flat_unless_recursive(tmp_path: Path) -> None:
    names = [
        ".a.png.tmp-0123abcd",  # write_bytes_atomic's temp name
        ".b.tif.0123456789abcdef0123456789abcdef.tmp",  # the GeoTIFF writer's
        "sub/.c.png.tmp-0123abcd",
        ".d.png.tmp-0123",  # too short: not a temp segbatch makes
        "e.png.tmp-0123abcd",  # not hidden
        "keep.png",
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    def left() -> list[str]:
        return sorted(
            p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()
        )

    assert io.remove_stale_temps(str(tmp_path)) == 2
    assert left() == sorted(names[2:])
    assert io.remove_stale_temps(str(tmp_path), recursive=True) == 1
    assert left() == sorted(names[3:])
    assert io.remove_stale_temps(str(tmp_path / "missing"), recursive=True) == 0
