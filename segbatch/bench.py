"""``segbatch bench``: how fast a model runs on this machine, three ways, and what limits each.

    model only    pre-decoded, pre-resized, normalized batches already on the device:
                  forward + argmax. The ceiling for this model on this machine.
    plain loop    the notebook's way, one image at a time: PIL decode, (the preset's resize),
                  ToTensor, Normalize, forward, argmax, mask resized to the original size
                  (nearest), pixel counts, PNG written.
    end to end    ``segbatch.pipeline.run_job`` on the same JPEG files: masks and Parquet.

Every figure is the median of ``repeats`` runs, with min and max. End-to-end throughput is the
steady state, taken from the mask files' modification times (each mask is written as soon as its
image is segmented): images after the warm-up (the first batch, or the first 10%, whichever is
more) divided by the time they took. Start-up is reported apart: Ray's start, and the time from
calling ``run_job`` to the first mask on disk (actor start, model build, first batch).

``--memory`` runs one long job instead (10,000 tiny images by default) and samples the driver's
resident memory and Ray's object store (used and spilled bytes) while it runs.

The images are synthetic but realistic: random crops of the sample photos, resized to the chosen
size and saved as JPEG (quality 90) in a temporary folder. Models are built with random weights
(``weights: none``): speed does not depend on weight values, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io as stdio
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("segbatch")

PHOTOS = Path(__file__).resolve().parents[1] / "jobs" / "samples" / "photos"
JPEG_QUALITY = 90
# Share of a run treated as warm-up when measuring end-to-end steady-state throughput.
WARMUP_FRACTION = 0.1
RSS_SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``size_px`` is the JPEG files' (width, height) on disk."""

    model: str = "lraspp_mobilenet_v3_large"
    size_px: tuple[int, int] = (640, 480)
    count: int = 32
    device: str = "cpu"
    batch_size: int | None = None
    repeats: int = 3
    overrides: tuple[tuple[str, Any], ...] = ()
    cases: tuple[str, ...] = ("model_only", "plain_loop", "end_to_end")


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, size_px: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` JPEGs of ``size_px`` (width, height): random crops of the sample photos at the
    target's aspect ratio (50-100% of the photo's side), resized with bicubic, some mirrored."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size_px
    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.png"))]
    rng = np.random.default_rng(seed)
    paths = []
    aspect = width / height
    for i in range(count):
        src = photos[i % len(photos)]
        scale = float(rng.uniform(0.5, 1.0))
        crop_w = min(src.width, int(src.height * scale * aspect), int(src.width * scale))
        crop_h = max(1, int(crop_w / aspect))
        x0 = int(rng.integers(0, src.width - crop_w + 1))
        y0 = int(rng.integers(0, src.height - crop_h + 1))
        im = src.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize(
            (width, height), Image.Resampling.BICUBIC
        )
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"img_{i:05d}.jpg"
        im.save(path, format="JPEG", quality=JPEG_QUALITY)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the runs themselves, rounded for the table."""
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "runs": [round(v, 4) for v in values],
    }


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _job(cfg: BenchConfig, output: str, inputs: str) -> Any:
    from segbatch.config import load_job

    overrides: dict[str, Any] = {
        "input.paths": [inputs],
        "output.path": output,
        "output.overlays": 0,
        "model.name": cfg.model,
        "model.weights": "none",
        "inference.device": cfg.device,
        "ray.progress_bars": False,
    }
    if cfg.batch_size is not None:
        overrides["inference.batch_size"] = cfg.batch_size
    overrides.update(dict(cfg.overrides))
    return load_job(None, overrides)


def _model_inputs(paths: Sequence[Path], info: Any) -> list[np.ndarray]:
    """Decoded and resized ``(h, w, C)`` uint8 arrays, as segbatch's decode stage makes them."""
    from segbatch.decode import decode_photo, resize_for_model

    return [
        resize_for_model(decode_photo(p.read_bytes(), info.in_channels), info.resize) for p in paths
    ]


def model_only(
    cfg: BenchConfig, job: Any, info: Any, arrays: Sequence[np.ndarray]
) -> Callable[[], float]:
    """A pass over pre-made ``(B, C, h, w)`` batches on the device: forward + argmax.

    Returns the pass itself, giving images/s; the model is built and warmed up here.
    """
    import torch

    from segbatch.logits import argmax_classes
    from segbatch.predictor import Predictor

    batch_size = cfg.batch_size or 1
    predictor = Predictor(info, job.inference, job.tiling)
    with torch.inference_mode():
        batches = [
            predictor.prepare(np.stack(arrays[i : i + batch_size]))
            for i in range(0, len(arrays), batch_size)
        ]
        # The fastest exact argmax segbatch has (on the CPU 5x faster than argmax(1)), so that
        # this stays the ceiling: segbatch's own masks go through the same function.
        [argmax_classes(lg).cpu() for lg in predictor.model(batches[0])]  # warm-up
    _sync(predictor.device)

    def one_pass() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            for x in batches:
                [argmax_classes(lg).cpu() for lg in predictor.model(x)]
            _sync(predictor.device)
            return len(arrays) / (time.perf_counter() - started)

    return one_pass


def plain_loop(
    cfg: BenchConfig, info: Any, paths: Sequence[Path], out_dir: Path
) -> Callable[[], float]:
    """The notebook's loop over all images, one at a time, writing one PNG mask per image.

    Returns the pass itself, giving images/s; the model is built and warmed up here.
    """
    import torch
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    from segbatch.models import build_net
    from segbatch.predictor import pick_device

    device = pick_device(cfg.device)
    net = build_net(info).to(device).eval()
    steps: list[Callable[..., Any]] = []
    if info.resize != "none":
        size = [info.resize] if isinstance(info.resize, int) else list(info.resize)
        steps.append(T.Resize(size, interpolation=InterpolationMode.BILINEAR))
    steps += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    transform = T.Compose(steps)
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> None:
        im = Image.open(path).convert("RGB")
        x = transform(im).unsqueeze(0).to(device)
        out = net(x)
        logits = out["out"] if isinstance(out, dict) else out
        mask = logits[0].argmax(0).to(torch.uint8).cpu().numpy()
        mask_im = Image.fromarray(mask)
        if mask_im.size != im.size:
            mask_im = mask_im.resize(im.size, Image.Resampling.NEAREST)
        np.bincount(np.asarray(mask_im).ravel(), minlength=info.num_classes)
        mask_im.save(out_dir / (path.stem + ".png"))

    with torch.inference_mode():
        one(paths[0])  # warm-up, as in model_only

    def one_pass() -> float:
        with torch.inference_mode():
            started = time.perf_counter()
            for p in paths:
                one(p)
            _sync(device)
            return len(paths) / (time.perf_counter() - started)

    return one_pass


def stage_times(info: Any, paths: Sequence[Path], arrays: Sequence[np.ndarray]) -> dict[str, float]:
    """Milliseconds per image of the CPU stages around the model, on one core of this process:
    JPEG decode, the preset's resize, logits resize + argmax, PNG mask encoding."""
    import torch
    import torch.nn.functional as F

    from segbatch.decode import decode_photo, resize_for_model
    from segbatch.logits import resize_argmax
    from segbatch.sinks import encode_mask_png

    n = min(len(paths), 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        decoded = [decode_photo(p.read_bytes(), info.in_channels) for p in paths[:n]]
        t1 = time.perf_counter()
        for im in decoded:
            resize_for_model(im, info.resize)
        t2 = time.perf_counter()
        height, width = decoded[0].shape[:2]
        h, w = arrays[0].shape[:2]
        # Smooth logits, as a segmentation head's upsampled output: regions, not noise.
        coarse = torch.randn(1, info.num_classes, h // 8 + 1, w // 8 + 1)
        logits = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        for _ in range(n):
            resize_argmax(logits, (height, width)).numpy()
        t3 = time.perf_counter()
        # A mask with regions rather than noise, as a trained model's masks have.
        blocky = (np.indices((height, width)).sum(0) // 97 % info.num_classes).astype(np.uint8)
        for _ in range(n):
            encode_mask_png(blocky, info.num_classes)
        t4 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    ms = 1000.0 / n
    return {
        "jpeg_decode_ms": round((t1 - t0) * ms, 2),
        "preset_resize_ms": round((t2 - t1) * ms, 2),
        "logits_resize_argmax_ms": round((t3 - t2) * ms, 2),
        "mask_png_encode_ms": round((t4 - t3) * ms, 2),
    }


def _mask_times(out: Path) -> list[float]:
    return sorted(p.stat().st_mtime for p in (out / "masks").rglob("*.png"))


def steady_rate(mask_mtimes: Sequence[float], batch_size: int, workers: int = 1) -> float:
    """Images/s after the warm-up: masks after the first ``k`` over the time since the k-th.

    ``k`` is the first batch of every actor (they start together and finish their first
    batches together) or the first 10% of the masks, whichever is more.
    """
    n = len(mask_mtimes)
    k = max(batch_size * workers, math.ceil(WARMUP_FRACTION * n))
    if n - k < 2:
        raise ValueError(f"{n} masks are too few for a steady rate; raise --count")
    return (n - k) / (mask_mtimes[-1] - mask_mtimes[k - 1])


def end_to_end(cfg: BenchConfig, images: Path, out: Path) -> dict[str, Any]:
    """One ``run_job`` on the JPEG folder into ``out`` (Ray already started): steady images/s,
    seconds from the call to the first mask, wall and time to first result (summary.json)."""
    from segbatch.pipeline import run_job

    job = _job(cfg, str(out), str(images))
    started = time.time()
    with contextlib.redirect_stdout(stdio.StringIO()):
        code = run_job(job)
    if code != 0:
        raise RuntimeError(f"run_job exited {code}; see {out}/summary.json")
    summary = json.loads((out / "summary.json").read_text())
    times = _mask_times(out)
    inference = summary["inference"]
    workers = inference["workers"]
    workers = max(workers) if isinstance(workers, list) else int(workers)
    return {
        "images_per_s": steady_rate(times, int(inference["batch_size"]), workers),
        "first_mask_s": times[0] - started,
        "wall_s": float(summary["wall_time_s"]),
        "time_to_first_result_s": float(summary["time_to_first_result_s"]),
        "inference": summary["inference"],
    }


def _init_ray() -> float:
    """Start local Ray as ``run_job`` would; returns the seconds it took (0 if already up)."""
    import ray

    if ray.is_initialized():
        return 0.0
    started = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING)
    return time.perf_counter() - started


def _host() -> dict[str, Any]:
    import torch

    from segbatch.pipeline import versions

    host: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "versions": versions(),
    }
    if torch.cuda.is_available():
        host["gpu"] = torch.cuda.get_device_name(0)
    return host


def _load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def run_bench(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """All cases for one model; returns the JSON-ready result.

    The cases take turns within each repeat (model only, plain loop, end to end, then again), so
    that a burst of load from other processes hits all cases alike; the ratios are taken per
    repeat, then their median.
    """
    from segbatch.models import resolve_model

    images = work / "images"
    paths = write_images(images, cfg.count, cfg.size_px)
    job = _job(cfg, str(work / "unused"), str(images))
    info = resolve_model(job.model, job.preprocess)
    arrays = _model_inputs(paths, info)
    result: dict[str, Any] = {
        "config": {
            "model": cfg.model,
            "weights": "none",
            "image_size_px": list(cfg.size_px),
            "model_input_px": list(arrays[0].shape[:2][::-1]),
            "count": cfg.count,
            "device": cfg.device,
            "batch_size": cfg.batch_size,
            "repeats": cfg.repeats,
            "overrides": {k: v for k, v in cfg.overrides},
        },
        "host": _host(),
        "stages_ms_per_image": stage_times(info, paths, arrays),
    }
    log.info("bench: %d images in %s; stages %s", cfg.count, images, result["stages_ms_per_image"])
    passes: dict[str, Callable[[], float]] = {}
    if "model_only" in cfg.cases:
        passes["model_only"] = model_only(cfg, job, info, arrays)
    if "plain_loop" in cfg.cases:
        passes["plain_loop"] = plain_loop(cfg, info, paths, work / "plain")
    ray_init_s = _init_ray() if "end_to_end" in cfg.cases else 0.0
    rates: dict[str, list[float]] = {k: [] for k in (*passes, "end_to_end") if k in cfg.cases}
    e2e_runs: list[dict[str, Any]] = []
    load: list[float] = []
    for r in range(cfg.repeats):
        load.append(_load_avg())
        for name, one_pass in passes.items():
            rates[name].append(one_pass())
        if "end_to_end" in cfg.cases:
            e2e_runs.append(end_to_end(cfg, images, work / f"e2e-{r}"))
            rates["end_to_end"].append(e2e_runs[-1]["images_per_s"])
        log.info(
            "bench: repeat %d of %d: %s", r + 1, cfg.repeats, {k: v[-1] for k, v in rates.items()}
        )
    load.append(_load_avg())
    result["load_avg_1min"] = load
    for name, values in rates.items():
        result[name] = {"images_per_s": spread(values)}
    if e2e_runs:
        e2e = result["end_to_end"]
        for key in ("wall_s", "first_mask_s", "time_to_first_result_s"):
            e2e[key] = spread([run[key] for run in e2e_runs])
        e2e["inference"] = e2e_runs[-1]["inference"]
        result["startup"] = {
            "ray_init_s": round(ray_init_s, 3),
            "first_mask_s": e2e["first_mask_s"]["median"],
            "cold_first_mask_s": round(ray_init_s + e2e_runs[0]["first_mask_s"], 3),
        }
        ratios: dict[str, Any] = {}
        for name in ("model_only", "plain_loop"):
            if name in rates:
                per_repeat = [e / o for e, o in zip(rates["end_to_end"], rates[name], strict=True)]
                ratios[f"end_to_end_over_{name}"] = spread(per_repeat)
        result["ratios"] = ratios
    return result


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def rss_mib() -> float:
    """This process's resident memory, MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def object_store_stats() -> dict[str, float]:
    """Ray's object store, all nodes: used and spilled MiB (Ray's internal API; {} if it moved)."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        # This session's own cluster: others may run on the same machine.
        address = ray.get_runtime_context().gcs_address
        stats = get_memory_info_reply(get_state_from_address(address)).store_stats
    except Exception:  # a private API: the figures are optional
        return {}
    return {
        "used_mib": stats.object_store_bytes_used / 2**20,
        "capacity_mib": stats.object_store_bytes_avail / 2**20,
        "spilled_mib": stats.spilled_bytes_total / 2**20,
        "spilled_objects": float(stats.spilled_objects_total),
        "fallback_mib": stats.object_store_bytes_fallback / 2**20,
    }


class _Sampler(threading.Thread):
    """Samples (elapsed s, driver RSS MiB, object store used MiB, masks done) until stopped."""

    def __init__(self, masks: Path) -> None:
        super().__init__(daemon=True)
        self.masks = masks
        self.samples: list[tuple[float, float, float, int]] = []
        self.done = threading.Event()
        self.started = time.perf_counter()

    def run(self) -> None:
        store_every = 4
        used = 0.0
        i = 0
        while not self.done.wait(RSS_SAMPLE_EVERY_S):
            if i % store_every == 0:
                used = object_store_stats().get("used_mib", 0.0)
            masks = sum(1 for _ in self.masks.rglob("*.png")) if self.masks.exists() else 0
            self.samples.append((time.perf_counter() - self.started, rss_mib(), used, masks))
            i += 1


def run_memory(cfg: BenchConfig, work: Path) -> dict[str, Any]:
    """One long local run; driver RSS at each tenth of the images done, and object store use."""
    images = work / "images"
    write_images(images, cfg.count, cfg.size_px)
    ray_init_s = _init_ray()
    from segbatch.pipeline import run_job

    out = work / "memory"
    job = _job(cfg, str(out), str(images))
    rss_before = rss_mib()
    sampler = _Sampler(out / "masks")
    sampler.start()
    with contextlib.redirect_stdout(stdio.StringIO()):
        code = run_job(job)
    sampler.done.set()
    sampler.join()
    if code != 0:
        raise RuntimeError(f"run_job exited {code}; see {out}/summary.json")
    summary = json.loads((out / "summary.json").read_text())
    samples = sampler.samples
    by_tenth = []
    for tenth in range(1, 11):
        target = cfg.count * tenth / 10
        hit = next((s for s in samples if s[3] >= target), samples[-1] if samples else None)
        if hit is not None:
            by_tenth.append({"images_done": hit[3], "rss_mib": round(hit[1], 1)})
    store = object_store_stats()
    later = [s[1] for s in samples if s[3] >= cfg.count * 0.2]
    return {
        "config": {
            "model": cfg.model,
            "weights": "none",
            "image_size_px": list(cfg.size_px),
            "count": cfg.count,
            "device": cfg.device,
            "batch_size": cfg.batch_size,
            "overrides": {k: v for k, v in cfg.overrides},
        },
        "host": _host(),
        "ray_init_s": round(ray_init_s, 3),
        "wall_s": summary["wall_time_s"],
        "images_ok": summary["images"]["ok"],
        "images_per_s": summary["images_per_s"],
        "driver_rss_mib": {
            "before_run": round(rss_before, 1),
            "max": round(max((s[1] for s in samples), default=0.0), 1),
            "end": round(samples[-1][1], 1) if samples else None,
            "growth_after_20pct": round(max(later) - min(later), 1) if later else None,
            "by_tenth": by_tenth,
        },
        "object_store_mib": {
            "max_used_sampled": round(max((s[2] for s in samples), default=0.0), 1),
            "capacity": round(store["capacity_mib"], 1),
            "spilled": round(store["spilled_mib"], 1),
            "spilled_objects": int(store["spilled_objects"]),
            "fallback_mmap": round(store["fallback_mib"], 1),
        }
        if store
        else None,
    }


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _fmt(fig: dict[str, Any]) -> str:
    return f"{fig['median']:.2f} ({fig['min']:.2f}-{fig['max']:.2f})"


def format_table(result: dict[str, Any]) -> str:
    """The bench result as a plain-text table (Markdown-compatible)."""
    c = result["config"]
    w, h = c["image_size_px"]
    lines = [
        f"segbatch bench: {c['model']} (weights none), {c['count']} JPEGs {w}x{h}, "
        f"device {c['device']}, batch {c['batch_size'] or 'default'}, {c['repeats']} repeats, "
        f"{result['host']['cpus']} CPUs",
        "",
        "| case | images/s median (min-max) |",
        "|---|---|",
    ]
    for key, label in (
        ("model_only", "model only (forward + argmax)"),
        ("plain_loop", "plain loop (notebook)"),
        ("end_to_end", "segbatch end to end (steady)"),
    ):
        if key in result:
            lines.append(f"| {label} | {_fmt(result[key]['images_per_s'])} |")
    for name, value in result.get("ratios", {}).items():
        lines.append(f"| {name.replace('_', ' ')} (per repeat) | {_fmt(value)} x |")
    if "startup" in result:
        s = result["startup"]
        e = result["end_to_end"]
        lines += [
            "",
            f"start-up: Ray init {s['ray_init_s']:.1f} s; run_job to first mask "
            f"{_fmt(e['first_mask_s'])} s; cold (Ray init + first mask) "
            f"{s['cold_first_mask_s']:.1f} s; end-to-end wall {_fmt(e['wall_s'])} s; "
            f"resolved {e['inference']}",
        ]
    stages = ", ".join(f"{k} {v}" for k, v in result["stages_ms_per_image"].items())
    lines.append(f"CPU stages, ms per image on one thread: {stages}")
    lines.append(f"1-min load average at each repeat: {result['load_avg_1min']}")
    return "\n".join(lines)


def format_memory(result: dict[str, Any]) -> str:
    rss = result["driver_rss_mib"]
    store = result["object_store_mib"] or {
        k: "n/a" for k in ("max_used_sampled", "capacity", "spilled", "spilled_objects")
    } | {"fallback_mmap": "n/a"}
    tenths = ", ".join(f"{t['images_done']}: {t['rss_mib']}" for t in rss["by_tenth"])
    return "\n".join(
        [
            f"segbatch bench --memory: {result['images_ok']} of {result['config']['count']} "
            f"images ok in {result['wall_s']:.1f} s ({result['images_per_s']} images/s)",
            f"driver RSS MiB: before {rss['before_run']}, max {rss['max']}, end {rss['end']}, "
            f"range after 20% of images {rss['growth_after_20pct']}",
            f"driver RSS MiB by images done: {tenths}",
            f"object store MiB: max used (sampled) {store['max_used_sampled']} of "
            f"{store['capacity']}, spilled {store['spilled']} "
            f"({store['spilled_objects']} objects), fallback mmap {store['fallback_mmap']}",
        ]
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``segbatch bench`` flags."""
    p.add_argument("--model", default=None, help="model.name (lraspp_mobilenet_v3_large)")
    p.add_argument(
        "--size", default=None, metavar="WxH", help="JPEG size on disk (640x480; --memory 64x64)"
    )
    p.add_argument("--count", type=int, default=None, help="images (32; --memory 10000)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: segbatch's per device")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--cases",
        default="model_only,plain_loop,end_to_end",
        help="comma-separated subset of model_only,plain_loop,end_to_end",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="job key for the end-to-end runs and the model, e.g. inference.threads_per_worker=1",
    )
    p.add_argument("--memory", action="store_true", help="one long run: driver RSS, object store")
    p.add_argument("--json", default="bench.json", metavar="PATH", help="write the result here")
    p.add_argument("--workdir", default=None, help="keep images and outputs here (default: temp)")


def _parse_size(text: str) -> tuple[int, int]:
    from segbatch.errors import SegbatchUsageError

    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        width, height = (int(v) for v in parts)
    except ValueError as exc:
        raise SegbatchUsageError(f"--size {text!r}: expected WxH, e.g. 640x480") from exc
    if width < 8 or height < 8:
        raise SegbatchUsageError(f"--size {text!r}: at least 8x8")
    return width, height


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from segbatch.config import parse_value
    from segbatch.errors import SegbatchUsageError

    overrides: list[tuple[str, Any]] = []
    if args.memory and args.model is None:
        overrides += [("model.unet.depth", 2), ("model.unet.base_channels", 8)]
    for pair in args.set:
        if "=" not in pair:
            raise SegbatchUsageError(f"--set {pair!r}: expected KEY=VALUE")
        key, value = pair.split("=", 1)
        overrides.append((key.strip(), parse_value(value)))
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = set(cases) - {"model_only", "plain_loop", "end_to_end"}
    if unknown:
        raise SegbatchUsageError(f"--cases: unknown {sorted(unknown)}")
    default_size, default_count = ((64, 64), 10_000) if args.memory else ((640, 480), 32)
    return BenchConfig(
        model=args.model or ("unet" if args.memory else "lraspp_mobilenet_v3_large"),
        size_px=_parse_size(args.size) if args.size else default_size,
        count=args.count or default_count,
        device=args.device,
        batch_size=args.batch_size,
        repeats=max(1, args.repeats),
        overrides=tuple(overrides),
        cases=cases,
    )


def main(args: argparse.Namespace) -> int:
    """Run the bench the flags ask for; prints the table and writes the JSON."""
    cfg = config_from_args(args)
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = Path(args.workdir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="segbatch-bench-")))
        if args.memory:
            result = run_memory(cfg, work)
            text = format_memory(result)
        else:
            result = run_bench(cfg, work)
            text = format_table(result)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"(written to {args.json})")
    return 0
