"""Shards: many images inside one object, listed member by member and read by range.

Two kinds, both addressed as ``shard_uri#member``:

- WebDataset-style ``.tar`` shards (uncompressed). Listing scans the member headers; each regular
  file member is one input, and reading it is one range read of ``size`` bytes at the member's
  data offset, so a worker never downloads the whole tar.
- Parquet shards with an image-bytes column (``input.image_column``). Each row is one input,
  named by its ``input.path_column`` value or ``row=N`` when the shard has no such column.
  Reading fetches only the image column of the row groups that hold the wanted rows.

Pure functions over fsspec, no Ray: the driver lists, the read stage reads.
"""

from __future__ import annotations

import posixpath
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from segbatch import io
from segbatch.errors import ConfigError

TAR_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet",)
ROW_PREFIX = "row="
# Shard indexes kept per process by the read stage when rows arrive without their location.
_INDEX_CACHE_SHARDS = 64


@dataclass(frozen=True)
class Member:
    """One input inside a shard: ``name`` is its path in the tar (or the row's path value).

    ``offset``/``size``: tar members, the byte range of the data; Parquet rows, ``offset`` is the
    row number in the shard and ``size`` is None.
    """

    name: str
    offset: int
    size: int | None


def member_uri(shard_uri: str, name: str) -> str:
    return f"{shard_uri}#{name}"


def split_member(uri: str) -> tuple[str, str] | None:
    """``'s3://b/a.tar#x/1.png'`` -> ``('s3://b/a.tar', 'x/1.png')``; None for a plain file.

    The first ``#`` that follows a shard extension splits; a '#' elsewhere is part of a name.
    """
    lower = uri.lower()
    for ext in (*TAR_EXTENSIONS, *PARQUET_EXTENSIONS):
        pos = lower.find(ext + "#")
        if pos >= 0:
            cut = pos + len(ext)
            return uri[:cut], uri[cut + 1 :]
    return None


def is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_EXTENSIONS)


def is_parquet(uri: str) -> bool:
    return uri.lower().endswith(PARQUET_EXTENSIONS)


def member_rel_path(shard_rel: str, name: str) -> str:
    """Where a member's outputs go: ``<shard rel path without extension>/<member path>``.

    ``('sub/train-0001.tar', 'x/1.png')`` -> ``'sub/train-0001/x/1.png'``: one folder per shard,
    so members of different shards never share a mask.
    """
    stem = posixpath.splitext(shard_rel)[0] or shard_rel
    return f"{stem}/{name.lstrip('/')}"


