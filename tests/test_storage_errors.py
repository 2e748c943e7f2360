"""Storage that cannot be reached or refuses the job's credentials, met on the driver: one line
naming storage.options and the endpoint, exit code 2, before Ray starts (moto on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from segbatch.cli import EXIT_USAGE, main
from segbatch.config import InputConfig
from segbatch.errors import StorageAccessError
from segbatch.sources import list_inputs
from tests.conftest import PHOTOS
from tests.s3_server import REGION, S3Server, free_port, running_s3_server

pytestmark = pytest.mark.s3

BUCKET = "segbatch-errors"
# botocore retries a refused connection 4 times with backoff (about 10 s): the tests retry once.
ONE_ATTEMPT = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with running_s3_server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key="in/a.png", Body=(PHOTOS / "coffee.png").read_bytes())
        yield server


@pytest.fixture
def no_aws_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing to find credentials in: no AWS_* variables, no files, no instance metadata."""
    import os

    import s3fs

    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()  # no client made with other credentials


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """These jobs must fail before any Ray work."""

    def refuse(job: Any) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr("segbatch.pipeline._init_ray", refuse)


def run_cli(
    capsys: pytest.CaptureFixture[str], inputs: str, output: str, options: dict[str, Any]
) -> tuple[int, str]:
    """`segbatch run` in this process; returns (exit code, stderr)."""
    code = main(
        [
            "run",
            "--input",
            inputs,
            "--output",
            output,
            "--model",
            "unet",
            "--weights",
            "none",
            "--set",
            f"storage.options={json.dumps(options)}",
        ]
    )
    return code, capsys.readouterr().err


def test_unreachable_endpoint_while_listing_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    options = {
        "endpoint_url": endpoint,
        "key": "k",
        "secret": "Pa55w0rd",
        "client_kwargs": {"region_name": REGION},
        **ONE_ATTEMPT,
    }
    started = time.perf_counter()
    code, err = run_cli(capsys, f"s3://{BUCKET}/in/", str(tmp_path / "out"), options)
    assert time.perf_counter() - started < 15
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    line = lines[0]
    assert line.startswith("segbatch: error: cannot list the inputs at s3://segbatch-errors/in/")
    assert f"(endpoint {endpoint})" in line
    assert "storage.options" in line and "EndpointConnectionError" in line
    assert "Pa55w0rd" not in err
    assert not (tmp_path / "out").exists()


def test_endpoint_with_credentials_in_it_is_redacted() -> None:
    endpoint = f"http://alice:Pa55w0rd@127.0.0.1:{free_port()}"
    options = {"endpoint_url": endpoint, "key": "k", "secret": "s", **ONE_ATTEMPT}
    with pytest.raises(StorageAccessError) as info:
        list_inputs(InputConfig(paths=(f"s3://{BUCKET}/in/",)), options)
    message = str(info.value)
    assert "Pa55w0rd" not in message and "alice" not in message
    assert "(endpoint http://127.0.0.1:" in message
    assert isinstance(info.value, OSError)


def test_missing_credentials_while_listing_inputs(
    s3: S3Server,
    no_aws_credentials: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = {"endpoint_url": s3.endpoint_url, "client_kwargs": {"region_name": REGION}}
    code, err = run_cli(capsys, f"s3://{BUCKET}/in/", str(tmp_path / "out"), options)
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert f"cannot list the inputs at s3://{BUCKET}/in/ (endpoint {s3.endpoint_url})" in line
    assert "NoCredentialsError" in line
    assert "credentials in storage.options" in line


def test_unreachable_output_root(
    s3: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Local inputs, an output on storage that does not answer: exit 2 before Ray, too."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    options = {"endpoint_url": endpoint, "key": "k", "secret": "s", **ONE_ATTEMPT}
    code, err = run_cli(capsys, str(PHOTOS), f"s3://{BUCKET}/out/", options)
    assert code == EXIT_USAGE
    line = err.strip()
    assert "\n" not in line, err
    assert f"cannot reach the output at s3://{BUCKET}/out/ (endpoint {endpoint})" in line
    assert "storage.options" in line


def test_local_listing_errors_are_not_storage_errors(tmp_path: Path) -> None:
    """A missing local input is still InputNotFoundError (its own message), not a storage error."""
    from segbatch.errors import InputNotFoundError

    with pytest.raises(InputNotFoundError) as info:
        list_inputs(InputConfig(paths=(str(tmp_path / "missing"),)))
    assert not isinstance(info.value, StorageAccessError)
