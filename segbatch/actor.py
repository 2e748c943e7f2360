"""The inference actor: one model per actor process, batches of decoded rows in, result rows out.

Ray Data builds one ``SegmentActor`` per pool slot (the model is loaded once, in ``__init__``)
and calls it with batches. Masks and overlays are written from a small thread pool so that
storage latency overlaps the next forward pass; only small result rows go back to the driver.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from segbatch import io, sinks
from segbatch.attempts import stopped_worker_message
from segbatch.components import count_components
from segbatch.config import JobConfig
from segbatch.loader import (
    KIND_IMAGE,
    KIND_SCENE,
    KIND_VOLUME,
    Batch,
    error_message,
    errors_in,
    errors_out,
    image_at,
)
from segbatch.models import ModelInfo
from segbatch.overlays import render_panels, save_panels
from segbatch.predictor import Predictor
from segbatch.scenes import mask_palette, segment_raster, segment_volume
from segbatch.stats import class_columns, pixel_counts

log = logging.getLogger("segbatch")


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


def _storage_note(exc: BaseException) -> str:
    """The marker the driver stops the job on when the output storage is full, else ''."""
    return f"{sinks.STORAGE_FULL}: " if sinks.is_storage_full(exc) else ""


class SegmentActor:
    """Predictor plus mask sink. ``__call__`` maps a decoded batch to result rows.

    ``ledger``: a Ray handle to an :class:`~segbatch.attempts.AttemptLedger` and this run's key
    in it (None: no bookkeeping). Rows with an
    unfinished earlier attempt run one at a time, so that only the input that stops the worker
    gathers attempts; at ``inference.max_input_attempts`` it becomes an error row unrun.
    """

    def __init__(
        self,
        job: JobConfig,
        info: ModelInfo,
        batch_size: int,
        code: dict[str, bytes] | None = None,
        ledger: tuple[Any, str] | None = None,
    ) -> None:
        if code is not None and info.code_path is not None:
            info = dataclasses.replace(info, code_path=unpack_code(code, info.code_path))
        self.job = job
        self.info = info
        self.batch_size = batch_size
        self.options = job.storage.options
        self.predictor = Predictor(info, job.inference, job.tiling, self.options)
        self.pool = ThreadPoolExecutor(max_workers=max(1, job.output.mask_write_threads))
        # Logits become masks (resize to the original size, argmax) in this thread while the
        # next group goes through the model (inference.post_threads; 0: in turn with it).
        post = job.inference.post_threads or 0
        self.post_pool = ThreadPoolExecutor(max_workers=post) if post > 0 else None
        self.ledger = ledger

    def _ledger(self, method: str, indices: list[int]) -> Any:
        """Call the ledger (None without one, or once it failed: the job then runs as if
        without the bookkeeping rather than failing)."""
        if self.ledger is None or not indices:
            return None
        import ray

        try:
            handle, run = self.ledger
            return ray.get(getattr(handle, method).remote(run, indices))
        except Exception as exc:
            log.warning("the attempt ledger failed (%s); inputs are no longer counted", exc)
            self.ledger = None
            return None

    def _segment(
        self, images: list[np.ndarray], sizes: list[tuple[int, int]]
    ) -> Iterator[tuple[int, np.ndarray | BaseException]]:
        """``(index, mask)`` as each group is done; if a group fails (one bad size, out of
        memory), every image not yet done alone, an error in place of a mask where that fails."""
        done: set[int] = set()
        try:
            for j, mask in self.predictor.segment_iter(
                images, sizes, self.batch_size, self.post_pool
            ):
                done.add(j)
                yield j, mask
        except Exception:
            for j, (image, size) in enumerate(zip(images, sizes, strict=True)):
                if j in done:
                    continue
                try:
                    yield j, self.predictor.segment([image], [size], 1)[0]
                except Exception as exc:
                    yield j, exc

    def _write(
        self, index: int, rel_path: str, image: np.ndarray, mask: np.ndarray, meta: dict[str, Any]
    ) -> str:
        out = self.job.output.path
        geo = meta.get("geo")
        if geo is not None and geo["georeferenced"]:
            uri = self._write_geotiff(rel_path, mask, geo)
        else:
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

    def _write_geotiff(self, rel_path: str, mask: np.ndarray, geo: dict[str, Any]) -> str:
        from segbatch.geo import GeoTiffMaskWriter, geo_info_from_dict

        info = geo_info_from_dict(geo)
        uri = sinks.mask_uri(self.job.output.path, rel_path, ".tif")
        height, width = mask.shape
        with GeoTiffMaskWriter(
            uri,
            height,
            width,
            info,
            mask.dtype.name,
            self.job.output.nodata_value,
            mask_palette(self.info.num_classes),
            self.options,
        ) as writer:
            writer.write_block(0, 0, mask)
        return uri

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["index"])
        k = self.info.num_classes
        errors = errors_in(batch["error"])
        counts = np.zeros((n, k), dtype=np.int64)
        nodata = np.zeros(n, dtype=np.int64)
        widths = np.asarray(batch["width"], dtype=np.int64).copy()
        heights = np.asarray(batch["height"], dtype=np.int64).copy()
        mask_paths: list[str | None] = [None] * n
        extras: list[dict[str, Any]] = [{} for _ in range(n)]
        metas = [json.loads(m) if isinstance(m, str) and m else {} for m in batch["meta"]]

        index = [int(v) for v in batch["index"]]
        kinds = (KIND_IMAGE, KIND_SCENE, KIND_VOLUME)
        runnable = [i for i in range(n) if batch["kind"][i] in kinds and errors[i] is None]
        tried = self._ledger("unfinished", [index[i] for i in runnable])
        suspects: set[int] = set()
        for i, (attempts, alone) in zip(runnable, tried or [], strict=True):
            # Proven only once it stopped a worker running it alone (an innocent row of the
            # same batch never is): that spares the others of a killed batch at any limit.
            if attempts >= self.job.inference.max_input_attempts and alone > 0:
                errors[i] = stopped_worker_message(attempts)
            elif attempts > 0:
                suspects.add(i)

        todo = [i for i in range(n) if batch["kind"][i] == KIND_IMAGE and errors[i] is None]
        # Rows that never stopped a worker run together; suspects alone, each marked.
        groups = [[i for i in todo if i not in suspects], *([i] for i in todo if i in suspects)]
        futures: dict[int, Future[str]] = {}
        for group in groups:
            if group:
                self._ledger("start", [index[i] for i in group])
                done = self._segment_images(batch, group, metas, errors, counts, nodata, extras)
                futures.update(done)
                self._ledger("finish", [index[i] for i in group])

        for i in range(n):
            kind = batch["kind"][i]
            if errors[i] is not None or kind not in (KIND_SCENE, KIND_VOLUME):
                continue
            self._ledger("start", [index[i]])
            try:
                uri, rel = str(batch["uri"][i]), str(batch["rel_path"][i])
                if kind == KIND_SCENE:
                    scene = segment_raster(self.predictor, uri, rel, self.job, self.info)
                else:
                    scene = segment_volume(
                        self.predictor, uri, rel, self.job, self.info, self.batch_size
                    )
            except Exception as exc:
                errors[i] = (
                    f"segmenting this {kind} failed: {_storage_note(exc)}{error_message(exc)}"
                )
                continue
            finally:
                self._ledger("finish", [index[i]])
            mask_paths[i] = scene.mask_uri
            heights[i], widths[i] = scene.height, scene.width
            counts[i], nodata[i] = scene.counts, scene.nodata_px
            extras[i] = self._extra_columns({**metas[i], **scene.meta}, scene.counts, scene.mask)

        for i, fut in futures.items():
            try:
                mask_paths[i] = fut.result()
            except Exception as exc:
                errors[i] = f"writing the mask failed: {_storage_note(exc)}{error_message(exc)}"
        return {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "uri": np.asarray(batch["uri"], dtype=object),
            "width": widths,
            "height": heights,
            "error": errors_out(errors),
            "mask_path": np.array([m or "" for m in mask_paths], dtype=object),
            "counts": counts,
            "px_nodata": nodata,
            "extra": np.array([json.dumps(e) for e in extras], dtype=object),
            "retries": np.asarray(batch["retries"], dtype=np.int64)
            if "retries" in batch
            else np.zeros(n, dtype=np.int64),
        }

    def _segment_images(
        self,
        batch: Batch,
        rows: list[int],
        metas: list[dict[str, Any]],
        errors: list[str | None],
        counts: np.ndarray,
        nodata: np.ndarray,
        extras: list[dict[str, Any]],
    ) -> dict[int, Future[str]]:
        """Segment the image ``rows`` of ``batch``, filling their ``errors``, ``counts``,
        ``nodata`` and ``extras``; returns the mask writes, by row."""
        k = self.info.num_classes
        nodata_value = self.job.output.nodata_value
        images = [image_at(batch, i) for i in rows]
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in rows]
        futures: dict[int, Future[str]] = {}
        # Each mask goes to the write pool as soon as it is made, while the next image runs.
        for j, result in self._segment(images, sizes):
            i = rows[j]
            if isinstance(result, BaseException):
                errors[i] = f"inference failed: {error_message(result)}"
                continue
            valid = batch["valid"][i]
            if valid.size:
                result[~valid] = nodata_value
                nodata[i] = int((~valid).sum())
            counts[i] = pixel_counts(result, k, nodata_value)
            extras[i] = self._extra_columns(metas[i], counts[i], result)
            futures[i] = self.pool.submit(
                self._write,
                int(batch["index"][i]),
                str(batch["rel_path"][i]),
                images[j],
                result,
                metas[i],
            )
        return futures

    def _extra_columns(
        self, meta: dict[str, Any], counts: np.ndarray, mask: np.ndarray | None
    ) -> dict[str, Any]:
        """The optional Parquet columns of one row: geo, DICOM, volume and component counts."""
        classes = self.info.classes
        extra: dict[str, Any] = {}
        geo = meta.get("geo")
        if geo is not None:
            from segbatch.geo import class_areas_m2, geo_columns, geo_info_from_dict

            info = geo_info_from_dict(geo)
            extra.update(geo_columns(info))
            areas = class_areas_m2(counts, info)
            if areas is not None:
                extra.update(zip(class_columns(classes, "area_m2_"), areas.tolist(), strict=True))
        dicom = meta.get("dicom")
        if dicom is not None:
            from segbatch.medical import area_mm2

            ids = dicom["ids"]
            number = ids.get("InstanceNumber")
            extra.update(
                {
                    "study_instance_uid": ids.get("StudyInstanceUID"),
                    "series_instance_uid": ids.get("SeriesInstanceUID"),
                    "sop_instance_uid": ids.get("SOPInstanceUID"),
                    "instance_number": int(number) if number is not None else None,
                }
            )
            spacing = dicom.get("spacing_mm")
            areas = area_mm2(counts, tuple(spacing)) if spacing else None
            if areas is not None:
                extra.update(zip(class_columns(classes, "area_mm2_"), areas.tolist(), strict=True))
        if "volume_ml" in meta:
            extra.update(zip(class_columns(classes, "volume_ml_"), meta["volume_ml"], strict=True))
        wanted = self.job.stats.count_components
        if wanted and mask is not None:
            ids_by_name = {c: i for i, c in enumerate(classes)}
            found = count_components(
                mask, [ids_by_name[c] for c in wanted], self.job.stats.min_component_px
            )
            names = dict(zip(classes, class_columns(classes, "n_"), strict=True))
            extra.update({names[c]: found[ids_by_name[c]] for c in wanted})
        return extra


def result_rows(batch: Batch, model: str, class_cols: list[str]) -> list[dict[str, Any]]:
    """The actor's output batch -> Parquet rows (dicts keyed by schema column names)."""
    rows = []
    errors = errors_in(batch["error"])
    for i in range(len(batch["index"])):
        error = errors[i]
        ok = error is None
        row: dict[str, Any] = {
            "index": int(batch["index"][i]),
            # Stored redacted: a URI's user:password@ or signature must not reach the results.
            "path": io.redact(str(batch["uri"][i])),
            "width": int(batch["width"][i]) if batch["width"][i] >= 0 else None,
            "height": int(batch["height"][i]) if batch["height"][i] >= 0 else None,
            "status": "ok" if ok else "error",
            "error": None if ok else io.redact_text(str(error)),
            "mask_path": io.redact(str(batch["mask_path"][i])) if ok else None,
            "model": model,
            "px_nodata": int(batch["px_nodata"][i]) if ok else None,
        }
        if ok:
            row.update(zip(class_cols, (int(c) for c in batch["counts"][i]), strict=True))
        row.update(json.loads(batch["extra"][i]))
        rows.append(row)
    return rows
