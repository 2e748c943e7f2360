"""``flaky://``: the local filesystem with reads that fail transiently, for the fault tests.

Imported as ``tests.flaky_fs`` (the repository root is on the Ray workers' path, as the driver's
working directory), never as a test module: a ``FaultPlan`` in ``storage.options`` is unpickled
in every worker, which imports this module and so registers the protocol there too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass(frozen=True)
class FaultPlan:
    """Fail the first ``faults_per_file`` reads of every file, across all processes.

    It travels in ``storage.options`` to the Ray workers; unpickling it there imports this
    module, which registers the ``flaky://`` protocol in that process. Which reads failed is
    recorded as marker files in ``state_dir`` (shared by the driver and the workers).
    """

    state_dir: str
    faults_per_file: int


# Transient errors as the stores raise them: a reset connection, S3 throttling, a timeout.
TRANSIENT = (
    lambda: ConnectionResetError(104, "Connection reset by peer"),
    lambda: OSError("An error occurred (SlowDown) when calling GetObject: reduce your rate"),
    lambda: TimeoutError("Read timed out"),
)


class FlakyFileSystem(LocalFileSystem):
    """The local filesystem under ``flaky://``, with reads failing as ``fault_plan`` says."""

    protocol = ("flaky",)

    def __init__(self, fault_plan: FaultPlan | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fault_plan = fault_plan

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        path = str(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://") :]
        return super()._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return "flaky://" + self._strip_protocol(name)

    def cat_file(self, path: Any, start: Any = None, end: Any = None, **kwargs: Any) -> Any:
        plan = self.fault_plan
        if plan is not None:
            key = hashlib.sha1(self._strip_protocol(path).encode()).hexdigest()[:16]
            for k in range(plan.faults_per_file):
                marker = os.path.join(plan.state_dir, f"{key}-{k}")
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                raise TRANSIENT[k % len(TRANSIENT)]()
        return super().cat_file(path, start=start, end=end, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
