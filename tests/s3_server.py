"""A real S3 API (moto's server) on loopback for the ``s3`` tests.

The server binds 127.0.0.1 on a free port, never another address; clients reach it through
``endpoint_url`` (storage.options or ``AWS_ENDPOINT_URL``) with throwaway credentials.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"
# Throwaway credentials that moto accepts; the tests check that they never reach the outputs.
ACCESS_KEY = "testing-key-id-7f3a"
SECRET_KEY = "testing-secret-9c41e2"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str

    def storage_options(self) -> dict[str, Any]:
        """What a job file's ``storage.options`` holds to reach this server through s3fs."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"region_name": REGION},
        }

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )


@contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """Start moto's threaded server on 127.0.0.1:<free port>; stop it on exit."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint_url=f"http://{HOST}:{port}")
    finally:
        server.stop()
