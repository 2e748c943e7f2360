"""--resume after a kill -9 of the driver: every input exactly once, masks complete."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from segbatch.config import load_job
from segbatch.models import ModelInfo, build_net
from segbatch.pipeline import run_job
from tests.conftest import PHOTOS, REPO


def make_inputs(root: Path, n: int) -> list[Path]:
    root.mkdir()
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(PHOTOS.glob("*.png"))]
    paths = []
    for i in range(n):
        im = photos[i % len(photos)]
        y, x = int(rng.integers(0, im.shape[0] - 160)), int(rng.integers(0, im.shape[1] - 200))
        path = root / f"img_{i:03d}.jpg"
        Image.fromarray(im[y : y + 160, x : x + 200]).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    info = ModelInfo(
        name="unet",
        weights="none",
        classes=("a", "b", "c"),
        in_channels=3,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        resize="none",
        pad_to_multiple=4,
        unet_depth=2,
        unet_base_channels=8,
    )
    path = tmp_path_factory.mktemp("w") / "unet.pt"
    torch.save(build_net(info).state_dict(), path)
    return str(path)


def args(inputs: Path, out: Path, ckpt: str) -> list[str]:
    return [
        "--input", str(inputs), "--output", str(out), "--model", "unet", "--weights", ckpt,
        "--device", "cpu", "--batch-size", "1",
        "--set", "model.num_classes=3", "--set", "model.unet.depth=2",
        "--set", "model.unet.base_channels=8", "--set", "output.rows_per_file=5",
        "--set", "output.overlays=0",
    ]  # fmt: skip


def rows(out: Path) -> list[dict[str, Any]]:
    return pq.read_table(out / "results").to_pylist()


@pytest.mark.usefixtures("ray_session")
def test_kill_driver_then_resume_is_exactly_once(tmp_path: Path, unet_checkpoint: str) -> None:
    inputs = tmp_path / "in"
    make_inputs(inputs, 60)
    # The reference: one uninterrupted run.
    ref_out = tmp_path / "ref"
    ref_argv = args(inputs, ref_out, unet_checkpoint)
    from segbatch.cli import build_parser, load_from_args

    assert run_job(load_from_args(build_parser().parse_args(["run", *ref_argv]))) == 0
    reference = json.loads((ref_out / "summary.json").read_text())

    # A driver killed with SIGKILL once some parts are written.
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segbatch", "run", *args(inputs, out, unet_checkpoint)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        masks = list((out / "masks").glob("*.png")) if (out / "masks").exists() else []
        if len(masks) >= 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(rows(out)) if list((out / "results").glob("*.parquet")) else 0

    # A half-written mask would be a temp file, never a final name: every mask must decode.
    for mask in (out / "masks").glob("*.png"):
        Image.open(mask).load()

    resumed = [*args(inputs, out, unet_checkpoint), "--resume"]
    assert run_job(load_from_args(build_parser().parse_args(["run", *resumed]))) == 0
    final = rows(out)
    assert sorted(r["index"] for r in final) == list(range(60))
    assert all(r["status"] == "ok" for r in final)
    for r in final:
        mask = np.asarray(Image.open(r["mask_path"]))
        assert mask.shape == (r["height"], r["width"])
    summary = json.loads((out / "summary.json").read_text())
    for key in ("images", "pixels", "fractions", "classes"):
        assert summary[key] == reference[key], key
    assert summary["this_run"]["inputs_skipped"] == done_before
    # Same results as the uninterrupted run, row for row.
    ref_rows = {r["index"]: r for r in rows(ref_out)}
    for r in final:
        assert r["px_class_0"] == ref_rows[r["index"]]["px_class_0"]


@pytest.mark.usefixtures("ray_session")
def test_resume_retries_error_rows_and_skips_ok(tmp_path: Path, unet_checkpoint: str) -> None:
    inputs = tmp_path / "in"
    paths = make_inputs(inputs, 6)
    good = paths[2].read_bytes()
    paths[2].write_bytes(b"broken")
    out = tmp_path / "out"
    from segbatch.cli import build_parser, load_from_args

    first = load_from_args(build_parser().parse_args(["run", *args(inputs, out, unet_checkpoint)]))
    assert run_job(first) == 0
    assert [r["status"] for r in rows(out)].count("error") == 1
    mtime = (out / "masks" / "img_000.png").stat().st_mtime_ns
    paths[2].write_bytes(good)  # the user fixes the file
    argv = ["run", *args(inputs, out, unet_checkpoint), "--resume"]
    assert run_job(load_from_args(build_parser().parse_args(argv))) == 0
    final = rows(out)
    assert sorted(r["index"] for r in final) == list(range(6))
    assert all(r["status"] == "ok" for r in final)
    # An ok input is not read or written again.
    assert (out / "masks" / "img_000.png").stat().st_mtime_ns == mtime
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"]["ok"] == 6 and summary["this_run"]["inputs_run"] == 1


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.yaml").write_text("model:\n  name: unet\n  weights: none\n  classes: [a, b]\n")
    job = load_job(
        None,
        {
            "input.paths": [str(PHOTOS)],
            "output.path": str(out),
            "output.resume": True,
            "model.name": "lraspp_mobilenet_v3_large",
            "model.weights": "none",
        },
    )
    from segbatch.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.name"):
        run_job(job)


@pytest.mark.slow  # 60 s; the local kill test covers the same resume logic in the default run
@pytest.mark.s3
@pytest.mark.usefixtures("ray_session")
def test_kill_driver_on_s3_then_resume_is_exactly_once(
    tmp_path: Path, unet_checkpoint: str
) -> None:
    """The same, with inputs, weights, masks and Parquet on an S3 API server (moto, loopback)."""
    import fsspec

    from tests.s3_server import running_s3_server

    inputs = tmp_path / "in"
    paths = make_inputs(inputs, 40)
    with running_s3_server() as server:
        client = server.client()
        client.create_bucket(Bucket="scenes")
        for p in paths:
            client.upload_file(str(p), "scenes", f"in/{p.name}")
        client.upload_file(unet_checkpoint, "scenes", "weights/unet.pt")
        argv = args(inputs, tmp_path / "unused", unet_checkpoint)
        replace = {
            "--input": "s3://scenes/in/",
            "--output": "s3://scenes/out",
            "--weights": "s3://scenes/weights/unet.pt",
        }
        s3_argv = [replace.get(argv[i - 1], a) if i else a for i, a in enumerate(argv)]
        log_file = (tmp_path / "driver.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "segbatch", "run", *s3_argv],
            cwd=REPO, env={**os.environ, **server.env()}, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            listed = client.list_objects_v2(Bucket="scenes", Prefix="out/masks/")
            if listed.get("KeyCount", 0) >= 12:
                break
            time.sleep(0.1)
        log = (tmp_path / "driver.log").read_text()[-2000:]
        assert proc.poll() is None, f"the run ended before it could be killed:\n{log}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log_file.close()

        opts = server.storage_options()
        resumed = load_job(
            None,
            {
                "input.paths": ["s3://scenes/in/"],
                "output.path": "s3://scenes/out",
                "output.resume": True,
                "output.rows_per_file": 5,
                "output.overlays": 0,
                "model.name": "unet",
                "model.weights": "s3://scenes/weights/unet.pt",
                "model.num_classes": 3,
                "model.unet.depth": 2,
                "model.unet.base_channels": 8,
                "inference.device": "cpu",
                "inference.batch_size": 1,
                "storage.options": opts,
            },
        )
        assert run_job(resumed) == 0
        fs = fsspec.filesystem("s3", **opts)
        table = pq.read_table("scenes/out/results", filesystem=fs)
        final = table.to_pylist()
        assert sorted(r["index"] for r in final) == list(range(40))
        assert all(r["status"] == "ok" for r in final)
        for r in final:
            assert r["mask_path"].startswith("s3://scenes/out/masks/")
            with fs.open(r["mask_path"], "rb") as fh:
                assert np.asarray(Image.open(fh)).shape == (r["height"], r["width"])
        summary = json.loads(fs.cat_file("scenes/out/summary.json"))
        assert summary["images"] == {"total": 40, "ok": 40, "error": 0, "not_run": 0}
        assert sum(summary["pixels"].values()) == 40 * 160 * 200


@pytest.fixture(scope="module")
def first_run(
    tmp_path_factory: pytest.TempPathFactory, unet_checkpoint: str, ray_session: None
) -> dict[str, Path]:
    """One finished run of 3 inputs whose checkpoint lives in its own folder."""
    import shutil

    root = tmp_path_factory.mktemp("first")
    inputs, out, ckpt = root / "in", root / "out", root / "ck" / "unet.pt"
    make_inputs(inputs, 3)
    ckpt.parent.mkdir()
    shutil.copy(unet_checkpoint, ckpt)
    from segbatch.cli import build_parser, load_from_args

    argv = ["run", *args(inputs, out, str(ckpt))]
    assert run_job(load_from_args(build_parser().parse_args(argv))) == 0
    return {"inputs": inputs, "out": out, "ckpt": ckpt}


def _resume_argv(run: dict[str, Path], out: Path, ckpt: str, *extra: str) -> list[str]:
    return ["run", *args(run["inputs"], out, ckpt), "--resume", *extra]


def test_resume_accepts_the_same_checkpoint_spelled_another_way(
    first_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import yaml

    from segbatch.cli import build_parser, load_from_args

    out = tmp_path / "out"
    shutil.copytree(first_run["out"], out)
    first_yaml = yaml.safe_load((out / "job.yaml").read_text())
    monkeypatch.chdir(first_run["ckpt"].parent)
    argv = _resume_argv(first_run, out, "./unet.pt")
    assert run_job(load_from_args(build_parser().parse_args(argv))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"] == {"inputs_run": 0, "inputs_skipped": 3}
    recorded = first_yaml["model"]["weights_id"]
    assert recorded.startswith("sha256:") and len(recorded) == len("sha256:") + 64
    assert yaml.safe_load((out / "job.yaml").read_text())["model"]["weights_id"] == recorded


def test_resume_refuses_a_checkpoint_whose_contents_changed(
    first_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib

    import yaml

    from segbatch.cli import main

    ckpt = first_run["ckpt"]
    original = ckpt.read_bytes()
    state = torch.load(ckpt, weights_only=True)
    try:
        torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, ckpt)
        changed = "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()
        assert main(_resume_argv(first_run, first_run["out"], str(ckpt))) == 2
    finally:
        ckpt.write_bytes(original)
    recorded = yaml.safe_load((first_run["out"] / "job.yaml").read_text())["model"]["weights_id"]
    assert recorded == "sha256:" + hashlib.sha256(original).hexdigest()
    err = capsys.readouterr().err
    assert f"model.weights_id: first run {recorded!r}, this run {changed!r}" in err


def test_resume_with_other_output_settings_names_every_difference(
    first_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from segbatch.cli import main

    out = first_run["out"]
    mtime = (out / "summary.json").stat().st_mtime_ns
    argv = _resume_argv(
        first_run, out, str(first_run["ckpt"]),
        "--set", "output.rows_per_file=3", "--set", "output.nodata_value=200",
        "--set", "inference.precision=bf16", "--set", "tiling.overlap=0.5",
        "--set", "input.max_image_pixels=1000000", "--set", "stats.min_component_px=4",
    )  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    for line in [
        "output.rows_per_file: first run 5, this run 3",
        "output.nodata_value: first run 255, this run 200",
        "inference.precision: first run 'fp32', this run 'bf16'",
        "tiling.overlap: first run 0.25, this run 0.5",
        "input.max_image_pixels: first run 89478485, this run 1000000",
        "stats.min_component_px: first run 1, this run 4",
    ]:
        assert line in err
    assert err.count(": first run ") == 6  # nothing else differs
    assert (out / "summary.json").stat().st_mtime_ns == mtime  # refused before running


def test_resume_refuses_a_folder_that_is_not_a_segbatch_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from segbatch.cli import main

    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    mine = home / "project" / ".notes.txt.tmp-0123abcd"
    mine.write_text("draft")
    argv = ["run", "--input", str(PHOTOS), "--output", str(home), "--model", "unet"]
    assert main([*argv, "--weights", "none", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no job.yaml" in err and "without --resume" in err
    assert mine.read_text() == "draft"


def test_weights_id_names_what_the_weights_are(tmp_path: Path) -> None:
    import hashlib

    from segbatch.config import ModelConfig, PreprocessConfig
    from segbatch.models import resolve_model, weights_id

    pre = PreprocessConfig()
    full = "LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1"
    for weights in ("default", "COCO_WITH_VOC_LABELS_V1", full):
        info = resolve_model(ModelConfig(weights=weights), pre)
        assert weights_id(info) == full
    assert weights_id(resolve_model(ModelConfig(weights="none"), pre)) == "none"
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(bytes(range(256)) * 100_000)  # over one read chunk
    info = resolve_model(ModelConfig(name="unet", weights=str(ckpt)), pre)
    assert weights_id(info) == "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_a_given_weights_id_must_match_the_weights(tmp_path: Path) -> None:
    from segbatch.errors import WeightsError

    job = load_job(
        None,
        {
            "input.paths": [str(PHOTOS)],
            "output.path": str(tmp_path / "out"),
            "model.name": "unet",
            "model.weights": "none",
            "model.weights_id": "sha256:" + "0" * 64,
        },
    )
    with pytest.raises(WeightsError, match=r"model\.weights_id is 'sha256:0000"):
        run_job(job)
    assert not (tmp_path / "out").exists()


def _wait_for(folder: Path, pattern: str, proc: subprocess.Popen[bytes]) -> None:
    """Until a file matching ``pattern`` is in ``folder``, while ``proc`` still runs."""
    deadline = time.time() + 300
    while time.time() < deadline:
        if folder.exists() and any(folder.glob(pattern)):
            assert proc.poll() is None, "the run ended before it could be stopped: make it longer"
            return
        assert proc.poll() is None, "the run ended without writing " + pattern
        time.sleep(0.02)
    raise AssertionError(f"no {pattern} after 300 s")


def _session_address() -> list[str]:
    """--address of the test session's own Ray: a driver in a subprocess joins it instead of
    starting a second Ray (seconds on a busy machine), and never joins another one."""
    import ray

    return ["--address", ray.get_runtime_context().gcs_address]


def _valid_rows(out: Path) -> list[dict[str, Any]]:
    """Every row written, after checking it: ok, its mask on disk and the image's size."""
    written = rows(out)
    for r in written:
        assert r["status"] == "ok", r["error"]
        mask = np.asarray(Image.open(r["mask_path"]))
        assert mask.shape == (r["height"], r["width"]) == (160, 200)
        assert sum(r[f"px_class_{c}"] for c in range(3)) == 160 * 200
    return written


