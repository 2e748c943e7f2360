"""Where results go: mask files, the Parquet schema and writer, summary.json.

Layout under the output root ``OUT``::

    OUT/job.yaml                      the resolved configuration (storage options redacted)
    OUT/masks/<rel path>.png          one mask per input (class indices, palette for viewing)
    OUT/results/part-00000.parquet    one row per input, schema from ``results_schema``
    OUT/overlays/<rel path>.png       image | mask | overlay panels for the first N inputs
    OUT/summary.json                  counts, per-class totals, timings, versions
"""

from __future__ import annotations

import io as stdio
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from segbatch import io
from segbatch.errors import OutputExistsError
from segbatch.overlays import flat_palette
from segbatch.stats import Totals, class_columns

MASKS_DIR = "masks"
RESULTS_DIR = "results"
OVERLAYS_DIR = "overlays"
SUMMARY_FILE = "summary.json"
JOB_FILE = "job.yaml"
OWNED_OUTPUTS = (MASKS_DIR, RESULTS_DIR, OVERLAYS_DIR, SUMMARY_FILE, JOB_FILE)

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
    """Refuse a non-empty output root unless --overwrite (which clears segbatch's own outputs
    only, never other files) or --resume."""
    fs, path = io.get_fs(out_root, storage_options)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise OutputExistsError(f"output {io.redact(out_root)} is a file; give a folder")
    entries = fs.ls(path, detail=False)
    if resume:
        io.remove_stale_temps(out_root, storage_options)
        return
    if not entries:
        return
    if not overwrite:
        raise OutputExistsError(
            f"output {io.redact(out_root)} is not empty; pass --overwrite to replace segbatch's "
            "outputs there, --resume to continue a run, or choose another --output"
        )
    for name in OWNED_OUTPUTS:
        target = io.join(out_root, name)
        io.remove_tree(target, storage_options)


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
    """

    def __init__(
        self,
        out_root: str,
        schema: pa.Schema,
        total: int,
        rows_per_file: int,
        storage_options: Mapping[str, Any] | None = None,
        todo: np.ndarray | None = None,
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

    def part_uri(self, part: int) -> str:
        return io.join(self.out_root, RESULTS_DIR, f"part-{part:05d}.parquet")

    def add(self, row: Mapping[str, Any]) -> None:
        index = int(row["index"])
        part = index // self.rows_per_file
        rows = self.pending.setdefault(part, {})
        rows[index] = row
        if len(rows) >= self.expected.get(part, self.rows_per_file):
            self._write(part)

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
        new = self.pending.pop(part, {})
        if not new:
            return
        rows = [*self._previous_rows(part, set(new)), *new.values()]
        rows.sort(key=lambda r: int(r["index"]))
        table = table_from_rows(rows, self.schema)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        uri = self.part_uri(part)
        io.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), self.storage_options)
        self.written.append(uri)

    def close(self) -> None:
        """Write every part still pending (parts that lost rows to an early stop)."""
        for part in sorted(self.pending):
            self._write(part)


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
