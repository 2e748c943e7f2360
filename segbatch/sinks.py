"""Where results go: mask files, the Parquet schema and writer, summary.json.

Layout under the output root ``OUT``::

    OUT/job.yaml                      the resolved configuration (storage options redacted)
    OUT/masks/<rel path>.png          one mask per input (class indices, palette for viewing)
    OUT/results/part-00000.parquet    one row per input, schema from ``results_schema``
    OUT/overlays/<rel path>.png       image | mask | overlay panels for the first N inputs
    OUT/summary.json                  counts, per-class totals, timings, versions
"""

from __future__ import annotations

import contextlib
import errno
import io as stdio
import json
import os
import posixpath
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from segbatch import io
from segbatch.errors import NotSegbatchOutputError, OutputExistsError, OutputWriteError
from segbatch.overlays import flat_palette
from segbatch.stats import Totals, class_columns

MASKS_DIR = "masks"
RESULTS_DIR = "results"
OVERLAYS_DIR = "overlays"
SUMMARY_FILE = "summary.json"
JOB_FILE = "job.yaml"
# The names segbatch gives its results parts and a multi-frame DICOM's frame masks: --overwrite
# deletes files of these names only.
PART_RE = re.compile(r"^part-[0-9]{5,}\.parquet$")
FRAME_RE = re.compile(r"^frame_[0-9]{5,}\.png$")
MASK_SUFFIXES = (".png", ".tif", ".nii.gz")
# A part still filling is rewritten after this many new rows even before output.flush_every_s:
# a fast GPU job (100 images/s) then loses at most ~10 s of rows to a crash, and a part of
# rows_per_file rows is rewritten at most rows_per_file / 1000 times by this rule (each rewrite
# of 10,000 small rows takes tens of milliseconds).
FLUSH_EVERY_ROWS = 1000
# In the error of an input whose mask could not be written because the output storage is full:
# the driver stops the job on it instead of failing every remaining input the same way.
STORAGE_FULL = "the output storage is full"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# Columns every results file has, in order; the class columns follow.
BASE_FIELDS = (
    pa.field("index", pa.int64(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("width", pa.int64()),
    pa.field("height", pa.int64()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("mask_path", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("px_nodata", pa.int64()),
)
# Present when any input is a GeoTIFF: where the scene is and how large its pixels are.
GEO_FIELDS = (
    pa.field("crs", pa.string()),
    pa.field("bounds_left", pa.float64()),
    pa.field("bounds_bottom", pa.float64()),
    pa.field("bounds_right", pa.float64()),
    pa.field("bounds_top", pa.float64()),
    pa.field("pixel_size_x", pa.float64()),
    pa.field("pixel_size_y", pa.float64()),
)
# Present when any input is DICOM: the identifiers that join results back; no patient data.
DICOM_FIELDS = (
    pa.field("study_instance_uid", pa.string()),
    pa.field("series_instance_uid", pa.string()),
    pa.field("sop_instance_uid", pa.string()),
    pa.field("instance_number", pa.int64()),
)


def results_schema(
    classes: Sequence[str],
    geo: bool = False,
    dicom: bool = False,
    volumes: bool = False,
    component_classes: Sequence[str] = (),
) -> pa.Schema:
    """The explicit Parquet schema of a job's results; the class list goes in its metadata.

    ``px_<class>`` int64 pixel counts for every class; with ``geo`` also ``area_m2_<class>``;
    with ``dicom`` also ``area_mm2_<class>``; with ``volumes`` also ``volume_ml_<class>``;
    ``n_<class>`` connected-component counts for ``component_classes``.
    """
    fields = list(BASE_FIELDS)
    fields += [pa.field(c, pa.int64()) for c in class_columns(classes)]
    if geo:
        fields += GEO_FIELDS
        fields += [pa.field(c, pa.float64()) for c in class_columns(classes, "area_m2_")]
    if dicom:
        fields += DICOM_FIELDS
        fields += [pa.field(c, pa.float64()) for c in class_columns(classes, "area_mm2_")]
    if volumes:
        fields += [pa.field(c, pa.float64()) for c in class_columns(classes, "volume_ml_")]
    if component_classes:
        all_cols = dict(zip(classes, class_columns(classes, "n_"), strict=True))
        fields += [pa.field(all_cols[c], pa.int64()) for c in component_classes]
    meta = {b"segbatch.classes": json.dumps(list(classes)).encode()}
    return pa.schema(fields, metadata=meta)


def is_storage_full(exc: BaseException) -> bool:
    """True for "no space left on device" and "disk quota exceeded", also when wrapped."""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain, bounded: causes can form a cycle
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_space(uri: str) -> str:
    """'12.0 KiB free on /mnt/out' for a local path (its nearest existing folder), else ''."""
    if not io.is_local(uri):
        return ""
    path = os.path.abspath(uri.removeprefix("file://"))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        free = float(shutil.disk_usage(path).free)
    except OSError:
        return ""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            break
        free /= 1024
    return f"{free:.1f} {unit} free on {path}"


def write_failed_error(uri: str, exc: BaseException) -> OutputWriteError:
    """The error for a failed results write: the path, the cause, the free space, what next."""
    free = free_space(uri)
    return OutputWriteError(
        f"writing {io.redact(uri)} failed: {exc}" + (f" ({free})" if free else "") + "; make "
        "room there and run the same command again with --resume: the rows written so far are "
        "kept"
    )


def mask_rel_path(rel_path: str, suffix: str = ".png") -> str:
    """'a/b/c.JPG' -> 'a/b/c.png'; 'x.nii.gz' -> 'x.nii.gz' with suffix '.nii.gz'."""
    rel = io.safe_relpath(rel_path)
    lower = rel.lower()
    if lower.endswith(".nii.gz"):
        stem = rel[: -len(".nii.gz")]
    else:
        stem = posixpath.splitext(rel)[0]
    return stem + suffix


def mask_uri(out_root: str, rel_path: str, suffix: str = ".png") -> str:
    """``OUT/masks/<rel path, extension replaced by suffix>``, never outside ``out_root``."""
    return io.under_root(io.join(out_root, MASKS_DIR), mask_rel_path(rel_path, suffix))


def encode_mask_png(mask: np.ndarray, num_classes: int) -> bytes:
    """(H, W) uint8 -> palette PNG; uint16 (over 256 classes) -> 16-bit grey PNG."""
    if mask.dtype == np.uint8:
        im = Image.fromarray(mask, mode="L")
        im.putpalette(flat_palette(num_classes))
    else:
        im = Image.fromarray(mask.astype(np.uint16))
    buf = stdio.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def write_mask(
    out_root: str,
    rel_path: str,
    mask: np.ndarray,
    num_classes: int,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write one PNG mask atomically; returns its URI (inside ``out_root``, always)."""
    uri = mask_uri(out_root, rel_path)
    io.write_bytes_atomic(uri, encode_mask_png(mask, num_classes), storage_options)
    return uri


def write_overlay(
    out_root: str,
    rel_path: str,
    png: bytes,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    uri = io.under_root(io.join(out_root, OVERLAYS_DIR), mask_rel_path(rel_path))
    io.write_bytes_atomic(uri, png, storage_options)
    return uri


def prepare_output(
    out_root: str, overwrite: bool, resume: bool, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Check the output root, and clear or tidy it as asked (:func:`check_output`, then
    :func:`remove_own_outputs` where --overwrite has something to delete)."""
    if check_output(out_root, overwrite, resume, storage_options):
        remove_own_outputs(out_root, storage_options)


def check_output(
    out_root: str, overwrite: bool, resume: bool, storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Check the output root before Ray starts; True when --overwrite has outputs to delete.

    A missing or empty root is fine. A root counts as a segbatch output only when it holds
    ``OUT/job.yaml``: --resume and --overwrite need one, and --overwrite then deletes only the
    files segbatch wrote (see :func:`remove_own_outputs`), never other files. Nothing is deleted
    here but a killed run's temp files on --resume, so a job refused later (no GPU, say) has
    lost nothing.
    """
    fs, path = io.get_fs(out_root, storage_options)
    exists = bool(fs.exists(path))
    if exists and not fs.isdir(path):
        raise OutputExistsError(f"output {io.redact(out_root)} is a file; give a folder")
    io.check_writable_local(out_root)
    owned = exists and bool(fs.exists(io.join(path, JOB_FILE)))
    if resume:
        if not owned:
            raise NotSegbatchOutputError(
                f"--resume: {io.redact(out_root)} has no {JOB_FILE}, so it holds no segbatch run "
                "to continue; give the --output of the run to resume, or start a run without "
                "--resume (into an empty or new --output)"
            )
        remove_stale_temps(out_root, storage_options)
        return False
    if not exists or not fs.ls(path, detail=False):
        return False
    if not overwrite:
        raise OutputExistsError(
            f"output {io.redact(out_root)} is not empty; pass --overwrite to replace segbatch's "
            "outputs there, --resume to continue a run, or choose another --output"
        )
    if not owned:
        raise OutputExistsError(
            f"--overwrite: {io.redact(out_root)} holds files but no {JOB_FILE}, so it is not a "
            "segbatch output and nothing there is segbatch's to delete; choose an empty or new "
            "--output, or remove those files yourself"
        )
    return True


def remove_stale_temps(out_root: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Delete the temp files a killed run left in segbatch's own folders; returns how many.

    OUT itself and results/ are flat; masks/ and overlays/ are trees (they mirror the inputs).
    """
    removed = io.remove_stale_temps(out_root, storage_options)
    removed += io.remove_stale_temps(io.join(out_root, RESULTS_DIR), storage_options)
    for tree in (MASKS_DIR, OVERLAYS_DIR):
        removed += io.remove_stale_temps(io.join(out_root, tree), storage_options, recursive=True)
    return removed


def _own_rel_path(mask_path: str, roots: Sequence[str]) -> str | None:
    """The path of a row's mask below ``<root>/masks/`` for one of ``roots``, else None.

    ``roots``: this run's output root and the one OUT/job.yaml recorded (the spelling the rows
    were written with). A mask_path elsewhere is not this output's file: it is never deleted.
    """
    for root in roots:
        prefix = io.join(root, MASKS_DIR) + "/"
        if io.is_local(root):
            mask_path, prefix = posixpath.normpath(mask_path), posixpath.normpath(prefix) + "/"
        if mask_path.startswith(prefix) and len(mask_path) > len(prefix):
            return io.safe_relpath(mask_path[len(prefix) :])
    return None


def _remove_file(fs: Any, path: str) -> None:
    # Missing: never written (an overlay past output.overlays) or removed by an earlier try.
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def remove_own_outputs(out_root: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """--overwrite: delete what segbatch wrote in a segbatch output root, nothing else.

    That is job.yaml, summary.json, ``results/part-NNNNN.parquet``, the masks its rows name
    (``mask_path``; a DICOM row's folder of ``frame_NNNNN.png``), the overlays of those rows,
    and stale temps in those folders; then the folders left empty. Parts are read one at a
    time (``mask_path`` only), so memory stays that of one part at any input count. job.yaml
    goes last: an interrupted overwrite can be repeated.
    """
    import yaml

    fs, path = io.get_fs(out_root, storage_options)
    job_uri = io.join(out_root, JOB_FILE)
    try:
        recorded = (yaml.safe_load(io.read_bytes(job_uri, storage_options)) or {}).get("output")
        first_root = recorded.get("path") if isinstance(recorded, dict) else None
    except (yaml.YAMLError, AttributeError):
        first_root = None
    roots = [out_root, *([first_root] if isinstance(first_root, str) else [])]
    roots += [io.redact(r) for r in roots]  # rows hold URIs without credentials
    masks_root = io.join(path, MASKS_DIR)
    for uri in result_parts(out_root, storage_options):
        if not PART_RE.match(posixpath.basename(uri)):
            continue  # not a name segbatch writes
        try:
            with io.open_file(uri, "rb", storage_options) as fh:
                mask_paths = pq.read_table(fh, columns=["mask_path"]).column("mask_path")
        except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
            raise OutputExistsError(
                f"--overwrite: {io.redact(uri)} cannot be read as segbatch results ({exc}), so "
                "the masks it lists are unknown; remove the output yourself or choose another "
                "--output"
            ) from exc
        for mask_path in mask_paths.to_pylist():
            rel = _own_rel_path(mask_path, roots) if mask_path else None
            if rel is None:
                continue
            mask = io.join(masks_root, rel)
            # A multi-frame DICOM's mask is a folder of one PNG per frame (no mask suffix).
            if not rel.lower().endswith(MASK_SUFFIXES) and fs.isdir(mask):
                for frame in fs.ls(mask, detail=False):
                    if FRAME_RE.match(posixpath.basename(frame)):
                        _remove_file(fs, frame)
            else:
                _remove_file(fs, mask)
            _remove_file(fs, io.join(path, OVERLAYS_DIR, mask_rel_path(rel)))
        _remove_file(fs, io.get_fs(uri, storage_options)[1])
    remove_stale_temps(out_root, storage_options)
    _remove_file(fs, io.join(path, SUMMARY_FILE))
    for folder in (MASKS_DIR, OVERLAYS_DIR, RESULTS_DIR):
        io.remove_empty_dirs(io.join(out_root, folder))
    _remove_file(fs, io.join(path, JOB_FILE))


def table_from_rows(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) -> a table with exactly ``schema``; missing columns are null."""
    arrays = [pa.array([row.get(f.name) for row in rows], type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


class ResultsWriter:
    """Writes result rows to ``OUT/results/part-NNNNN.parquet`` on the driver.

    Input ``i`` belongs to part ``i // rows_per_file``: file names depend only on the input
    order, so a rerun overwrites rather than duplicates. A part is written (atomically) as soon
    as all the rows it waits for have arrived; rows may arrive in any order, and a row that
    arrives twice (a retried task) is kept once. On resume, ``todo`` lists the inputs being
    run: a part keeps the ok rows of its previous file for the inputs not run again.

    A part still filling is rewritten (atomically, with all its rows so far) once
    ``flush_every_s`` seconds of ``clock`` or ``flush_every_rows`` new rows have passed since
    the last write, so a killed driver loses minutes of rows at most; --resume reads such a
    part like any other. Its rows stay in memory until it is complete (at most rows_per_file
    per open part), and a failed write keeps them there and raises ``OutputWriteError``.
    """

    def __init__(
        self,
        out_root: str,
        schema: pa.Schema,
        total: int,
        rows_per_file: int,
        storage_options: Mapping[str, Any] | None = None,
        todo: np.ndarray | None = None,
        flush_every_s: float = 30.0,
        flush_every_rows: int = FLUSH_EVERY_ROWS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out_root = out_root
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.storage_options = storage_options
        self.total = total
        self.resuming = todo is not None
        todo_idx = np.arange(total) if todo is None else np.flatnonzero(todo)
        parts, counts = np.unique(todo_idx // rows_per_file, return_counts=True)
        self.expected = {int(p): int(c) for p, c in zip(parts, counts, strict=True)}
        self.pending: dict[int, dict[int, Mapping[str, Any]]] = {}
        self.written: list[str] = []
        # Parts whose file is complete: a row for one of them arriving again (a retried task)
        # is already in that file, and must not start the part anew with that row alone.
        self.complete: set[int] = set()
        self.flush_every_s = flush_every_s
        self.flush_every_rows = flush_every_rows
        self.clock = clock
        self.last_flush = clock()
        # Parts with rows that are not yet in their file, and how many such rows in all.
        self.unflushed: set[int] = set()
        self.unflushed_rows = 0

    def part_uri(self, part: int) -> str:
        return io.join(self.out_root, RESULTS_DIR, f"part-{part:05d}.parquet")

    def add(self, row: Mapping[str, Any]) -> None:
        index = int(row["index"])
        part = index // self.rows_per_file
        if part in self.complete:
            return
        rows = self.pending.setdefault(part, {})
        rows[index] = row
        self.unflushed.add(part)
        self.unflushed_rows += 1
        if len(rows) >= self.expected.get(part, self.rows_per_file):
            self._write(part)
            self.written.append(self.part_uri(part))
            self.complete.add(part)
            del self.pending[part]
            self.unflushed.discard(part)
        if self.unflushed and (
            self.unflushed_rows >= self.flush_every_rows
            or self.clock() - self.last_flush >= self.flush_every_s
        ):
            self.flush()

    def flush(self) -> None:
        """Rewrite every part still filling that got rows since its last write."""
        for part in sorted(self.unflushed):
            self._write(part)
            self.unflushed.discard(part)
        self.unflushed_rows = 0
        self.last_flush = self.clock()

    def _previous_rows(self, part: int, replaced: set[int]) -> list[dict[str, Any]]:
        """Ok rows of the part's previous file, for inputs this run did not redo."""
        uri = self.part_uri(part)
        if not self.resuming or not io.exists(uri, self.storage_options):
            return []
        with io.open_file(uri, "rb", self.storage_options) as fh:
            table = pq.read_table(fh)
        return [
            r for r in table.to_pylist() if r["status"] == "ok" and int(r["index"]) not in replaced
        ]

    def _write(self, part: int) -> None:
        """Write the part's file with its previous rows (resume) and every row it has now.

        The rows stay in ``pending`` (the caller drops them once the part is complete): a write
        that fails loses nothing, and an earlier flush of this run is replaced, never repeated
        (its rows are in ``pending`` and so count as redone, not as previous rows).
        """
        new = self.pending.get(part, {})
        if not new:
            return
        uri = self.part_uri(part)
        try:
            rows = [*self._previous_rows(part, set(new)), *new.values()]
            rows.sort(key=lambda r: int(r["index"]))
            table = table_from_rows(rows, self.schema)
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf, compression="zstd")
            io.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), self.storage_options)
        except OSError as exc:
            raise write_failed_error(uri, exc) from exc

    def close(self) -> None:
        """Write every part still pending (parts that lost rows to an early stop).

        Tries every part even when one fails, then raises the first ``OutputWriteError``; the
        rows of the parts that failed stay in ``pending``.
        """
        first_error: OutputWriteError | None = None
        for part in sorted(self.pending):
            try:
                self._write(part)
            except OutputWriteError as exc:
                first_error = first_error or exc
                continue
            self.written.append(self.part_uri(part))
            del self.pending[part]
            self.unflushed.discard(part)
        if first_error is not None:
            raise first_error


def result_parts(out_root: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    return [
        u
        for u in io.list_files(io.join(out_root, RESULTS_DIR), storage_options)
        if u.endswith(".parquet")
    ]


def read_done(
    out_root: str, paths: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> np.ndarray:
    """(N,) bool: inputs with an ok row in OUT/results, for --resume.

    One bit per input (a million done inputs cost 1 MB); only the ``index``, ``path`` and
    ``status`` columns are read. A row whose path differs from the input now at its index
    means the input list changed: resuming would mix two jobs, so it is refused. Paths are
    compared redacted (``io.redact``), the form the results hold.
    """
    done = np.zeros(len(paths), dtype=bool)
    for uri in result_parts(out_root, storage_options):
        with io.open_file(uri, "rb", storage_options) as fh:
            table = pq.read_table(fh, columns=["index", "path", "status"])
        for index, path, status in zip(
            table.column("index").to_pylist(),
            table.column("path").to_pylist(),
            table.column("status").to_pylist(),
            strict=True,
        ):
            if index >= len(paths) or io.redact(paths[index]) != io.redact(path):
                raise OutputExistsError(
                    f"--resume: {io.redact(uri)} has a row for input {index} ({path!r}) that is "
                    "not this job's input at that position; the input list changed since the "
                    "first run. Resume with the same inputs, or start a new output."
                )
            done[index] = status == "ok"
    return done


def read_totals(
    out_root: str, classes: Sequence[str], storage_options: Mapping[str, Any] | None = None
) -> Totals:
    """Job-wide totals from the written Parquet parts: what the job's outputs say, whether it
    ran in one go or was resumed."""
    cols = class_columns(classes)
    totals = Totals(len(classes))
    for uri in result_parts(out_root, storage_options):
        with io.open_file(uri, "rb", storage_options) as fh:
            table = pq.read_table(fh, columns=["status", "error", "px_nodata", *cols])
        status = table.column("status").to_pylist()
        errors = table.column("error").to_pylist()
        nodata = table.column("px_nodata").to_pylist()
        counts = np.stack(
            [table.column(c).fill_null(0).to_numpy().astype(np.int64) for c in cols], axis=1
        )
        for i, st in enumerate(status):
            if st == "ok":
                totals.add_ok(counts[i], int(nodata[i] or 0))
            else:
                totals.add_error(str(errors[i]))
    return totals


def write_summary(
    out_root: str, summary: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None
) -> None:
    data = json.dumps(summary, indent=2, sort_keys=False).encode()
    io.write_bytes_atomic(io.join(out_root, SUMMARY_FILE), data, storage_options)
