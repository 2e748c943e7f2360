"""Assembling and running the Ray Data job, and the driver's side of it.

    inputs (driver)  ->  read_batch  ->  decode_batch  ->  SegmentActor pool  ->  rows (driver)
    sources.py           loader.py       loader.py         actor.py              sinks.py

Everything that can fail because of the job as configured (unknown model, missing input, output
in the way) fails here, on the driver, before Ray starts. Result rows are small and come back to
the driver, which writes the Parquet parts and summary.json.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segbatch import __version__, io, sinks
from segbatch.actor import SegmentActor, result_rows
from segbatch.attempts import AttemptLedger
from segbatch.config import InferenceConfig, JobConfig, to_yaml
from segbatch.errors import OutputWriteError
from segbatch.loader import decode_batch, read_batch
from segbatch.models import ModelInfo, parameter_count, resolve_model
from segbatch.sources import InputItem, extension_of, list_inputs
from segbatch.stats import Totals, class_columns

log = logging.getLogger("segbatch")

# Largest user code folder shipped to the workers with the job.
MAX_CODE_BYTES = 64 * 1024 * 1024
# Early stop: once this many inputs are done, an error fraction above the limit stops the job.
EARLY_STOP_MIN_DONE = 100
PROGRESS_EVERY_S = 10.0
ROWS_PER_CALL_MIN = 4
# What summary.json's stopped_early says after a Ctrl-C, and the exit code then (128 + SIGINT).
INTERRUPTED = "interrupted (SIGINT)"
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Plan:
    """Everything decided on the driver before Ray starts."""

    job: JobConfig
    info: ModelInfo
    items: list[InputItem]


def plan_job(job: JobConfig, fetch_weights: bool = True) -> Plan:
    """Validate the job against the world: model, inputs, output. Raises usage errors (exit 2).

    ``fetch_weights=False`` (``segbatch validate``) checks checkpoints but downloads nothing.
    """
    job = _channels_from_bands(job)
    info = resolve_model(job.model, job.preprocess)
    if job.model.code_path is not None and not Path(job.model.code_path).exists():
        from segbatch.errors import ConfigError

        raise ConfigError(f"model.code_path {job.model.code_path!r} does not exist")
    if job.output.nodata_value < info.num_classes:
        from segbatch.errors import ConfigError

        raise ConfigError(
            f"output.nodata_value {job.output.nodata_value} is a class index of this "
            f"{info.num_classes}-class model; set it to {info.num_classes} or more "
            "(65535 for masks above 256 classes)"
        )
    unknown = [c for c in job.stats.count_components if c not in info.classes]
    if unknown:
        from segbatch.errors import ConfigError

        raise ConfigError(
            f"stats.count_components names {unknown}, not classes of this model; its classes: "
            + ", ".join(info.classes)
        )
    items = list_inputs(job.input, job.storage.options, output_root=job.output.path)
    # The output root's storage answers (endpoint, credentials) before Ray starts, not after.
    with io.storage_errors("reach the output", job.output.path, job.storage.options):
        io.exists(job.output.path, job.storage.options)
    _check_weights(job, info, fetch_weights)
    return Plan(job=job, info=info, items=items)


def _channels_from_bands(job: JobConfig) -> JobConfig:
    """U-Net and user models take as many channels as preprocess.bands selects, unless
    model.in_channels says otherwise (torchvision models take RGB)."""
    from segbatch.models import TORCHVISION_MODELS

    bands = job.preprocess.bands
    if bands is None or job.model.in_channels is not None or job.model.name in TORCHVISION_MODELS:
        return job
    return dataclasses.replace(job, model=dataclasses.replace(job.model, in_channels=len(bands)))


def _check_weights(job: JobConfig, info: ModelInfo, fetch: bool = True) -> None:
    """Fail before any worker starts when the weights cannot work.

    A checkpoint (or a user model) is built once on the driver, on the CPU: one that does not fit
    the model fails here with the loader's message. Pretrained torchvision weights are fetched
    into torch hub's cache when the job runs locally (the workers then find them there); on a
    cluster each node downloads its own copy.
    """
    from segbatch.models import build_model, fetch_pretrained, weights_kind

    if weights_kind(info.name, info.weights) in ("default", "enum") and not info.is_user_model:
        if fetch and job.ray.address is None:
            fetch_pretrained(info)
        return
    build_model(info, "cpu", dict(job.storage.options))


# The most CPU actors chosen by default: each is a process with its own model and activations
# (1 to 2 GB for the torchvision models at 520 px), so more would trade memory for little speed.
CPU_WORKERS_MAX = 4
# Below this many parameters a model is light: on the CPU, one actor per core with one thread
# each. Heavier models get one actor with up to HEAVY_MODEL_THREADS threads. Measured on 2 cores
# (docs/performance.md): lraspp (3.2 M) ran end to end 1.2x faster as 2 actors x 1 thread than
# as 1 x 2; deeplabv3_resnet50 (42 M) ran 2x slower.
LIGHT_MODEL_PARAMS = 20_000_000
HEAVY_MODEL_THREADS = 8
# Rows per read block: one storage round of up to 8 parallel reads, decoded together.
READ_ROWS = 16


def resolve_inference(
    inf: InferenceConfig,
    cluster_cpus: float,
    cluster_gpus: float,
    model_params: int | None = None,
) -> InferenceConfig:
    """Fill the per-device defaults (measured: see docs/performance.md).

    ``model_params``: the network's parameter count, which picks the CPU layout (None: heavy).
    """
    device = inf.device
    if device == "auto":
        device = "cuda" if cluster_gpus > 0 else "cpu"
    if device == "cuda":
        per_worker = inf.gpus_per_worker
        workers = inf.workers or max(1, int(cluster_gpus // per_worker) if cluster_gpus else 1)
        return dataclasses.replace(
            inf,
            device="cuda",
            workers=workers,
            batch_size=inf.batch_size or 16,
            cpus_per_worker=inf.cpus_per_worker or 1.0,
            threads_per_worker=inf.threads_per_worker or 2,
            post_threads=1 if inf.post_threads is None else inf.post_threads,
        )
    cpus = max(1, int(cluster_cpus))
    # Light models: one actor per core, one torch thread each, up to CPU_WORKERS_MAX actors;
    # one actor decodes and makes masks while another runs the model, and no torch parallel
    # region waits on a thread that Ray's own processes delayed. Heavy models: their forward
    # pass parallelises well and two copies fight over memory bandwidth, so few actors with
    # many threads. Past the actor cap, the cores go to torch threads.
    light = model_params is not None and model_params < LIGHT_MODEL_PARAMS
    per_thread = inf.threads_per_worker or (1 if light else HEAVY_MODEL_THREADS)
    workers = inf.workers or max(1, min(CPU_WORKERS_MAX, cpus // per_thread))
    n_workers = workers if isinstance(workers, int) else workers[1]
    threads = inf.threads_per_worker or max(1, cpus // n_workers)
    spare = threads * n_workers < cpus
    return dataclasses.replace(
        inf,
        device="cpu",
        workers=workers,
        batch_size=inf.batch_size or 1,
        cpus_per_worker=inf.cpus_per_worker or 1.0,
        threads_per_worker=threads,
        post_threads=(1 if spare else 0) if inf.post_threads is None else inf.post_threads,
    )


def _pack_code(code_path: str) -> dict[str, bytes]:
    """The user's model code as {relative path: bytes}, to travel with the actor's arguments."""
    root = Path(code_path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    packed: dict[str, bytes] = {}
    total = 0
    for p in files:
        rel = p.name if root.is_file() else p.relative_to(root).as_posix()
        if "__pycache__" in rel or any(part.startswith(".") for part in rel.split("/")):
            continue
        data = p.read_bytes()
        total += len(data)
        if total > MAX_CODE_BYTES:
            from segbatch.errors import ConfigError

            raise ConfigError(
                f"model.code_path {code_path!r} holds over {MAX_CODE_BYTES >> 20} MiB; point it "
                "at the folder with the model's code only (weights go in model.weights)"
            )
        packed[rel] = data
    return packed


def versions() -> dict[str, str]:
    import ray
    import torch
    import torchvision

    return {
        "segbatch": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def _init_ray(job: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if job.ray.address:
        kwargs["address"] = job.ray.address
    ray.init(**kwargs)


def _schema_flags(items: list[InputItem]) -> dict[str, bool]:
    exts = {extension_of(i.uri) for i in items}
    return {
        "geo": bool(exts & {".tif", ".tiff"}),
        "dicom": bool(exts & {".dcm", ".dicom"}),
        "volumes": bool(exts & {".nii", ".nii.gz"}),
    }


def _dataset(
    job: JobConfig,
    info: ModelInfo,
    inference: InferenceConfig,
    rows_in: list[dict[str, Any]],
    ledger: tuple[Any, str] | None = None,
) -> Any:
    """The Ray Data plan: read -> decode (CPU tasks) -> SegmentActor pool -> result rows.

    ``ledger``: the attempt ledger's handle and this run's key (see ``_attempt_ledger``).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    options = job.storage.options
    ctx = DataContext.get_current()
    show_bars = job.ray.progress_bars if job.ray.progress_bars is not None else sys.stderr.isatty()
    ctx.enable_progress_bars = show_bars

    workers = inference.workers
    assert workers is not None and inference.batch_size is not None
    min_w, max_w = (workers, workers) if isinstance(workers, int) else workers
    actor_args: dict[str, Any] = {
        "num_cpus": inference.cpus_per_worker,
        "num_gpus": inference.gpus_per_worker if inference.device == "cuda" else 0,
    }
    if inference.resources:
        actor_args["resources"] = dict(inference.resources)
    ship_info = info
    code: dict[str, bytes] | None = None
    if info.code_path is not None:
        code = _pack_code(info.code_path)
        ship_info = dataclasses.replace(info, code_path=Path(info.code_path).name)

    n_todo = len(rows_in)
    # Blocks of READ_ROWS rows, smaller when that would leave actors without work (a few
    # images of a slow model: 6 images in one block would all go to one actor).
    read_rows = max(1, min(READ_ROWS, math.ceil(n_todo / max_w)))
    ds: Any = ray.data.from_items(
        rows_in, override_num_blocks=max(1, min(n_todo, math.ceil(n_todo / read_rows)))
    )
    ds = ds.map_batches(
        read_batch,
        fn_kwargs={
            "storage_options": options,
            "retries": job.storage.retries,
            "image_column": job.input.image_column,
            "path_column": job.input.path_column,
        },
        batch_size=read_rows,
        num_cpus=1,
    )
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={
            "channels": info.in_channels,
            "max_pixels": job.input.max_image_pixels,
            "resize": info.resize,
            "pre": job.preprocess,
            "stream_above_px": job.tiling.stream_above_px,
            "storage_options": options,
        },
        batch_size=read_rows,
        num_cpus=1,
    )
    ds = ds.map_batches(
        SegmentActor,
        fn_constructor_kwargs={
            "job": job,
            "info": ship_info,
            "batch_size": inference.batch_size,
            "code": code,
            "ledger": ledger,
        },
        compute=ActorPoolStrategy(min_size=min_w, max_size=max_w),
        # Rows per actor call; the model sees groups of inference.batch_size. A few rows a call
        # let one group's masks be made while the next group runs (SegmentActor.post_pool).
        batch_size=max(inference.batch_size, ROWS_PER_CALL_MIN),
        # Ray Data restarts a dead actor (a lost node, an input that killed it) and runs its
        # batch again, without limit (max_restarts = max_task_retries = -1); that stays, for
        # lost nodes. The attempt ledger is what stops one input from being retried forever.
        **actor_args,
    )

    return ds


