"""Turning input URIs into an ordered list of inputs, before any Ray work starts.

An input is a directory (searched recursively), a glob, a single file, or a manifest (``.txt``
with one URI per line, ``.csv``/``.parquet`` with a path column). Shards found among them
(``.tar`` files, ``.parquet`` files holding ``input.image_column``) are expanded into one input
per member, named ``shard_uri#member`` (see ``shards.py``). The order is deterministic: the
inputs in the order given, each one's files sorted, each shard's members in stored order; a file
spelled twice (``in`` and ``in/./a.png``, a relative and an absolute manifest entry) is kept once.
Hidden files and folders (names starting with '.') and raster sidecars are skipped without a row;
the job's output folder is never an input.

Each input's ``rel_path`` is final: cleaned as the sinks clean it (``io.safe_relpath``) and unique
among the inputs as a case-insensitive store compares mask names, whatever the mask's suffix.
"""

from __future__ import annotations

import csv
import dataclasses
import io as stdio
import os
import posixpath
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from segbatch import io, shards, sinks
from segbatch.config import InputConfig
from segbatch.errors import ConfigError, InputNotFoundError, UnsafePathError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MEDICAL_EXTENSIONS = (".dcm", ".dicom", ".nii", ".nii.gz")
SUPPORTED_EXTENSIONS = IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS
MANIFEST_EXTENSIONS = (".txt", ".csv", ".parquet")
# Files that travel beside rasters and are not inputs themselves: skipped without a row.
SIDECAR_SUFFIXES = (".aux.xml", ".ovr", ".tfw", ".tifw", ".wld", ".prj", ".md5", ".msk")
_GLOB_CHARS = "*?["
LINK_LEAVES_ROOT = (
    "symlink leaves the input folder; set input.follow_symlinks: true to read what it points to"
)


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
    """One spelling per file: 'in/./a.png' -> '/cwd/in/a.png', 'file:///x/../a.png' -> '/a.png',
    'S3://b/x/./a.png' -> 's3://b/x/a.png'.

    Lexical only: two symlinks to one file stay two inputs (each listed name gets its row and
    mask, as the user named them); realpath would silently drop one of the names. A shard
    member's name is kept as stored ('s.tar#../x.png' is its own member); a query string too.
    """
    member = shards.split_member(uri)
    if member is not None:
        return shards.member_uri(_normalize(member[0]), member[1])
    proto = io.protocol_of(uri)
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    if proto in ("file", "local"):
        return os.path.abspath(rest)
    key, sep, query = rest.partition("?")
    return f"{proto}://{posixpath.normpath(key) if key else key}{sep}{query}"


def _identity(uri: str) -> str:
    """What two spellings of one file share: the normalised URI, and on object stores no
    leading '/' in the key ('memory://m/a' and 'memory:///m/a' are one object)."""
    norm = _normalize(uri)
    proto, sep, rest = norm.partition("://")
    return f"{proto}://{rest.lstrip('/')}" if sep else norm


def _is_under(identity: str, root: str) -> bool:
    return identity == root or identity.startswith(root.rstrip("/") + "/")


def _leaves(path: str, real_root: str) -> bool:
    """Whether the local ``path``, links resolved, is outside the resolved folder ``real_root``."""
    return not _is_under(os.path.realpath(path), real_root)


