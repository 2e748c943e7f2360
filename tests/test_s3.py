"""The whole job against a real S3 API (moto's server on 127.0.0.1): inputs, masks, Parquet and
weights on S3, credentials from storage.options or the standard AWS variables, never logged."""

from __future__ import annotations

import io as stdio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from segbatch.config import load_job
from segbatch.models import UNet
from segbatch.pipeline import run_job
from tests.conftest import PHOTOS, REPO
from tests.s3_server import ACCESS_KEY, SECRET_KEY, S3Server, running_s3_server

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("ray_session")]

BUCKET = "segbatch-e2e"
NUM_CLASSES = 4
PHOTO_NAMES = sorted(p.name for p in PHOTOS.glob("*.png"))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """moto's S3 on loopback holding the sample photos and a small U-Net checkpoint."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with running_s3_server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        for name in PHOTO_NAMES:
            client.put_object(
                Bucket=BUCKET, Key=f"photos/{name}", Body=(PHOTOS / name).read_bytes()
            )
        torch.manual_seed(0)
        net = UNet(3, NUM_CLASSES, depth=2, base_channels=8)
        with torch.no_grad():  # a sharper head: masks with several classes, not one
            net.head.weight.mul_(20)
            net.head.bias.zero_()
        buf = stdio.BytesIO()
        torch.save(net.state_dict(), buf)
        client.put_object(Bucket=BUCKET, Key="weights/unet.pt", Body=buf.getvalue())
        yield server


def job_settings(inputs: str, output: str, weights: str) -> dict[str, Any]:
    return {
        "input.paths": [inputs],
        "output.path": output,
        "model.name": "unet",
        "model.weights": weights,
        "model.num_classes": NUM_CLASSES,
        "model.unet.depth": 2,
        "model.unet.base_channels": 8,
        "preprocess.resize": [64, 64],
        "inference.device": "cpu",
        "inference.batch_size": 2,
        "output.rows_per_file": 2,
    }


def s3_get(server: S3Server, key: str) -> bytes:
    return bytes(server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())


def s3_keys(server: S3Server, prefix: str) -> list[str]:
    listed = server.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


def read_rows(server: S3Server, prefix: str) -> list[dict[str, Any]]:
    keys = [k for k in s3_keys(server, f"{prefix}/results/") if k.endswith(".parquet")]
    return [r for k in keys for r in pq.read_table(stdio.BytesIO(s3_get(server, k))).to_pylist()]


@pytest.fixture(scope="module")
def local_reference(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same job on local files: the S3 run must give the same masks and rows."""
    root = tmp_path_factory.mktemp("local-ref")
    ckpt = root / "unet.pt"
    ckpt.write_bytes(s3_get(s3, "weights/unet.pt"))
    out = root / "out"
    assert run_job(load_job(None, job_settings(str(PHOTOS), str(out), str(ckpt)))) == 0
    return out


def check_s3_outputs(server: S3Server, prefix: str, reference: Path) -> None:
    rows = read_rows(server, prefix)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["path"] for r in rows] == [f"s3://{BUCKET}/photos/{n}" for n in PHOTO_NAMES]
    assert s3_keys(server, f"{prefix}/results/") == [
        f"{prefix}/results/part-00000.parquet",
        f"{prefix}/results/part-00001.parquet",
    ]
    ref_rows = [
        r for p in sorted(reference.glob("results/*.parquet")) for r in pq.read_table(p).to_pylist()
    ]
    px_cols = [f"px_class_{k}" for k in range(NUM_CLASSES)]
    for row, ref, name in zip(rows, ref_rows, PHOTO_NAMES, strict=True):
        assert row["status"] == "ok", row["error"]
        assert row["mask_path"] == f"s3://{BUCKET}/{prefix}/masks/{name}"
        mask = np.asarray(Image.open(stdio.BytesIO(s3_get(server, f"{prefix}/masks/{name}"))))
        assert mask.shape == (row["height"], row["width"])
        assert int(mask.max()) < NUM_CLASSES and len(np.unique(mask)) >= 3
        counts = np.bincount(mask.ravel(), minlength=NUM_CLASSES).tolist()
        assert [row[c] for c in px_cols] == counts
        assert sum(counts) == row["width"] * row["height"]
        # Byte for byte what the same job computes on local files.
        ref_mask = np.asarray(Image.open(reference / "masks" / name))
        assert np.array_equal(mask, ref_mask)
        assert [ref[c] for c in px_cols] == counts
    summary = json.loads(s3_get(server, f"{prefix}/summary.json"))
    assert summary["images"] == {"total": 3, "ok": 3, "error": 0, "not_run": 0}
    assert sum(summary["pixels"].values()) == sum(r["width"] * r["height"] for r in rows)


def test_whole_job_on_s3_with_storage_options(
    s3: S3Server,
    local_reference: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # Everything at DEBUG: the secret must appear nowhere. (botocore's own DEBUG lines print the
    # signed request, whose Authorization header names the access key id, never the secret.)
    caplog.set_level(logging.DEBUG)
    settings = job_settings(
        f"s3://{BUCKET}/photos/", f"s3://{BUCKET}/out-opts", f"s3://{BUCKET}/weights/unet.pt"
    )
    settings["storage.options"] = s3.storage_options()
    assert run_job(load_job(None, settings)) == 0
    check_s3_outputs(s3, "out-opts", local_reference)

    # The credentials reach no output and no log line.
    written = {key: s3_get(s3, key) for key in s3_keys(s3, "out-opts/")}
    assert "out-opts/job.yaml" in written and "out-opts/summary.json" in written
    job_yaml = written["out-opts/job.yaml"].decode()
    assert "endpoint_url: <redacted>" in job_yaml
    captured = capfd.readouterr()
    segbatch_log = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("segbatch")
    )
    assert "progress" in segbatch_log or "segbatch" in captured.out  # the capture saw the job
    texts = {
        **{key: data.decode("latin-1") for key, data in written.items()},
        "segbatch log records": segbatch_log,
        "stdout": captured.out,
        "stderr": captured.err,
    }
    for where, text in texts.items():
        assert ACCESS_KEY not in text, where
        assert SECRET_KEY not in text, where
    assert SECRET_KEY not in caplog.text


@pytest.mark.slow  # 45 s; test_whole_job_on_s3_with_storage_options covers the job on S3 by default
def test_cli_on_s3_with_standard_aws_variables(
    s3: S3Server, local_reference: Path, tmp_path: Path
) -> None:
    """`python -m segbatch run` in its own process (and its own Ray), credentials and endpoint
    from AWS_* variables only: botocore reads AWS_ENDPOINT_URL, so nothing in the job names it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(s3.env())
    env["AWS_CONFIG_FILE"] = str(tmp_path / "no-aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-aws-credentials")
    args = [f"--{k}={v}" for k, v in (("input", f"s3://{BUCKET}/photos/"),)]
    settings = job_settings("", f"s3://{BUCKET}/out-env", f"s3://{BUCKET}/weights/unet.pt")
    sets = [
        f"{key}={json.dumps(value)}"
        for key, value in settings.items()
        if key not in ("input.paths", "output.path", "model.weights")
    ]
    cmd = [
        sys.executable,
        "-m",
        "segbatch",
        "run",
        *args,
        f"--output=s3://{BUCKET}/out-env",
        f"--weights=s3://{BUCKET}/weights/unet.pt",
        *(arg for s in sets for arg in ("--set", s)),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_s3_outputs(s3, "out-env", local_reference)
    for text in (proc.stdout, proc.stderr, s3_get(s3, "out-env/job.yaml").decode()):
        assert SECRET_KEY not in text and ACCESS_KEY not in text