def _attempt_ledger() -> tuple[Any, str]:
    """The attempt ledger of this driver (one Ray actor, started by its first job and serving
    every later one, on the driver's node, taking no CPU slot from the workers) and a new key
    for this run's entries in it."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    context = ray.get_runtime_context()
    here = NodeAffinitySchedulingStrategy(context.get_node_id(), soft=True)
    handle = (
        ray.remote(AttemptLedger)
        .options(
            name=f"segbatch-attempts-{context.get_job_id()}",
            get_if_exists=True,
            num_cpus=0,
            scheduling_strategy=here,
        )
        .remote()
    )
    return handle, uuid.uuid4().hex


def _check_gpus(job: JobConfig, resources: Mapping[str, float]) -> None:
    """``inference.device: cuda`` needs a GPU per worker in the cluster: Ray would otherwise
    wait forever for actors it cannot place. A local Ray has what it has: refused (exit 2). An
    attached cluster may autoscale and start GPU nodes on demand: a warning, and the job waits."""
    gpus, per_worker = resources.get("GPU", 0), job.inference.gpus_per_worker
    if job.inference.device != "cuda" or gpus >= per_worker:
        return
    seen = f"sees {gpus:g} GPU{'' if gpus == 1 else 's'}" if gpus else "sees no GPU"
    if job.ray.address is None:
        from segbatch.errors import DeviceUnavailableError

        raise DeviceUnavailableError(
            f"inference.device is cuda with {per_worker:g} GPU per worker, but this machine's "
            f"Ray {seen}; use --device cpu (or auto, which takes the GPUs there are), lower "
            "inference.gpus_per_worker, or attach to a cluster with GPU nodes (--address)"
        )
    log.warning(
        "inference.device is cuda with %g GPU per worker, but the Ray cluster at %s %s now; the "
        "job waits until GPU nodes join (an autoscaling cluster starts them). If it has none, "
        "stop the job (Ctrl-C) and use --device cpu or auto",
        per_worker,
        job.ray.address,
        seen,
    )


def run_job(job: JobConfig, plan: Plan | None = None) -> int:
    """Run the whole job; returns the exit code (0 ok, 1 too many errors or a failure, 130
    interrupted by a KeyboardInterrupt: the rows done are written either way).

    Raises a usage error (exit 2) when the job cannot run on this Ray: ``--device cuda`` on a
    local Ray without a GPU.
    """
    import ray

    started = time.perf_counter()
    plan = plan or plan_job(job)
    job, info, items = plan.job, plan.info, plan.items
    out = job.output.path
    options = job.storage.options
    job = _with_weights_id(job, info)
    clear_output = sinks.check_output(out, job.output.overwrite, job.output.resume, options)

    todo = None
    if job.output.resume:
        _check_resumable(job, info)
        todo = ~sinks.read_done(out, [it.uri for it in items], options)
        log.warning(
            "resuming: %d of %d inputs already have an ok row; running %d",
            len(items) - int(todo.sum()),
            len(items),
            int(todo.sum()),
        )

    _init_ray(job)
    resources = ray.cluster_resources()
    _check_gpus(job, resources)
    if clear_output:  # only once the job can run: a refused job loses no earlier output
        sinks.remove_own_outputs(out, options)
    inference = resolve_inference(
        job.inference, resources.get("CPU", 1), resources.get("GPU", 0), parameter_count(info)
    )
    model_cfg = dataclasses.replace(job.model, classes=info.classes, num_classes=info.num_classes)
    job = dataclasses.replace(job, inference=inference, model=model_cfg)
    io.write_bytes_atomic(io.join(out, sinks.JOB_FILE), to_yaml(job).encode(), options)

    n = len(items)
    rows_in = [
        {
            "index": i,
            "uri": it.uri,
            "rel_path": it.rel_path,
            "error": it.error or "",
            "offset": -1 if it.offset is None else it.offset,
            "size": -1 if it.size is None else it.size,
        }
        for i, it in enumerate(items)
        if todo is None or todo[i]
    ]
    n_todo = len(rows_in)
    ledger = _attempt_ledger()
    ds = _dataset(job, info, inference, rows_in, ledger)

    flags = _schema_flags(items)
    schema = sinks.results_schema(
        info.classes,
        geo=flags["geo"],
        dicom=flags["dicom"],
        volumes=flags["volumes"],
        component_classes=job.stats.count_components,
    )
    class_cols = class_columns(info.classes)
    writer = sinks.ResultsWriter(
        out,
        schema,
        n,
        job.output.rows_per_file,
        options,
        todo,
        flush_every_s=job.output.flush_every_s,
    )
    totals = Totals(info.num_classes)
    first_result_s: float | None = None
    last_log = time.perf_counter()
    last_done = 0
    stopped_early: str | None = None
    retries_total = 0
    batches = ds.iter_batches(batch_size=None, batch_format="numpy") if n_todo else []
    failure: str | None = None
    interrupted = False
    try:
        for batch in batches:
            if first_result_s is None:
                first_result_s = time.perf_counter() - started
            retries_total += int(np.sum(batch["retries"])) if "retries" in batch else 0
            for row in result_rows(batch, info.name, class_cols):
                writer.add(row)
                if row["status"] == "ok":
                    counts = np.array([row[c] for c in class_cols], dtype=np.int64)
                    totals.add_ok(counts, row.get("px_nodata") or 0)
                else:
                    totals.add_error(row["error"])
                    if failure is None and sinks.STORAGE_FULL in row["error"]:
                        # Every later mask would fail the same way: stop, keep what is done.
                        free = sinks.free_space(out)
                        failure = row["error"] + (f" ({free})" if free else "")
            if failure is not None:
                stopped_early = f"the job failed: {failure}"
                break
            now = time.perf_counter()
            if now - last_log >= PROGRESS_EVERY_S:
                _log_progress(totals, n_todo, totals.done - last_done, now - last_log)
                last_log, last_done = now, totals.done
            if (
                totals.done >= min(n_todo, EARLY_STOP_MIN_DONE)
                and totals.error_fraction > job.max_error_fraction
                and totals.done < n_todo
            ):
                stopped_early = totals.most_common_error()
                break
    except KeyboardInterrupt:
        # Ctrl-C (the CLI's handler raises it once; a second one exits at once): keep every
        # row already done, so that --resume runs only the rest.
        interrupted = True
        stopped_early = INTERRUPTED
    except OutputWriteError as exc:
        failure = str(exc)
        stopped_early = f"the job failed: {failure}"
    except Exception as exc:
        # A failure Ray could not recover from (a worker that cannot start, a lost node with no
        # retries left): keep every row already done, say what failed, exit 1.
        failure = error_message_of(exc)
        stopped_early = f"the job failed: {failure}"
    ledger[0].forget.remote(ledger[1])
    try:
        writer.close()
    except OutputWriteError as exc:
        if failure is None:
            failure = str(exc)
            stopped_early = f"the job failed: {failure}"
    wall_s = time.perf_counter() - started
    run_done = totals.done
    # The summary counts what the output holds: the same for a resumed run as for one in one go.
    totals = sinks.read_totals(out, info.classes, options)
    summary = _summary(job, info, totals, n, wall_s, first_result_s, stopped_early)
    summary["this_run"] = {"inputs_run": run_done, "inputs_skipped": n - n_todo}
    summary["storage"] = {"retries": retries_total}
    try:
        sinks.write_summary(out, summary, options)
    except OSError as exc:
        # The output is full or gone: the parts say what is done, --resume writes it later.
        log.error("could not write %s: %s", sinks.SUMMARY_FILE, error_message_of(exc))
    _print_table(summary)
    if interrupted:
        log.error(
            "interrupted after %d inputs of this run (their rows are written; --resume continues)",
            run_done,
        )
        return EXIT_INTERRUPTED
    if failure is not None:
        log.error(
            "the job failed after %d inputs (their rows are written; --resume continues): %s",
            run_done,
            failure,
        )
        return 1
    if stopped_early is not None:
        log.error(
            "stopped early: %d of %d inputs failed (over max_error_fraction %.2f); most common "
            "error: %s",
            totals.error,
            totals.done,
            job.max_error_fraction,
            stopped_early,
        )
        return 1
    if totals.error_fraction > job.max_error_fraction:
        log.error(
            "%d of %d inputs failed, over max_error_fraction %.2f; most common error: %s",
            totals.error,
            totals.done,
            job.max_error_fraction,
            totals.most_common_error(),
        )
        return 1
    return 0


def _with_weights_id(job: JobConfig, info: ModelInfo) -> JobConfig:
    """The job with ``model.weights_id`` filled in (hashing a checkpoint once, on the driver);
    a value the job gave must match the weights."""
    from segbatch.errors import WeightsError
    from segbatch.models import weights_id

    found = weights_id(info, job.storage.options)
    given = job.model.weights_id
    if given is not None and given != found:
        raise WeightsError(
            f"model.weights_id is {given!r} but the weights {info.weights!r} are {found!r}; "
            "point model.weights at the weights meant, or drop model.weights_id"
        )
    return dataclasses.replace(job, model=dataclasses.replace(job.model, weights_id=found))


# Every setting that shapes what a run writes (masks, rows, part files): a resumed run must match
# the first on each, or one output would mix two jobs. Sections stand for all their keys.
RESUME_KEYS = (
    "input.format",
    "input.image_column",
    "input.path_column",
    "input.max_image_pixels",
    "input.slice_axis",
    "input.volume_index",
    "output.rows_per_file",
    "output.nodata_value",
    "model.name",
    "model.weights_id",
    "model.classes",
    "model.num_classes",
    "model.in_channels",
    "model.unet",
    "preprocess",
    "inference.precision",
    "inference.channels_last",
    "tiling",
    "stats",
)
_MISSING = object()


def _get(data: Any, key: str) -> Any:
    """The value at a dotted key of nested mappings, or _MISSING."""
    node = data
    for part in key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
    return node


def _leaves(data: Any, key: str) -> dict[str, Any]:
    """{dotted key: value} of ``data`` at ``key`` and below (mappings are walked into)."""
    node = _get(data, key)
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for name in node:
            out.update(_leaves(data, f"{key}.{name}"))
        return out
    return {key: node}


def _check_resumable(job: JobConfig, info: ModelInfo) -> None:
    """--resume continues the same job: every setting in RESUME_KEYS must match OUT/job.yaml.

    ``job`` carries ``model.weights_id``, so the same checkpoint spelled another way resumes and
    a checkpoint whose bytes changed does not. Every differing key is named in one error.
    """
    import yaml

    from segbatch.config import to_dict
    from segbatch.errors import ConfigError

    uri = io.join(job.output.path, sinks.JOB_FILE)
    before = yaml.safe_load(io.read_bytes(uri, job.storage.options))
    if not isinstance(before, dict):
        before = {}
    now = to_dict(
        dataclasses.replace(
            job,
            model=dataclasses.replace(
                job.model, classes=info.classes, num_classes=info.num_classes
            ),
        )
    )
    # A key the first run's segbatch did not write yet had its default value then.
    defaults = to_dict(JobConfig())
    keys = list(RESUME_KEYS)
    if "weights_id" not in (before.get("model") or {}):
        keys[keys.index("model.weights_id")] = "model.weights"  # written by an older segbatch
    now["model"]["weights"] = io.redact(now["model"]["weights"])  # job.yaml holds it redacted
    differ = []
    for key in keys:
        for leaf, value in _leaves(now, key).items():
            was = _get(before, leaf)
            if was is _MISSING:
                was = _get(defaults, leaf)
            if was is _MISSING:
                was = None
            if was != value:
                differ.append(f"{leaf}: first run {was!r}, this run {value!r}")
    if differ:
        raise ConfigError(
            f"--resume: settings differ from the first run ({io.redact(uri)}):\n  - "
            + "\n  - ".join(differ)
            + "\nresume with the first run's settings, or write to a new --output"
        )


def error_message_of(exc: BaseException) -> str:
    """The useful line of a (possibly Ray-wrapped) exception: the innermost error's message."""
    text = io.redact_text(str(exc)).strip().splitlines()
    for line in reversed(text):
        if "Error" in line and ":" in line:
            return line.strip()
    return text[-1].strip() if text else type(exc).__name__