def _walk_local(root: str, follow_symlinks: bool) -> list[tuple[str, str | None]]:
    """Every file below the local folder ``root``, sorted, each with None or why it is not read.

    fsspec's ``find`` lists a symlinked folder as a file and reads linked files wherever they
    point. Here a link whose target is outside ``root`` is not followed unless
    ``follow_symlinks``: it comes back with ``LINK_LEAVES_ROOT`` (a folder link: one entry). Other
    symlinked folders are walked, their files named through the link; a link back into a folder
    being walked (a loop) is skipped. Hidden folders are not walked (their files are skipped).
    """
    real_root = os.path.realpath(root)
    found: list[tuple[str, str | None]] = []
    # (folder, its resolved path, the resolved folders above it): a stack, not recursion, so a
    # deep tree cannot hit Python's recursion limit.
    stack = [(root, real_root, frozenset([real_root]))]
    while stack:
        folder, real_folder, above = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:  # unreadable folder: a row saying so, not a crash
            found.append((folder, f"cannot list this folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False):
                    real = os.path.join(real_folder, entry.name)
                    stack.append((entry.path, real, above | {real}))
                else:
                    found.append((entry.path, None))
                continue
            real = os.path.realpath(entry.path)
            if not follow_symlinks and not _is_under(real, real_root):
                found.append((entry.path, LINK_LEAVES_ROOT))
            elif os.path.isdir(real):
                if real not in above:
                    stack.append((entry.path, real, above | {real}))
            else:  # a file, or a broken link (its read fails: an error row)
                found.append((entry.path, None))
    return sorted(found)


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
        real_root = os.path.realpath(root or "/") if io.is_local(uri) else None
        items = []
        for p in matches:
            rel = _relative(p, root)
            if _is_sidecar(p) or _is_hidden(rel):
                continue
            if real_root is not None and not cfg.follow_symlinks and _leaves(p, real_root):
                items.append(InputItem(io.full_uri(fs, p), rel, LINK_LEAVES_ROOT))
            else:
                items.extend(_file_items(io.full_uri(fs, p), rel, cfg, options, True))
        return items
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
        if io.is_local(uri):
            files = _walk_local(path, cfg.follow_symlinks)
        else:
            files = [(p, None) for p in sorted(fs.find(path))]
        items = []
        for p, error in files:
            rel = _relative(p, path)
            if _is_hidden(rel) or _is_sidecar(p):
                continue
            if error is not None:
                items.append(InputItem(io.full_uri(fs, p), rel, error))
            else:
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


def _clean(rel: str) -> str:
    """``rel`` as the sinks will write it. ``io.safe_relpath`` once is not always a fixed point
    ('C:/C:/x.png' -> 'C:/x.png' -> 'x.png'), and the sinks apply it again."""
    while (cleaned := io.safe_relpath(rel)) != rel:
        rel = cleaned
    return rel


def _name_key(rel: str) -> str:
    """What a mask name is compared by: the mask's path without its suffix (.png, .tif and
    .nii.gz masks of one stem collide), case-folded and NFC-normalised as case-insensitive
    stores (macOS, Windows, synced folders) compare names."""
    return unicodedata.normalize("NFC", sinks.mask_rel_path(rel, "")).casefold()


def _unique_rel(items: list[InputItem]) -> list[InputItem]:
    """Give each input its final ``rel_path``: cleaned, and unique among the inputs by
    ``_name_key``, so no two inputs write one mask.

    Names that need no change are kept first (those already clean, then the cleaned ones, in
    list order); every other input gets the first free '~N' before its extension, checked
    against all names taken, so a renamed 'a.png' never takes the name of a real 'a~1.png'.
    Depends only on the list, so the same inputs always get the same names. Items already in
    error write nothing and take no name.
    """
    out = list(items)
    clean: dict[int, str] = {}
    for i, item in enumerate(items):
        try:
            clean[i] = _clean(item.rel_path)
        except UnsafePathError as exc:
            if item.error is None:
                out[i] = dataclasses.replace(item, error=str(exc))
            continue
        out[i] = dataclasses.replace(item, rel_path=clean[i])
    taken: set[str] = set()
    renamed = []
    named = [i for i in clean if out[i].error is None]
    for i in sorted(named, key=lambda i: clean[i] != items[i].rel_path):
        key = _name_key(clean[i])
        if key in taken:
            renamed.append(i)
        else:
            taken.add(key)
    # Per name, the counter to try next: names are never freed, so the counters below it are
    # taken and a thousand copies of one name cost a thousand tries, not half a million.
    next_n: dict[str, int] = {}
    for i in sorted(renamed):
        stem = sinks.mask_rel_path(clean[i], "")
        ext = clean[i][len(stem) :]
        key = _name_key(clean[i])
        n = next_n.get(key, 1)
        while _name_key(f"{stem}~{n}{ext}") in taken:
            n += 1
        next_n[key] = n + 1
        taken.add(_name_key(f"{stem}~{n}{ext}"))
        out[i] = dataclasses.replace(out[i], rel_path=f"{stem}~{n}{ext}")
    return out


def list_inputs(
    cfg: InputConfig,
    storage_options: Mapping[str, Any] | None = None,
    output_root: str | None = None,
) -> list[InputItem]:
    """Every input of the job, in a deterministic order, each with its final ``rel_path``.

    Files under ``output_root`` (the job's output.path) are never inputs: a second run over a
    folder that holds its own output must not segment its masks. Raises InputNotFoundError
    (exit code 2) when a URI does not exist or nothing is found, and
    StorageAccessError (exit code 2) when the storage cannot be reached or refuses the listing.
    """
    if not cfg.paths:
        raise InputNotFoundError(
            "no input given: set input.paths in the job file or pass --input URI"
        )
    options = storage_options or {}
    out = None if output_root is None else _identity(output_root)
    items: list[InputItem] = []
    seen: set[str] = set()
    n_output = 0
    for uri in cfg.paths:
        with io.storage_errors("list the inputs", uri, options):
            expanded = _expand(_normalize(uri), cfg, options)
        for item in expanded:
            identity = _identity(item.uri)
            if out is not None and _is_under(_shard_of(identity), out):
                n_output += 1
            elif identity not in seen:
                seen.add(identity)
                items.append(dataclasses.replace(item, uri=_normalize(item.uri)))
    if not any(item.error is None for item in items):
        shown = ", ".join(io.redact(u) for u in cfg.paths)
        why = ""
        if n_output:
            why += f"; {n_output} files inside the output folder were left out (never an input)"
        n_links = sum(item.error == LINK_LEAVES_ROOT for item in items)
        if n_links:
            why += (
                f"; {n_links} symlinks leave the input folder: set input.follow_symlinks: true "
                "to read them"
            )
        raise InputNotFoundError(
            f"no image files found in {shown}; supported extensions: "
            + ", ".join(e.lstrip(".") for e in SUPPORTED_EXTENSIONS)
            + why
        )
    return _unique_rel(items)