def list_tar(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[Member]:
    """The regular file members of an uncompressed tar, in archive order.

    Scans the headers only (each one says where the next begins); a name stored twice keeps its
    last copy, as ``tar -x`` would. Directories, links and devices are skipped.
    """

    def scan() -> list[Member]:
        members: dict[str, Member] = {}
        with io.open_file(uri, "rb", storage_options) as fh:
            try:
                with tarfile.open(fileobj=fh, mode="r:") as tar:
                    for info in tar:
                        if info.isfile():
                            members.pop(info.name, None)
                            members[info.name] = Member(info.name, info.offset_data, info.size)
            except tarfile.ReadError as exc:
                raise ConfigError(
                    f"{io.redact(uri)} is not an uncompressed tar shard ({exc}); shards are read "
                    "member by member, so compress the images, not the tar"
                ) from exc
        return list(members.values())

    return io.with_retries(scan)


def parquet_columns(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Column names of a Parquet file (its footer only)."""
    import pyarrow.parquet as pq

    with io.open_file(uri, "rb", storage_options) as fh:
        return list(pq.ParquetFile(fh).schema_arrow.names)


def list_parquet(
    uri: str,
    image_column: str,
    path_column: str,
    storage_options: Mapping[str, Any] | None = None,
) -> list[Member]:
    """One member per row of a Parquet shard, named by ``path_column`` or ``row=N``.

    Reads the footer and the path column only, never the image bytes. Raises ConfigError when
    the shard has no ``image_column``.
    """
    import pyarrow.parquet as pq

    with io.open_file(uri, "rb", storage_options) as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        if image_column not in names:
            raise ConfigError(
                f"Parquet shard {io.redact(uri)} has no image column {image_column!r} "
                f"(columns: {names}); set input.image_column"
            )
        n = pf.metadata.num_rows
        if path_column in names:
            values = pf.read(columns=[path_column]).column(0).to_pylist()
            return [
                Member(str(v) if v is not None else f"{ROW_PREFIX}{i}", i, None)
                for i, v in enumerate(values)
            ]
    return [Member(f"{ROW_PREFIX}{i}", i, None) for i in range(n)]


def read_tar_member(
    shard_uri: str,
    offset: int,
    size: int,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 5,
    counter: io.RetryCounter | None = None,
) -> bytes:
    """The bytes of one tar member: a single range read."""
    if size == 0:
        return b""
    return io.read_bytes(
        shard_uri, storage_options, retries, start=offset, end=offset + size, counter=counter
    )


def read_parquet_rows(
    shard_uri: str,
    rows: Sequence[int],
    image_column: str,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 5,
    counter: io.RetryCounter | None = None,
) -> dict[int, bytes]:
    """{row number: image bytes} for ``rows`` of one shard.

    Reads the footer, then the image column of each row group holding a wanted row, once. A row
    number past the end raises IndexError; a null image gives b''.
    """
    import pyarrow.parquet as pq

    def read() -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        with io.open_file(shard_uri, "rb", storage_options) as fh:
            pf = pq.ParquetFile(fh)
            if image_column not in pf.schema_arrow.names:
                raise ConfigError(
                    f"Parquet shard {io.redact(shard_uri)} has no image column {image_column!r}"
                )
            starts = [0]
            for g in range(pf.metadata.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
            by_group: dict[int, list[int]] = {}
            for row in sorted(set(rows)):
                if not 0 <= row < starts[-1]:
                    raise IndexError(f"row {row} is past the end of the shard ({starts[-1]} rows)")
                group = next(g for g in range(len(starts) - 1) if row < starts[g + 1])
                by_group.setdefault(group, []).append(row)
            for group, wanted in by_group.items():
                column = pf.read_row_group(group, columns=[image_column]).column(0)
                for row in wanted:
                    value = column[row - starts[group]].as_py()
                    out[row] = bytes(value) if value is not None else b""
        return out

    return io.with_retries(read, retries, counter=counter)


class ShardIndex:
    """Per-process cache of shard listings: member name -> Member, for rows that arrive as
    ``shard_uri#member`` without their location (a manifest naming members, say)."""

    def __init__(self, max_shards: int = _INDEX_CACHE_SHARDS) -> None:
        self._lock = threading.Lock()
        self._max = max_shards
        self._cache: OrderedDict[tuple[str, str], dict[str, Member]] = OrderedDict()

    def lookup(
        self,
        shard_uri: str,
        name: str,
        path_column: str,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Member:
        """The member ``name`` of a shard; KeyError (with a clear message) when it has none."""
        if is_parquet(shard_uri) and name.startswith(ROW_PREFIX) and name[4:].isdigit():
            return Member(name, int(name[len(ROW_PREFIX) :]), None)
        key = (shard_uri, path_column)
        with self._lock:
            members = self._cache.get(key)
            if members is not None:
                self._cache.move_to_end(key)
        if members is None:
            if is_tar(shard_uri):
                listed = list_tar(shard_uri, storage_options)
            else:
                listed = _list_parquet_names(shard_uri, path_column, storage_options)
            members = {m.name: m for m in listed}
            with self._lock:
                self._cache[key] = members
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        if name not in members:
            raise KeyError(f"{name!r} is not in shard {io.redact(shard_uri)}")
        return members[name]


def _list_parquet_names(
    uri: str, path_column: str, storage_options: Mapping[str, Any] | None
) -> list[Member]:
    """Members of a Parquet shard by path value, without requiring the image column by name."""
    import pyarrow.parquet as pq

    with io.open_file(uri, "rb", storage_options) as fh:
        pf = pq.ParquetFile(fh)
        if path_column not in pf.schema_arrow.names:
            return []
        values = pf.read(columns=[path_column]).column(0).to_pylist()
    return [Member(str(v), i, None) for i, v in enumerate(values) if v is not None]


SHARD_INDEX = ShardIndex()
