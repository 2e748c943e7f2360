"""The command line: ``segbatch run | models | validate | bench``.

Exit codes: 0 the job ran (error rows included) within max_error_fraction; 1 above it, or the
job failed (its rows so far are written); 2 usage or configuration errors, reported before any
Ray work starts; 130 interrupted by Ctrl-C (the rows done are written; --resume continues).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from segbatch.config import JobConfig, load_job, parse_value, to_yaml
from segbatch.errors import SegbatchUsageError

EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job file (YAML); defaults apply without one")
    p.add_argument(
        "--input",
        action="append",
        metavar="URI",
        help="input URI (repeatable; replaces input.paths)",
    )
    p.add_argument("--output", metavar="URI", help="output root (output.path)")
    p.add_argument("--model", metavar="NAME", help="model.name (see `segbatch models`)")
    p.add_argument("--weights", metavar="W", help="default | none | enum name | checkpoint URI")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="inference.device")
    p.add_argument("--batch-size", type=int, metavar="N", help="inference.batch_size")
    p.add_argument("--workers", type=int, metavar="N", help="inference.workers (actors)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any job key, e.g. --set preprocess.resize=none (repeatable)",
    )
    p.add_argument(
        "--address", metavar="ADDR", help="Ray cluster to attach to: auto or ray://host:port"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segbatch",
        description="Semantic segmentation of large image collections on Ray Data.",
    )
    from segbatch import __version__

    parser.add_argument("--version", action="version", version=f"segbatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a segmentation job")
    _add_job_flags(run)
    run.add_argument("--overwrite", action="store_true", help="replace outputs in a non-empty OUT")
    run.add_argument("--resume", action="store_true", help="continue a run into an existing OUT")
    sub.add_parser(
        "models", help="list every model with its classes, weights and input conventions"
    )
    val = sub.add_parser("validate", help="check a job file without running it")
    _add_job_flags(val)
    from segbatch.bench import add_arguments

    add_arguments(sub.add_parser("bench", help="measure throughput on this machine (see docs)"))
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Named flags and --set pairs as dotted-key overrides (flags win over --set)."""
    overrides: dict[str, Any] = {}
    for pair in args.set:
        if "=" not in pair:
            raise SegbatchUsageError(
                f"--set {pair!r}: expected KEY=VALUE, e.g. inference.batch_size=4"
            )
        key, value = pair.split("=", 1)
        overrides[key.strip()] = parse_value(value)
    named = {
        "input.paths": args.input,
        "output.path": args.output,
        "model.name": args.model,
        "model.weights": args.weights,
        "inference.device": args.device,
        "inference.batch_size": args.batch_size,
        "inference.workers": args.workers,
        "ray.address": args.address,
    }
    for key, value in named.items():
        if value is not None:
            overrides[key] = value
    if getattr(args, "overwrite", False):
        overrides["output.overwrite"] = True
    if getattr(args, "resume", False):
        overrides["output.resume"] = True
    return overrides


def load_from_args(args: argparse.Namespace) -> JobConfig:
    return load_job(args.job, overrides_from_args(args))


@contextlib.contextmanager
def sigint_stops_job() -> Iterator[None]:
    """While inside: the first Ctrl-C raises KeyboardInterrupt, which ``run_job`` turns into a
    clean stop (the rows done and summary.json are written, exit 130); a second one exits at
    once with 130. The previous SIGINT handler is restored on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    interrupts = 0

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            print("segbatch: interrupted again: exiting now", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        print(
            "segbatch: interrupted: writing the rows that are done (Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: the same arguments with --resume (and
    without --overwrite, which would start over)."""
    kept = [a for a in argv if a != "--overwrite"]
    if "--resume" not in kept:
        kept.append("--resume")
    return shlex.join(["segbatch", *kept])


def _after_interrupt(job: JobConfig, argv: list[str]) -> str:
    """What to run next after Ctrl-C: --resume once the run has written its job.yaml (before
    that, nothing of it is in OUT). Credentials in URIs are left out, as everywhere."""
    from segbatch import io, sinks

    started = io.exists(io.join(job.output.path, sinks.JOB_FILE), job.storage.options)
    if not started:
        return "segbatch: interrupted before the run began; nothing was written"
    return f"segbatch: to continue, run: {io.redact_text(resume_command(argv))}"


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("segbatch").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "models":
            from segbatch.models import describe_models

            print(describe_models())
            return EXIT_OK
        if args.command == "bench":
            from segbatch import bench

            return bench.main(args)
        job = load_from_args(args)
        from segbatch.pipeline import plan_job, run_job

        if args.command == "validate":
            plan = plan_job(job, fetch_weights=False)
            print(to_yaml(job), end="")
            print(
                f"# valid: {len(plan.items)} inputs, model {plan.info.name} "
                f"({plan.info.num_classes} classes)",
                file=sys.stderr,
            )
            return EXIT_OK
        with sigint_stops_job():
            try:
                code = run_job(job, plan_job(job, fetch_weights=True))
            except KeyboardInterrupt:  # before the first result or after the last
                code = EXIT_INTERRUPTED
        if code == EXIT_INTERRUPTED:
            print(
                _after_interrupt(job, list(sys.argv[1:] if argv is None else argv)), file=sys.stderr
            )
        return code
    except SegbatchUsageError as exc:
        print(f"segbatch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
