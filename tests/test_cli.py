"""The command line: exit codes, usage errors before Ray starts, models, validate, job files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segbatch.cli import main
from segbatch.config import load_job
from segbatch.models import model_names, resolve_model
from tests.conftest import PHOTOS, REPO

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def segbatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segbatch", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_missing_input_exits_2_before_ray_starts(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = segbatch("run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert "Started a local Ray" not in result.stderr + result.stdout
    assert time.perf_counter() - started < 60


def test_no_images_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.md").write_text("hi")
    assert main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
    assert "no image files found" in capsys.readouterr().err


def test_unknown_key_names_the_closest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--set", "inference.batchsize=4", "--input", str(PHOTOS)])
    assert code == 2
    err = capsys.readouterr().err
    assert "inference.batchsize" in err and "inference.batch_size" in err


def test_bad_job_file_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("input:\n  paths: [x]\nmodle:\n  name: unet\n")
    assert main(["validate", str(bad)]) == 2
    assert "'model'" in capsys.readouterr().err


def test_unknown_model_lists_known(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--input", str(PHOTOS), "--model", "deeplab"]) == 2
    err = capsys.readouterr().err
    assert "deeplabv3_resnet50" in err


def test_non_empty_output_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    args = ["run", "--input", str(PHOTOS), "--output", str(out), "--weights", "none"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_models_lists_every_model() -> None:
    result = segbatch("models")
    assert result.returncode == 0
    for name in model_names():
        assert name in result.stdout
    assert "520" in result.stdout  # the torchvision preset


def test_validate_prints_the_resolved_job() -> None:
    result = segbatch("validate", "jobs/demo.yaml", "--set", "inference.batch_size=3")
    assert result.returncode == 0, result.stderr
    assert "batch_size: 3" in result.stdout
    assert "3 inputs" in result.stderr


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_file_validates(path: Path) -> None:
    cfg = load_job(path)
    info = resolve_model(cfg.model, cfg.preprocess)
    assert info.num_classes >= 1
    assert cfg.input.paths


def test_storage_options_are_redacted_in_validate_output(tmp_path: Path) -> None:
    secret = "AKIAEXAMPLESECRET123"
    result = segbatch("validate", "jobs/demo.yaml", "--set", f"storage.options={{key: {secret}}}")
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout + result.stderr


def test_offline_default_weights_fail_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import urllib.error

    from segbatch import models

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(weights: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(models, "_download_state_dict", offline)
    code = main(["run", "--input", str(PHOTOS), "--output", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "lraspp_mobilenet_v3_large" in err and "--weights PATH" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_that_does_not_fit_fails_before_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    torch.save({"weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    args = ["run", "--input", str(PHOTOS), "--output", str(tmp_path / "o")]
    assert main([*args, "--weights", str(tmp_path / "wrong.pt")]) == 2
    assert "wrong.pt" in capsys.readouterr().err


def test_sigint_handler_first_interrupts_then_exits_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from segbatch import cli

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    before = signal.getsignal(signal.SIGINT)
    with cli.sigint_stops_job():
        assert signal.getsignal(signal.SIGINT) is not before
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        assert exits == []
        with pytest.raises(SystemExit):
            signal.raise_signal(signal.SIGINT)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is before
    err = capsys.readouterr().err
    assert "Ctrl-C again to quit at once" in err and "exiting now" in err


def test_resume_command_repeats_the_run_with_resume() -> None:
    from segbatch.cli import resume_command

    argv = ["run", "job.yaml", "--output", "/data/out dir", "--overwrite", "--set", "a.b=1"]
    assert resume_command(argv) == (
        "segbatch run job.yaml --output '/data/out dir' --set a.b=1 --resume"
    )
    assert resume_command(["run", "--resume", "j.yaml"]) == "segbatch run --resume j.yaml"


def test_after_interrupt_hint_needs_a_started_run_and_hides_credentials(tmp_path: Path) -> None:
    from segbatch.cli import _after_interrupt

    out = tmp_path / "out"
    job = load_job(None, {"output.path": str(out)})
    argv = ["run", "--input", "https://alice:Pa55w0rd@host/a.png?sig=1", "--output", str(out)]
    assert "nothing was written" in _after_interrupt(job, argv)
    out.mkdir()
    (out / "job.yaml").write_text("{}")
    hint = _after_interrupt(job, argv)
    assert hint.endswith("--resume") and "https://host/a.png" in hint
    assert "Pa55w0rd" not in hint and "alice" not in hint and "sig=" not in hint


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from segbatch import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"segbatch {__version__}"
