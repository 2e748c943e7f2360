"""segbatch on a three-node Ray cluster on this machine, submitted through the Ray Jobs API.

The cluster (a head and two worker nodes, separate ``ray start`` processes) and the checks live
in ``scripts/cluster_smoke.py``; the slow tests here run its two scenarios: a plain job whose
inference actors must land on more than one node, then a job during which a worker node that
hosts an inference actor is killed. Both must write every input exactly once.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from segbatch.cli import build_parser, load_from_args
from tests.conftest import REPO

N_IMAGES = 600


def _load_smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "cluster_smoke", REPO / "scripts" / "cluster_smoke.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


smoke = _load_smoke()


def test_job_command_line_is_a_valid_segbatch_job(tmp_path: Path) -> None:
    """The entrypoint the cluster runs parses into the job the scenarios rely on."""
    argv = shlex.split(smoke.entrypoint(tmp_path / "in", tmp_path / "out", "[2,3]"))
    assert argv[:3] == [sys.executable, "-m", "segbatch"]
    job = load_from_args(build_parser().parse_args(argv[3:]))
    assert job.ray.address == "auto"
    assert job.inference.workers == (2, 3)
    assert job.inference.device == "cpu"
    assert job.output.path == str(tmp_path / "out")


def test_teardown_finds_only_marked_processes(tmp_path: Path) -> None:
    """Teardown kills by environment marker: it must see the marked process, not its twin."""
    marker_value = str(tmp_path)
    env = {**os.environ, smoke.MARKER: marker_value}
    marked = subprocess.Popen(["sleep", "60"], env=env)
    unmarked = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        found: list[int] = []
        while marked.pid not in found and time.monotonic() < deadline:
            found = smoke._processes_with(smoke.MARKER, marker_value)
            time.sleep(0.05)
        assert found == [marked.pid]
        smoke._kill(found, signal.SIGKILL)
        assert marked.wait(timeout=5) == -signal.SIGKILL
        assert unmarked.poll() is None
    finally:
        for proc in (marked, unmarked):
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    for module in ("aiohttp_cors", "opencensus", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"the Ray dashboard (Jobs API) needs ray[default]; {module} is missing")
    with smoke.local_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def inputs(cluster: Any) -> list[Path]:
    return smoke.make_images(cluster.root / "inputs", N_IMAGES)


@pytest.mark.slow
def test_job_runs_on_several_nodes(cluster: Any, inputs: list[Path]) -> None:
    assert len(cluster.alive_node_ids()) == 3
    out = cluster.root / "out-multi"
    run = smoke.run_job(cluster, cluster.root / "inputs", out)

    assert run.status == "SUCCEEDED", run.logs[-3000:]
    worker_ids = {n.node_id for n in cluster.nodes if n.name != "head"}
    assert len(run.actor_nodes) >= 2, run.placements
    assert run.actor_nodes & worker_ids, "no inference actor on a worker node"
    assert 2 <= len(run.actors) <= 3, "the pool stays within inference.workers [2, 3]"
    # Not a terminal: periodic log lines instead of progress bars.
    progress = [line for line in run.logs.splitlines() if "images/s" in line and "ETA" in line]
    assert progress, run.logs[-3000:]
    checked = smoke.check_output(out, inputs)
    assert checked["rows"] == N_IMAGES


@pytest.mark.slow
def test_job_survives_a_killed_worker_node(cluster: Any, inputs: list[Path]) -> None:
    out = cluster.root / "out-killed"
    run = smoke.run_job(
        cluster, cluster.root / "inputs", out, "2", kill_after_masks=smoke.KILL_AFTER_MASKS
    )

    assert run.status == "SUCCEEDED", run.logs[-3000:]
    assert run.killed_node is not None, "no worker node hosted an inference actor"
    assert run.killed_at_masks < N_IMAGES, "killed only after every mask was written"
    killed = next(n for n in cluster.nodes if n.name == run.killed_node)
    assert killed.node_id not in cluster.alive_node_ids()
    assert killed.node_id in run.actor_nodes
    checked = smoke.check_output(out, inputs)
    assert checked["rows"] == N_IMAGES
