"""Turning input URIs into an ordered list of inputs, before any Ray work starts.

An input is a directory (searched recursively), a glob, a single file, or a manifest (``.txt``
with one URI per line, ``.csv``/``.parquet`` with a path column). Shards found among them
(``.tar`` files, ``.parquet`` files holding ``input.image_column``) are expanded into one input
per member, named ``shard_uri#member`` (see ``shards.py``). The order is deterministic: the
inputs in the order given, each one's files sorted, each shard's members in stored order; a URI
listed twice is kept once.
"""

from __future__ import annotations

import csv
import dataclasses
import io as stdio
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from segbatch import io, shards
from segbatch.config import InputConfig
from segbatch.errors import ConfigError, InputNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MEDICAL_EXTENSIONS = (".dcm", ".dicom", ".nii", ".nii.gz")
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
# Files that travel beside rasters and are not inputs themselves: skipped without a row.
SIDECAR_SUFFIXES = (".aux.xml", ".ovr", ".tfw", ".tifw", ".wld", ".prj", ".md5", ".msk")
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputItem:
    """One input: ``uri`` is what is read; ``rel_path`` names its outputs under the output root."""

    uri: str
    rel_path: str
    error: str | None = None  # set when the file is known to be unusable before reading
    # Shard members: where the bytes are (tar: byte offset and size of the member's data;
    # Parquet: offset is the row number, size None). None for plain files.
    offset: int | None = None
    size: int | None = None


def extension_of(uri: str) -> str:
    """'.nii.gz' for x.nii.gz, '.png' for a.PNG (lowercased)."""
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return posixpath.splitext(name)[1]


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _is_sidecar(uri: str) -> bool:
    return uri.lower().endswith(SIDECAR_SUFFIXES)


def _item(uri: str, rel: str) -> InputItem:
    ext = extension_of(uri)
    if ext in SUPPORTED_EXTENSIONS:
        return InputItem(uri, rel)
    supported = ", ".join(e.lstrip(".") for e in SUPPORTED_EXTENSIONS)
    shown = ext or "no extension"
    return InputItem(uri, rel, f"unsupported file type ({shown}); supported: {supported}")


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    if root and path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return path.rsplit("/", 1)[-1]


def _read_manifest(uri: str, cfg: InputConfig, options: Mapping[str, Any]) -> list[str]:
    ext = extension_of(uri)
    if ext == ".txt":
        text = io.read_bytes(uri, options).decode("utf-8")
        return [
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]
    if ext == ".csv":
        text = io.read_bytes(uri, options).decode("utf-8")
        reader = csv.DictReader(stdio.StringIO(text))
        if reader.fieldnames is None or cfg.path_column not in reader.fieldnames:
            raise ConfigError(
                f"manifest {io.redact(uri)} has no {cfg.path_column!r} column "
                f"(columns: {reader.fieldnames}); set input.path_column"
            )
        return [row[cfg.path_column].strip() for row in reader if row[cfg.path_column].strip()]
    import pyarrow.parquet as pq

    with io.open_file(uri, "rb", options) as fh:
        table = pq.read_table(fh)
    if cfg.path_column not in table.column_names:
        raise ConfigError(
            f"manifest {io.redact(uri)} has no {cfg.path_column!r} column "
            f"(columns: {table.column_names}); set input.path_column"
        )
    return [str(p) for p in table.column(cfg.path_column).to_pylist() if p]


def _common_dir(paths: Sequence[str]) -> str:
    dirs = [p.rsplit("/", 1)[0] if "/" in p else "" for p in paths]
    if not dirs:
        return ""
    prefix = posixpath.commonprefix(dirs)
    # commonprefix works on characters; cut back to a whole folder name.
    if all(d == prefix or d.startswith(prefix + "/") for d in dirs):
        return prefix
    return prefix.rsplit("/", 1)[0] if "/" in prefix else ""


def _normalize(uri: str) -> str:
    """'s3://b/x/./a.png' -> 's3://b/x/a.png': one spelling per file, so duplicates are found."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://{posixpath.normpath(rest)}"
    return posixpath.normpath(uri)


def _is_parquet_shard(uri: str, cfg: InputConfig, options: Mapping[str, Any]) -> bool:
    """A .parquet file is a shard with input.format parquet, or (auto) when it holds the image
    column; otherwise it is a manifest."""
    if cfg.format == "parquet":
        return True
    if cfg.format != "auto":
        return False
    return cfg.image_column in shards.parquet_columns(uri, options)


def _shard_items(
    uri: str, rel: str, cfg: InputConfig, options: Mapping[str, Any]
) -> list[InputItem]:
    """One item per member of a tar or Parquet shard."""
    if shards.is_tar(uri):
        items = []
        for m in shards.list_tar(uri, options):
            item = _item(shards.member_uri(uri, m.name), shards.member_rel_path(rel, m.name))
            if item.error is None and extension_of(m.name) in (".nii", ".nii.gz"):
                item = dataclasses.replace(
                    item, error="NIfTI volumes inside shards are not supported; store them as files"
                )
            items.append(dataclasses.replace(item, offset=m.offset, size=m.size))
        return items
    members = shards.list_parquet(uri, cfg.image_column, cfg.path_column, options)
    return [
        InputItem(
            shards.member_uri(uri, m.name), shards.member_rel_path(rel, m.name), offset=m.offset
        )
        for m in members
    ]


def _file_items(
    uri: str, rel: str, cfg: InputConfig, options: Mapping[str, Any], listed: bool
) -> list[InputItem]:
    """The items of one file found in a listing (``listed``) or named in a manifest.

    Tars are shards unless input.format is files; a .parquet found in a listing is a shard when
    ``_is_parquet_shard`` says so; a ``shard_uri#member`` entry is that member alone.
    """
    member = shards.split_member(uri)
    if member is not None:
        shard_rel = shards.split_member(rel)
        return [_item(uri, shards.member_rel_path(shard_rel[0] if shard_rel else rel, member[1]))]
    if shards.is_tar(uri) and cfg.format != "files":
        return _shard_items(uri, rel, cfg, options)
    if shards.is_parquet(uri) and listed and _is_parquet_shard(uri, cfg, options):
        return _shard_items(uri, rel, cfg, options)
    return [_item(uri, rel)]


def _shard_of(path: str) -> str:
    """The shard part of ``shard#member``; any other path unchanged."""
    member = shards.split_member(path)
    return member[0] if member is not None else path


