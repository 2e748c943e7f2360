"""The one fsspec helper: every path segbatch touches is a URI opened here.

Local paths, ``file://`` and any fsspec protocol whose package is installed (``s3://`` with
s3fs, ``gs://`` with gcsfs, ``az://`` with adlfs, ``memory://``). Transient storage errors are
retried with exponential backoff and counted; writes go to a temporary name and are moved into
place, so a reader never sees a half-written file under its final name.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from segbatch.errors import (
    MissingDependencyError,
    OutputNotWritableError,
    OutputPathError,
    SegbatchError,
    StorageAccessError,
    UnsafePathError,
)

T = TypeVar("T")

# Which extra installs the backend of a protocol.
PROTOCOL_EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
}

_TRANSIENT_NAMES = (
    "SlowDown",
    "Throttl",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "503",
    "500 ",
    "Connection reset",
    "ConnectionReset",
    "timed out",
    "Timeout",
    "BrokenPipe",
)


class RetryCounter:
    """Counts retried storage calls in this process (reported in the job's summary)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1

    def take(self) -> int:
        with self._lock:
            n, self.count = self.count, 0
            return n


RETRIES = RetryCounter()


def protocol_of(uri: str) -> str:
    """'s3' for s3://b/k, 'file' for a local path."""
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    return match.group(1).lower() if match else "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


# user:password@ after a scheme; the query of a URI (up to a '#member' of a shard, which stays).
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s]*@")
_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"]*)\?[^\s#'\"()<>]*")


def redact(uri: str) -> str:
    """A URI safe to log and to store: ``user:password@`` and the query string removed.

    ``https://alice:pw@host/a.tif?X-Amz-Signature=..`` -> ``https://host/a.tif``. The whole query
    goes: signed URLs carry their credential there (``X-Amz-Signature``, ``sig``, ``token``).
    A ``#member`` suffix (a shard member) is kept; local paths are returned unchanged ('?' and
    '@' are ordinary characters of a file name).
    """
    return redact_text(uri)


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URI in it redacted as by ``redact``."""
    if "://" not in text:
        return text
    return _QUERY.sub(r"\1", _USERINFO.sub(r"\1", text))


# Packages whose exceptions mean "the storage said no" (botocore's are not OSErrors).
_STORAGE_MODULES = (
    "botocore",
    "aiobotocore",
    "s3fs",
    "aiohttp",
    "gcsfs",
    "google",
    "adlfs",
    "azure",
)
_CREDENTIAL_WORDS = ("Credentials", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def is_storage_error(exc: BaseException) -> bool:
    """An error of the storage itself (unreachable, refused, no credentials), not of segbatch."""
    if isinstance(exc, SegbatchError):
        return False
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in _STORAGE_MODULES


def endpoint_of(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The endpoint a URI's requests go to, redacted, as a user would name it."""
    options = dict(storage_options or {})
    proto = protocol_of(uri)
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
        "endpoint_url"
    )
    if not endpoint and proto in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return redact(str(endpoint)) if endpoint else f"the default {proto}:// endpoint"


def storage_access_error(
    exc: BaseException, action: str, uri: str, storage_options: Mapping[str, Any] | None = None
) -> StorageAccessError:
    """One line saying what could not be done where, why, and what to check.

    ``action``: what was being done, e.g. 'list the inputs'.
    """
    lines = str(exc).strip().splitlines()
    detail = type(exc).__name__ + (f": {lines[0]}" if lines else "")
    detail = redact_text(detail)
    if is_local(uri):
        return StorageAccessError(f"cannot {action} at {uri}: {detail}")
    text = f"{type(exc).__name__} {exc}"
    if isinstance(exc, PermissionError) or any(w in text for w in _CREDENTIAL_WORDS):
        hint = (
            "check the credentials in storage.options (key and secret, or profile; anon: true "
            "for a public bucket) or the standard variables of the store (AWS_* for s3)"
        )
    else:
        hint = "check storage.options (endpoint_url) and that the endpoint is reachable from here"
    return StorageAccessError(
        f"cannot {action} at {redact(uri)} (endpoint {endpoint_of(uri, storage_options)}): "
        f"{detail}; {hint}"
    )