@pytest.mark.usefixtures("ray_session")
def test_one_ctrl_c_writes_the_rows_done_and_resume_completes(
    tmp_path: Path, unet_checkpoint: str
) -> None:
    inputs = tmp_path / "in"
    make_inputs(inputs, 40)
    out = tmp_path / "out"
    argv = ["run", *args(inputs, out, unet_checkpoint), *_session_address()]
    err_path = tmp_path / "stderr.txt"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "segbatch", *argv],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip
        try:
            # Once rows reach the driver (its first part is written); rows still in an actor
            # when Ctrl-C comes are run again by --resume.
            _wait_for(out / "results", "*.parquet", proc)
            sent = time.time()
            os.kill(proc.pid, signal.SIGINT)
            code = proc.wait(timeout=60)
            stop_s = time.time() - sent
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what the run left behind, if anything
    stderr = err_path.read_text()
    assert code == 130, stderr[-3000:]
    assert stop_s < 20, stop_s
    assert "Traceback" not in stderr, stderr[-3000:]
    from segbatch.cli import resume_command

    hint = f"segbatch: to continue, run: {resume_command(argv)}"
    assert hint in stderr.splitlines()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] == "interrupted (SIGINT)"
    done_before = len(_valid_rows(out))
    assert summary["images"] == {
        "total": 40, "ok": done_before, "error": 0, "not_run": 40 - done_before
    }  # fmt: skip
    assert 5 <= done_before < 40  # the rows done were written; the run did stop early

    # The hint's command, run: every input exactly once.
    from segbatch.cli import build_parser, load_from_args

    resumed = shlex.split(hint.split("run: ", 1)[1])[1:]
    assert run_job(load_from_args(build_parser().parse_args(resumed))) == 0
    final = _valid_rows(out)
    assert sorted(r["index"] for r in final) == list(range(40))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is None
    assert summary["this_run"] == {"inputs_run": 40 - done_before, "inputs_skipped": done_before}