def _log_progress(totals: Totals, n: int, recent_done: int, recent_s: float) -> None:
    """One progress line; the rate is over the last interval, so start-up does not skew the ETA."""
    rate = recent_done / recent_s if recent_s > 0 else 0.0
    eta = (n - totals.done) / rate if rate > 0 else float("inf")
    log.warning(
        "progress: %d/%d images (%.1f%%), %.2f images/s, %d errors, ETA %.0f s",
        totals.done,
        n,
        100.0 * totals.done / max(n, 1),
        rate,
        totals.error,
        eta,
    )


def _summary(
    job: JobConfig,
    info: ModelInfo,
    totals: Totals,
    n: int,
    wall_s: float,
    first_result_s: float | None,
    stopped_early: str | None,
) -> dict[str, Any]:
    fractions = totals.fractions()
    return {
        "images": {"total": n, "ok": totals.ok, "error": totals.error, "not_run": n - totals.done},
        "model": info.name,
        "weights": io.redact(info.weights),
        "classes": list(info.classes),
        "pixels": {c: int(p) for c, p in zip(info.classes, totals.pixels, strict=True)},
        "fractions": {c: float(f) for c, f in zip(info.classes, fractions, strict=True)},
        "nodata_px": totals.nodata_px,
        "errors_by_kind": totals.errors_by_message,
        "stopped_early": stopped_early,
        "wall_time_s": round(wall_s, 3),
        "time_to_first_result_s": None if first_result_s is None else round(first_result_s, 3),
        "images_per_s": round(totals.done / wall_s, 3) if wall_s > 0 else None,
        "inference": {
            "device": job.inference.device,
            "workers": job.inference.workers,
            "batch_size": job.inference.batch_size,
            "threads_per_worker": job.inference.threads_per_worker,
        },
        "versions": versions(),
        "host": {"cpus": os.cpu_count()},
    }


def _print_table(summary: Mapping[str, Any]) -> None:
    images = summary["images"]
    print(
        f"segbatch: {images['ok']} ok, {images['error']} errors of {images['total']} images in "
        f"{summary['wall_time_s']:.1f} s ({summary['images_per_s']} images/s)"
    )
    rows = sorted(summary["fractions"].items(), key=lambda kv: -kv[1])
    shown = [(c, f) for c, f in rows if f > 0][:12]
    if shown:
        width = max(len(c) for c, _ in shown)
        print(f"  {'class':<{width}}  pixels")
        for cls, frac in shown:
            print(f"  {cls:<{width}}  {100 * frac:6.2f}%")
