"""Credentials inside URIs (``http://user:password@host/...``) never reach the outputs: job.yaml,
the Parquet rows (path, mask_path, error) and summary.json hold the URIs redacted, and --resume
still matches the inputs and the model to what the first run wrote."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from segbatch import sinks
from segbatch.actor import result_rows
from segbatch.config import load_job, to_yaml
from segbatch.errors import ConfigError
from segbatch.models import UNet
from segbatch.pipeline import run_job

USER, PASSWORD = "alice", "Pa55w0rd"


class BasicAuthHandler(SimpleHTTPRequestHandler):
    """Serves a folder to the one user with the right password; 401 for anyone else."""

    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def _allowed(self) -> bool:
        if self.headers.get("Authorization") == self.expected:
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_GET(self) -> None:
        if self._allowed():
            super().do_GET()

    def do_HEAD(self) -> None:
        if self._allowed():
            super().do_HEAD()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(served folder, base URI with the user and password in it) of a server on 127.0.0.1."""
    root = tmp_path_factory.mktemp("served")
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(BasicAuthHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://{USER}:{PASSWORD}@127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_result_rows_redact_path_mask_path_and_error() -> None:
    secret_uri = f"https://{USER}:{PASSWORD}@host/in/a.png"
    batch = {
        "index": np.array([0, 1]),
        "uri": np.array([secret_uri, f"s3://bkt/b.png?X-Amz-Signature={PASSWORD}"], dtype=object),
        "width": np.array([4, -1]),
        "height": np.array([4, -1]),
        "error": np.array(["", f"file not found: {secret_uri}"], dtype=object),
        "mask_path": np.array(
            [f"webdav://{USER}:{PASSWORD}@dav/out/masks/a.png", ""], dtype=object
        ),
        "counts": np.array([[16], [0]]),
        "px_nodata": np.array([0, 0]),
        "extra": np.array(["{}", "{}"], dtype=object),
    }
    rows = result_rows(batch, "unet", ["px_a"])
    assert [r["path"] for r in rows] == ["https://host/in/a.png", "s3://bkt/b.png"]
    assert rows[0]["mask_path"] == "webdav://dav/out/masks/a.png"
    assert rows[1]["error"] == "file not found: https://host/in/a.png"
    assert PASSWORD not in json.dumps(rows)


def test_read_done_matches_redacted_rows_to_the_inputs(tmp_path: Path) -> None:
    paths = [f"http://{USER}:{PASSWORD}@h/a.png", "/data/b.png", "s3://bkt/c.png"]
    schema = sinks.results_schema(["a"])
    writer = sinks.ResultsWriter(str(tmp_path), schema, 3, 10)
    for i, status in enumerate(["ok", "error", "ok"]):
        row = {"index": i, "path": paths[i], "status": status, "model": "unet"}
        writer.add({**row, "path": "http://h/a.png"} if i == 0 else row)
    writer.close()
    assert sinks.read_done(str(tmp_path), paths).tolist() == [True, False, True]
    # A row written unredacted (by an older segbatch) still matches too.
    assert sinks.read_done(str(tmp_path), ["http://h/a.png", *paths[1:]]).tolist() == [
        True,
        False,
        True,
    ]


@pytest.mark.usefixtures("ray_session")
def test_credentials_in_uris_reach_no_output(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, base = http_root
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(root / name)
    torch.manual_seed(0)
    torch.save(UNet(3, 2, depth=1, base_channels=4).state_dict(), root / "unet.pt")
    manifest = tmp_path / "inputs.txt"
    manifest.write_text(f"{base}/b.png\n{base}/missing.png\n")
    out = tmp_path / "out"
    settings = {
        "input.paths": [f"{base}/a.png", str(manifest)],
        "output.path": str(out),
        "model.name": "unet",
        "model.weights": f"{base}/unet.pt",
        "model.num_classes": 2,
        "model.unet.depth": 1,
        "model.unet.base_channels": 4,
        "inference.device": "cpu",
        "inference.workers": 1,
        "output.overlays": 0,
        "max_error_fraction": 0.5,
    }
    assert run_job(load_job(None, settings)) == 0

    host = base.split("@", 1)[1]
    rows = pq.read_table(out / "results").to_pylist()
    assert [(r["path"], r["status"]) for r in rows] == [
        (f"http://{host}/a.png", "ok"),
        (f"http://{host}/b.png", "ok"),
        (f"http://{host}/missing.png", "error"),
    ]
    assert rows[2]["error"].startswith("file not found: ")
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {p.name for p in written} >= {"job.yaml", "summary.json", "part-00000.parquet"}
    for path, data in written.items():
        assert PASSWORD.encode() not in data, path
        assert f"{USER}:".encode() not in data, path
    job_yaml = (out / "job.yaml").read_text()
    assert f"http://{host}/a.png" in job_yaml and f"weights: http://{host}/unet.pt" in job_yaml


def test_resume_accepts_the_first_run_with_redacted_weights(tmp_path: Path) -> None:
    """job.yaml holds model.weights redacted; resuming with the same URI is the same model.

    A job.yaml of today records model.weights_id, which --resume compares instead; one written
    before weights_id existed is compared by model.weights, redacted: that is the case here."""
    from segbatch.pipeline import _check_resumable, plan_job

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    ckpt = tmp_path / "unet.pt"
    torch.save(UNet(3, 2, depth=1, base_channels=4).state_dict(), ckpt)
    settings = {
        "input.paths": [str(image)],
        "output.path": str(tmp_path / "out"),
        "model.name": "unet",
        "model.weights": f"file://{ckpt}",
        "model.num_classes": 2,
        "model.unet.depth": 1,
        "model.unet.base_channels": 4,
    }
    plan = plan_job(load_job(None, settings))
    (tmp_path / "out").mkdir()
    # The first run's job.yaml, as run_job writes it, for weights given with a password.
    secret = {**settings, "model.weights": f"https://{USER}:{PASSWORD}@host/unet.pt?sig=1"}
    first = load_job(None, secret)
    model = dataclasses.replace(first.model, classes=plan.info.classes)
    written = yaml.safe_load(to_yaml(dataclasses.replace(first, model=model)))
    del written["model"]["weights_id"]
    (tmp_path / "out" / "job.yaml").write_text(yaml.safe_dump(written))
    _check_resumable(first, plan.info)  # the same weights: accepted
    other = load_job(None, {**secret, "model.weights": "https://host/other.pt"})
    with pytest.raises(ConfigError, match=r"model\.weights"):
        _check_resumable(other, plan.info)


def test_weights_id_of_a_missing_checkpoint_hides_the_credentials(tmp_path: Path) -> None:
    from segbatch.errors import CheckpointNotFoundError
    from segbatch.models import resolve_model, weights_id

    uri = f"memory://{USER}:{PASSWORD}@bucket{tmp_path}/missing.pt"
    job = load_job(None, {"model.name": "unet", "model.num_classes": 2, "model.weights": uri})
    info = resolve_model(job.model, job.preprocess)
    with pytest.raises(CheckpointNotFoundError) as caught:
        weights_id(info)
    assert PASSWORD not in str(caught.value) and USER not in str(caught.value)
    assert "missing.pt" in str(caught.value)
