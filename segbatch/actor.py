"""The inference actor: one model per actor process, batches of decoded rows in, result rows out.

Ray Data builds one ``SegmentActor`` per pool slot (the model is loaded once, in ``__init__``)
and calls it with batches. Masks and overlays are written from a small thread pool so that
storage latency overlaps the next forward pass; only small result rows go back to the driver.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from segbatch import sinks
from segbatch.config import JobConfig
from segbatch.loader import KIND_IMAGE, Batch, error_message, errors_in, errors_out
from segbatch.models import ModelInfo
from segbatch.overlays import render_panels, save_panels
from segbatch.predictor import Predictor
from segbatch.stats import pixel_counts


def unpack_code(files: dict[str, bytes], name: str) -> str:
    """Write user model code shipped with the job into a private folder; returns the new
    code_path (the folder, or the .py file inside it when a single file was shipped)."""
    root = tempfile.mkdtemp(prefix="segbatch-code-")
    for rel, data in files.items():
        target = os.path.join(root, *rel.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(data)
    single = name.endswith(".py") and list(files) == [name]
    return os.path.join(root, name) if single else root


class SegmentActor:
    """Predictor plus mask sink. ``__call__`` maps a decoded batch to result rows."""

    def __init__(
        self,
        job: JobConfig,
        info: ModelInfo,
        batch_size: int,
        code: dict[str, bytes] | None = None,
    ) -> None:
        if code is not None and info.code_path is not None:
            info = dataclasses.replace(info, code_path=unpack_code(code, info.code_path))
        self.job = job
        self.info = info
        self.batch_size = batch_size
        self.options = job.storage.options
        self.predictor = Predictor(info, job.inference, job.tiling, self.options)
        self.pool = ThreadPoolExecutor(max_workers=max(1, job.output.mask_write_threads))

    def _segment(
        self, images: list[np.ndarray], sizes: list[tuple[int, int]]
    ) -> list[np.ndarray | BaseException]:
        """Masks for images; if the batch fails (one bad size, out of memory), each image alone."""
        try:
            return list(self.predictor.segment(images, sizes, self.batch_size))
        except Exception:
            results: list[np.ndarray | BaseException] = []
            for image, size in zip(images, sizes, strict=True):
                try:
                    results.append(self.predictor.segment([image], [size], 1)[0])
                except Exception as exc:
                    results.append(exc)
            return results

    def _write(self, index: int, rel_path: str, image: np.ndarray, mask: np.ndarray) -> str:
        out = self.job.output.path
        uri = sinks.write_mask(out, rel_path, mask, self.info.num_classes, self.options)
        if index < self.job.output.overlays:
            view = mask
            if image.shape[:2] != mask.shape:
                # The image arrived resized for the model; show the mask at that size.
                size = (image.shape[1], image.shape[0])
                view = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
            panels = render_panels(image, view, self.info.classes)
            sinks.write_overlay(out, rel_path, save_panels(panels), self.options)
        return uri

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["index"])
        k = self.info.num_classes
        errors = errors_in(batch["error"])
        counts = np.zeros((n, k), dtype=np.int64)
        nodata = np.zeros(n, dtype=np.int64)
        mask_paths: list[str | None] = [None] * n
        extras: list[str] = [json.dumps({})] * n

        todo = [i for i in range(n) if batch["kind"][i] == KIND_IMAGE and errors[i] is None]
        images = [batch["image"][i] for i in todo]
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in todo]
        futures: dict[int, Future[str]] = {}
        for i, result in zip(todo, self._segment(images, sizes), strict=True):
            if isinstance(result, BaseException):
                errors[i] = f"inference failed: {error_message(result)}"
                continue
            counts[i] = pixel_counts(result, k)
            futures[i] = self.pool.submit(
                self._write,
                int(batch["index"][i]),
                str(batch["rel_path"][i]),
                batch["image"][i],
                result,
            )
        for i, fut in futures.items():
            try:
                mask_paths[i] = fut.result()
            except Exception as exc:
                errors[i] = f"writing the mask failed: {error_message(exc)}"
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "uri": np.asarray(batch["uri"], dtype=object),
            "width": np.asarray(batch["width"], dtype=np.int64),
            "height": np.asarray(batch["height"], dtype=np.int64),
            "error": errors_out(errors),
            "mask_path": np.array([m or "" for m in mask_paths], dtype=object),
            "counts": counts,
            "px_nodata": nodata,
            "extra": np.array(extras, dtype=object),
        }


def result_rows(batch: Batch, model: str, class_cols: list[str]) -> list[dict[str, Any]]:
    """The actor's output batch -> Parquet rows (dicts keyed by schema column names)."""
    rows = []
    errors = errors_in(batch["error"])
    for i in range(len(batch["index"])):
        error = errors[i]
        ok = error is None
        row: dict[str, Any] = {
            "index": int(batch["index"][i]),
            "path": str(batch["uri"][i]),
            "width": int(batch["width"][i]) if batch["width"][i] >= 0 else None,
            "height": int(batch["height"][i]) if batch["height"][i] >= 0 else None,
            "status": "ok" if ok else "error",
            "error": None if ok else str(error),
            "mask_path": batch["mask_path"][i] if ok else None,
            "model": model,
            "px_nodata": int(batch["px_nodata"][i]) if ok else None,
        }
        if ok:
            row.update(zip(class_cols, (int(c) for c in batch["counts"][i]), strict=True))
        row.update(json.loads(batch["extra"][i]))
        rows.append(row)
    return rows
