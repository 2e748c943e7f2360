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
        # Group messages by their kind, not by the file name inside them.
        key = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "_", message)[:160]
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