@contextmanager
def storage_errors(
    action: str, uri: str, storage_options: Mapping[str, Any] | None = None
) -> Iterator[None]:
    """Turn storage errors raised inside into a StorageAccessError (a usage error: exit 2)."""
    try:
        yield
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        raise storage_access_error(exc, action, uri, storage_options) from exc


def get_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, path inside it) for a URI; a missing backend names the extra to install."""
    try:
        return url_to_fs(uri, **dict(storage_options or {}))
    except (ImportError, ValueError) as exc:
        proto = protocol_of(uri)
        if isinstance(exc, ValueError) and "Protocol not known" not in str(exc):
            raise
        package, extra = PROTOCOL_EXTRAS.get(proto, (f"the fsspec backend for {proto}://", ""))
        hint = f"pip install 'segbatch[{extra}]'" if extra else f"install {package}"
        raise MissingDependencyError(
            f"{redact(uri)}: the {proto}:// protocol needs {package}, which is not installed: "
            + hint
        ) from exc


def full_uri(fs: Any, path: str) -> str:
    """The URI of ``path`` inside ``fs``, as a user would write it."""
    if fs.protocol in ("file", "local") or "file" in (fs.protocol or ()):
        return path
    return fs.unstrip_protocol(path)


def is_transient(exc: BaseException) -> bool:
    """Throttling, timeouts and connection resets: worth another try."""
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(name in text for name in _TRANSIENT_NAMES)


def with_retries(
    fn: Callable[[], T],
    retries: int = 5,
    base_delay_s: float = 0.2,
    max_delay_s: float = 10.0,
    counter: RetryCounter | None = None,
) -> T:
    """Call ``fn``, retrying transient storage errors with jittered exponential backoff.

    Each retry is counted in ``RETRIES`` (this process) and in ``counter`` when given (the caller's
    own tally, e.g. the read stage's per-row count that travels to the summary).
    """
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= retries or not is_transient(exc):
                raise
            RETRIES.add()
            if counter is not None:
                counter.add()
            delay = min(max_delay_s, base_delay_s * 2**attempt) * (0.5 + random.random())
            time.sleep(delay)
            attempt += 1


def read_bytes(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 5,
    start: int | None = None,
    end: int | None = None,
    counter: RetryCounter | None = None,
) -> bytes:
    """The bytes of ``uri``, or of its range ``[start, end)`` (one ranged GET on object stores)."""
    fs, path = get_fs(uri, storage_options)
    data = with_retries(lambda: fs.cat_file(path, start=start, end=end), retries, counter=counter)
    return bytes(data)


def join(root: str, *parts: str) -> str:
    """Join URI parts with '/', keeping the protocol of ``root``."""
    out = root.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def safe_relpath(rel: str) -> str:
    """A relative path that cannot leave its root: '..', absolute parts and drives are dropped.

    ``'../../etc/passwd'`` -> ``'etc/passwd'``; ``'C:\\x\\y.png'`` -> ``'x/y.png'``.
    """
    rel = rel.replace("\\", "/")
    rel = re.sub(r"^[a-zA-Z]:", "", rel)
    parts = [p for p in rel.split("/") if p not in ("", ".", "..")]
    # Control characters never make a sensible file name on any store.
    parts = [re.sub(r"[\x00-\x1f]", "_", p) for p in parts]
    if not parts:
        raise UnsafePathError(f"input name {rel!r} leaves no file name inside the output root")
    return "/".join(parts)


def under_root(root: str, rel: str) -> str:
    """``root/rel`` after checking that the result stays inside ``root``."""
    safe = safe_relpath(rel)
    out = join(root, safe)
    norm = posixpath.normpath(out.split("://", 1)[-1])
    base = posixpath.normpath(root.split("://", 1)[-1].rstrip("/"))
    if base == ".":
        inside = norm != ".." and not norm.startswith(("../", "/"))
    elif base == "/":
        inside = norm.startswith("/")
    else:
        inside = norm == base or norm.startswith(base + "/")
    if not inside:
        raise UnsafePathError(f"{rel!r} would be written outside the output root {root!r}")
    return out


def write_bytes_atomic(
    uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None, retries: int = 5
) -> None:
    """Write ``data`` so that ``uri`` never holds a partial file.

    Local files: a temporary file in the same folder, fsynced, then ``os.replace``. Object stores:
    one PUT, which is atomic by itself (a reader sees the old object or the new one).
    """
    fs, path = get_fs(uri, storage_options)
    if is_local(uri) or "file" in (
        fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    ):
        local = path
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        # A hidden name: Parquet readers (pyarrow, Spark) skip files starting with '.', so a
        # temp file left by a killed process is never read as results.
        folder, name = os.path.split(local)
        tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return

    def put() -> None:
        fs.pipe_file(path, data)

    with_retries(put, retries)


# The temp names segbatch's writers use: '.<name>.tmp-<8 hex>' (write_bytes_atomic) and
# '.<name>.<32 hex>.tmp' (the GeoTIFF mask writer). Nothing else is treated as a stale temp.
STALE_TEMP_RE = re.compile(r"^\.[^/]*(\.tmp-[0-9a-f]{8}|\.[0-9a-f]{32}\.tmp)$")


def remove_stale_temps(
    uri: str, storage_options: Mapping[str, Any] | None = None, recursive: bool = False
) -> int:
    """Delete temp files a killed run left in a local folder (and below it with ``recursive``);
    returns how many. Only segbatch's temp names (``STALE_TEMP_RE``) are touched."""
    if not is_local(uri):
        return 0  # object store writes are single PUTs: nothing is left half-written
    fs, path = get_fs(uri, storage_options)
    if not fs.isdir(path):
        return 0
    files = fs.find(path) if recursive else fs.ls(path, detail=False)
    stale = [p for p in files if STALE_TEMP_RE.match(posixpath.basename(p)) and fs.isfile(p)]
    for p in stale:
        fs.rm_file(p)
    return len(stale)


def remove_empty_dirs(uri: str) -> None:
    """Remove the empty folders below a local folder, and the folder itself when it ends empty.

    Object stores have no folders to leave behind: nothing to do there.
    """
    if not is_local(uri):
        return
    _, path = get_fs(uri)
    if not os.path.isdir(path):
        return
    for folder, _, _ in os.walk(path, topdown=False):
        if not os.listdir(folder):
            os.rmdir(folder)


def check_writable_local(uri: str) -> None:
    """Fail now when a local folder cannot be created or written (exit 2 before Ray starts).

    The nearest existing ancestor must be a folder, and a probe file must be creatable in it:
    permission bits say little when running as root (a read-only mount still refuses). Object
    stores are not probed: their permissions show only on the first write.
    """
    if not is_local(uri):
        return
    _, path = get_fs(uri)
    probe_dir = os.path.abspath(path)
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        raise OutputPathError(
            f"output {uri!r} cannot be created: {probe_dir!r} is a file, not a folder; choose an "
            "--output outside it"
        )
    # The probe has a stale-temp name, so a run killed right here leaves nothing unknown.
    probe = os.path.join(probe_dir, f".segbatch-probe.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as exc:
        raise OutputNotWritableError(
            f"output {uri!r} is not writable: no file can be created in {probe_dir!r} "
            f"({exc.strerror or exc}); choose an --output on a writable filesystem, or fix its "
            "permissions"
        ) from exc


def exists(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    return bool(fs.exists(path))


def list_files(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Every file below a directory URI (recursive), as full URIs, sorted."""
    fs, path = get_fs(uri, storage_options)
    if not fs.exists(path):
        return []
    return sorted(full_uri(fs, p) for p in fs.find(path))


def remove_tree(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = get_fs(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def open_file(uri: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None) -> Any:
    """An fsspec open file (a context manager)."""
    get_fs(uri, storage_options)  # a missing backend gets the clear error
    return fsspec.open(uri, mode, **dict(storage_options or {}))