@pytest.mark.slow  # 40 s; test_sinks' flush and resume-from-a-flushed-part tests run by default
@pytest.mark.usefixtures("ray_session")
def test_kill_after_a_flush_of_a_filling_part_then_resume(
    tmp_path: Path, unet_checkpoint: str
) -> None:
    """rows_per_file above the job's size: only the periodic flush leaves rows to resume from."""
    inputs = tmp_path / "in"
    make_inputs(inputs, 60)
    out = tmp_path / "out"
    flags = ["--set", "output.rows_per_file=10000", "--set", "output.flush_every_s=0.5"]
    argv = ["run", *args(inputs, out, unet_checkpoint), *flags, *_session_address()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "segbatch", *argv],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for(out / "results", "part-00000.parquet", proc)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = len(_valid_rows(out))
    assert 0 < done_before < 60
    from segbatch.cli import build_parser, load_from_args

    assert run_job(load_from_args(build_parser().parse_args([*argv, "--resume"]))) == 0
    final = _valid_rows(out)
    assert sorted(r["index"] for r in final) == list(range(60))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"] == {"inputs_run": 60 - done_before, "inputs_skipped": done_before}
    assert [p.name for p in (out / "results").iterdir()] == ["part-00000.parquet"]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 300 KiB tmpfs (needs root and a mount-capable container; skipped elsewhere)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.usefixtures("ray_session")
