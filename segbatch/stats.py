"""Per-class pixel statistics: column names, counts, and the job-wide totals."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def column_name(class_name: str) -> str:
    """'Potted Plant' -> 'potted_plant': lowercased, runs of other characters folded to '_'."""
    name = re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_")
    return name or "class"


def class_columns(classes: Sequence[str], prefix: str = "px_") -> list[str]:
    """``px_<name>`` for every class, lowercased, other characters folded to '_', made unique.

    VOC: ``px_background`` (from '__background__'), ``px_aeroplane``, ... ``px_tvmonitor``.
    """
    out: list[str] = []
    seen: dict[str, int] = {}
    for i, cls in enumerate(classes):
        base = col = prefix + column_name(cls)
        k = 0
        while col in seen or col == prefix + "nodata":
            k += 1
            col = f"{base}_{i}" if k == 1 else f"{base}_{i}_{k}"
        seen[col] = i
        out.append(col)
    return out


def pixel_counts(mask: np.ndarray, num_classes: int, nodata_value: int | None = None) -> np.ndarray:
    """(H, W) integer mask -> (num_classes,) int64 counts; nodata pixels are not counted."""
    flat = mask.reshape(-1).astype(np.int64, copy=False)
    counts = np.bincount(flat, minlength=max(num_classes, 1))
    if nodata_value is not None and nodata_value >= num_classes and counts.size > nodata_value:
        counts[nodata_value] = 0
    return counts[:num_classes].astype(np.int64)


# What a file is named by inside an error message: a URI with a scheme, anything quoted, a path
# (a token holding '/', '\\' or a shard's '#member'), a file name with a data file's extension,
# hex addresses and numbers. Tokens end before brackets, commas and quotes; a trailing ':' or '.'
# is punctuation of the message.
_URI = r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"()\[\]{},;<>]*"
_QUOTED = r"'[^']*'|\"[^\"]*\""
_TOKEN = r"[^\s'\"()\[\]{},;<>]"
_PATH = rf"{_TOKEN}*[/\\#]{_TOKEN}*"
_FILE_EXTENSIONS = (
    "png|jpe?g|tiff?|bmp|webp|gif|dcm|dicom|nii|gz|tar|parquet|txt|csv|json|ya?ml|pt|pth|zip"
)
_FILE_NAME = rf"{_TOKEN}*\.(?:{_FILE_EXTENSIONS})\b{_TOKEN}*"
_NAMES = re.compile(rf"{_URI}|{_QUOTED}|{_PATH}|{_FILE_NAME}|\b0x[0-9a-fA-F]+\b|\d+", re.IGNORECASE)
ERROR_KIND_CHARS = 160


def error_kind(message: str) -> str:
    """An error message with the names of files folded out, so messages group by their kind.

    ``"file not found: bkt/in/a.png"`` and ``"file not found: s3://bkt/in/b.png"`` are both
    ``"file not found: _"``; numbers fold too (``"image of _ x _ pixels"``).
    """

    def fold(match: re.Match[str]) -> str:
        text = match.group(0)
        if text[0] in "'\"":
            return "_"
        # A name at the end of a sentence keeps the sentence's punctuation.
        stripped = text.rstrip(":.")
        return "_" + text[len(stripped) :] if stripped else text

    return _NAMES.sub(fold, message)[:ERROR_KIND_CHARS]


@dataclass
class Totals:
    """Job-wide counts, accumulated on the driver from result rows."""

    num_classes: int
    ok: int = 0
    error: int = 0
    pixels: np.ndarray = field(init=False)
    nodata_px: int = 0
    errors_by_message: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pixels = np.zeros(self.num_classes, dtype=np.int64)

    def add_ok(self, counts: np.ndarray, nodata_px: int = 0) -> None:
        self.ok += 1
        self.pixels += counts
        self.nodata_px += nodata_px

    def add_error(self, message: str) -> None:
        self.error += 1
        key = error_kind(message)
        self.errors_by_message[key] = self.errors_by_message.get(key, 0) + 1

    @property
    def done(self) -> int:
        return self.ok + self.error

    @property
    def error_fraction(self) -> float:
        return self.error / self.done if self.done else 0.0

    def most_common_error(self) -> str | None:
        if not self.errors_by_message:
            return None
        return max(self.errors_by_message.items(), key=lambda kv: kv[1])[0]

    def fractions(self) -> np.ndarray:
        total = int(self.pixels.sum())
        return self.pixels / total if total else np.zeros_like(self.pixels, dtype=np.float64)