def _expand(uri: str, cfg: InputConfig, options: Mapping[str, Any]) -> list[InputItem]:
    fs, path = io.get_fs(uri, options)
    if any(c in path for c in _GLOB_CHARS) and not fs.exists(path):
        root = path
        while any(c in root for c in _GLOB_CHARS):
            root = root.rsplit("/", 1)[0] if "/" in root else ""
        matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not matches:
            raise InputNotFoundError(f"{io.redact(uri)}: the pattern matched no file")
        return [
            item
            for p in matches
            if not _is_sidecar(p) and not _is_hidden(_relative(p, root))
            for item in _file_items(io.full_uri(fs, p), _relative(p, root), cfg, options, True)
        ]
    member = shards.split_member(uri)
    if member is not None:
        # A shard member named directly: the shard must exist; the member is checked on read.
        if not io.exists(member[0], options):
            raise InputNotFoundError(f"{io.redact(member[0])} does not exist; check the path")
        return [_item(uri, shards.member_rel_path(member[0].rsplit("/", 1)[-1], member[1]))]
    if not fs.exists(path):
        raise InputNotFoundError(
            f"{io.redact(uri)} does not exist; check the path (and storage.options for cloud URIs)"
        )
    if fs.isdir(path):
        files = sorted(fs.find(path))
        items = []
        for p in files:
            rel = _relative(p, path)
            if _is_hidden(rel) or _is_sidecar(p):
                continue
            items.extend(_file_items(io.full_uri(fs, p), rel, cfg, options, True))
        return items
    if extension_of(path) in MANIFEST_EXTENSIONS and not (
        shards.is_parquet(path) and _is_parquet_shard(uri, cfg, options)
    ):
        entries = _read_manifest(uri, cfg, options)
        base = uri.rsplit("/", 1)[0] if "/" in uri else "."
        uris = [
            _normalize(e if "://" in e or e.startswith("/") else io.join(base, e)) for e in entries
        ]
        stripped = [u.split("://", 1)[-1] for u in uris]
        root = _common_dir([_shard_of(s) for s in stripped])
        return [
            item
            for u, s in zip(uris, stripped, strict=True)
            for item in _file_items(u, _relative(s, root), cfg, options, False)
        ]
    name = path.rsplit("/", 1)[-1]
    if shards.is_parquet(path):  # not a manifest: a Parquet shard
        return _shard_items(io.full_uri(fs, path), name, cfg, options)
    return _file_items(io.full_uri(fs, path), name, cfg, options, False)


def _stem(rel: str) -> str:
    """The name a mask gets, without extension: 'a/b.png' and 'a/b.jpg' share 'a/b'."""
    if rel.lower().endswith(".nii.gz"):
        return rel[: -len(".nii.gz")]
    return posixpath.splitext(rel)[0]


def _unique_rel(items: list[InputItem]) -> list[InputItem]:
    """Two inputs with one relative name would share a mask: the later ones get '~N'."""
    seen: dict[str, int] = {}
    out = []
    for item in items:
        key = _stem(item.rel_path).lower()
        if key in seen:
            seen[key] += 1
            stem, ext = posixpath.splitext(item.rel_path)
            item = dataclasses.replace(item, rel_path=f"{stem}~{seen[key]}{ext}")
        else:
            seen[key] = 0
        out.append(item)
    return out


def list_inputs(
    cfg: InputConfig, storage_options: Mapping[str, Any] | None = None
) -> list[InputItem]:
    """Every input of the job, in a deterministic order.

    Raises InputNotFoundError (exit code 2) when a URI does not exist or nothing is found, and
    StorageAccessError (exit code 2) when the storage cannot be reached or refuses the listing.
    """
    if not cfg.paths:
        raise InputNotFoundError(
            "no input given: set input.paths in the job file or pass --input URI"
        )
    options = storage_options or {}
    items: list[InputItem] = []
    seen: set[str] = set()
    for uri in cfg.paths:
        with io.storage_errors("list the inputs", uri, options):
            expanded = _expand(uri, cfg, options)
        for item in expanded:
            if item.uri not in seen:
                seen.add(item.uri)
                items.append(item)
    if not any(item.error is None for item in items):
        shown = ", ".join(io.redact(u) for u in cfg.paths)
        raise InputNotFoundError(
            f"no image files found in {shown}; supported extensions: "
            + ", ".join(e.lstrip(".") for e in SUPPORTED_EXTENSIONS)
        )
    return _unique_rel(items)