def test_full_disk_stops_the_job_and_resume_completes(
    tmp_path: Path, unet_checkpoint: str, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inputs = tmp_path / "in"
    make_inputs(inputs, 40)
    out = small_disk / "out"
    out.mkdir()
    # Room for about 15 small files (a tmpfs takes a 4 KiB page per file): the disk fills
    # with some masks and parts written and most of the job still to run.
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 60 * 1024))
    from segbatch.cli import build_parser, load_from_args

    argv = ["run", *args(inputs, out, unet_checkpoint)]
    with caplog.at_level(logging.INFO, logger="segbatch"):
        assert run_job(load_from_args(build_parser().parse_args(argv))) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    text = "\n".join(r.getMessage() for r in errors)
    assert "No space left on device" in text, text
    assert f"free on {small_disk}" in text, text
    failed = [r for r in errors if r.getMessage().startswith("the job failed after")]
    assert len(failed) == 1, text
    # The job stopped on the first full write: it did not fail every remaining input.
    assert failed[0].args[0] < 40  # type: ignore[index]
    if not (out / "summary.json").exists():
        assert any(r.getMessage().startswith("could not write summary.json") for r in errors)
    # What was written is valid: whole parts of whole rows, no temp files left behind.
    assert not list(out.rglob(".*.tmp-*"))
    if (out / "results").exists():
        for r in rows(out):
            assert r["status"] == "ok" or "writing the mask failed" in r["error"]

    filler.unlink()  # room again
    assert run_job(load_from_args(build_parser().parse_args([*argv, "--resume"]))) == 0
    final = _valid_rows(out)
    assert sorted(r["index"] for r in final) == list(range(40))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == {"total": 40, "ok": 40, "error": 0, "not_run": 0}
