#!/usr/bin/env python3
"""A three-node Ray cluster on this machine, a segbatch job submitted to it, the output checked.

    .venv/bin/python scripts/cluster_smoke.py                 # both scenarios, ~2-4 min
    .venv/bin/python scripts/cluster_smoke.py --no-kill       # only the plain multi-node run
    .venv/bin/python scripts/cluster_smoke.py --images 400 --keep /tmp/smoke

The head (the driver and 1 CPU) and two worker nodes (1 CPU each, custom resource
``worker_node``) are separate ``ray start --block`` processes, each in its own session,
with private ports, a private temp dir and a private token (Ray 2.60 turns token authentication
on for new clusters). The job goes through the Ray Jobs API of the head's dashboard
(``segbatch run ... --address auto``), with an autoscaling pool of 2 to 3 inference actors: one
CPU per actor and per node, so at least two nodes run actors. Then, on the same cluster, a second
job with 2 actors during which a worker node that hosts one is killed with SIGKILL (the actor
restarts on the CPU that the 3-actor pool would otherwise have taken). Each job must produce one ok
row and one mask per input, no more, no less; the inference actors must have run on more than
one node.

Teardown kills only the processes this script started: every node process carries the
environment marker ``SEGBATCH_SMOKE_CLUSTER=<temp dir>`` (Ray passes the raylet's environment on
to its workers and to the job's driver). ``ray stop`` is never used: it would stop every Ray
instance of the user, other people's tests included.

Exit code 0 when every check passed; a JSON report with timings goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RAY = Path(sys.executable).with_name("ray")
MARKER = "SEGBATCH_SMOKE_CLUSTER"
NODE_MARKER = "SEGBATCH_SMOKE_NODE"
# Ray Data runs map_batches callables classes inside actors of this class.
MAP_WORKER_CLASS = "MapWorker"
OBJECT_STORE_BYTES = 400 * 1024 * 1024
START_TIMEOUT_S = 90.0
JOB_TIMEOUT_S = 240.0
POLL_S = 1.0
# Kill a worker node once this many masks exist (the job is under way) and one of its actors is
# alive; an actor can start seconds after the other, so a larger count can miss it.
KILL_AFTER_MASKS = 10


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n small seeded PNGs in three sizes (smooth gradients plus noise), sorted by name."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(96, 128), (120, 90), (64, 64)]
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], axis=-1)
        noise = rng.integers(0, 40, size=(h, w, 3))
        image = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _processes_with(marker: str, value: str) -> list[int]:
    """PIDs whose environment holds ``marker=value`` (Linux /proc), this process excluded."""
    wanted = f"{marker}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@dataclass
class Node:
    name: str
    process: subprocess.Popen[bytes]
    node_id: str = ""


@dataclass
class LocalCluster:
    """A Ray head and worker nodes on this machine, started as separate ``ray start`` processes.

    ``root`` holds the head's temp dir, the token, the nodes' logs, the inputs and the outputs.
    """

    root: Path
    head_cpus: int = 1
    worker_cpus: int = 1
    nodes: list[Node] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    token: str = ""

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _env(self, node_name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(
            {
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.root / "auth_token"),
                "RAY_USAGE_STATS_ENABLED": "0",
                MARKER: str(self.root),
                NODE_MARKER: node_name,
            }
        )
        return env

    def _spawn(self, name: str, args: list[str]) -> Node:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it open
        proc = subprocess.Popen(
            [str(RAY), "start", "--block", "--disable-usage-stats", *args],
            env=self._env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        node = Node(name, proc)
        self.nodes.append(node)
        return node

    def start(self, workers: int = 2) -> None:
        self.token = secrets.token_hex(32)
        (self.root / "auth_token").write_text(self.token)
        (self.root / "auth_token").chmod(0o600)
        self.gcs_port, self.dashboard_port, client_port, agent_port, metrics_port = free_ports(5)
        head = self._spawn(
            "head",
            [
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={self.gcs_port}",
                f"--num-cpus={self.head_cpus}",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}",
                f"--dashboard-agent-listen-port={agent_port}",
                f"--metrics-export-port={metrics_port}",
                f"--temp-dir={self.root / 'ray'}",
            ],
        )
        self._wait_for_node(head)
        for i in range(1, workers + 1):
            self.add_worker(f"worker{i}")

    def add_worker(self, name: str) -> Node:
        agent_port, metrics_port = free_ports(2)
        node = self._spawn(
            name,
            [
                f"--address=127.0.0.1:{self.gcs_port}",
                "--node-ip-address=127.0.0.1",
                f"--num-cpus={self.worker_cpus}",
                f"--object-store-memory={OBJECT_STORE_BYTES}",
                '--resources={"worker_node": 1}',
                f"--dashboard-agent-listen-port={agent_port}",
                f"--metrics-export-port={metrics_port}",
            ],
        )
        self._wait_for_node(node)
        return node

    def _wait_for_node(self, node: Node) -> None:
        """Wait until one more node is alive than those known; that one is ``node``."""
        known = {n.node_id for n in self.nodes if n.node_id}
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                log = (self.root / f"{node.name}.log").read_text(errors="replace")
                raise RuntimeError(f"{node.name} exited: {log[-2000:]}")
            with contextlib.suppress(Exception):
                new = [nid for nid in self.alive_node_ids() if nid not in known]
                if len(new) == 1:
                    node.node_id = new[0]
                    return
            time.sleep(POLL_S)
        raise TimeoutError(f"{node.name} did not join the cluster in {START_TIMEOUT_S:.0f} s")

    def _state(self) -> Any:
        from ray.util.state import StateApiClient

        return StateApiClient(address=self.dashboard_url, headers=self.headers)

    def alive_node_ids(self) -> list[str]:
        from ray.util.state.common import ListApiOptions, StateResource

        nodes = self._state().list(
            StateResource.NODES,
            options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
            raise_on_missing_output=False,
        )
        return [n.node_id for n in nodes]

    def inference_actors(self) -> dict[str, tuple[str, str]]:
        """{actor id: (node id, state)} of the Ray Data map actors placed on a node so far."""
        from ray.util.state.common import ListApiOptions, StateResource

        actors = self._state().list(
            StateResource.ACTORS,
            options=ListApiOptions(detail=False),
            raise_on_missing_output=False,
        )
        return {
            a.actor_id: (a.node_id, a.state)
            for a in actors
            if MAP_WORKER_CLASS in a.class_name and a.node_id
        }

    def jobs(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.headers)

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process of one node (raylet, agents, its workers and actors)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.process.pid, signal.SIGKILL)
        _kill(_processes_with(NODE_MARKER, node.name), signal.SIGKILL)
        node.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the jobs, then every process of this cluster (and nothing else)."""
        with contextlib.suppress(Exception):
            client = self.jobs()
            for job in client.list_jobs():
                if not job.status.is_terminal() and job.submission_id:
                    client.stop_job(job.submission_id)
        _kill(_processes_with(MARKER, str(self.root)), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _processes_with(MARKER, str(self.root)):
            time.sleep(0.5)
        _kill(_processes_with(MARKER, str(self.root)), signal.SIGKILL)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.process.wait(timeout=10)


@contextlib.contextmanager
def local_cluster(root: Path | None = None, workers: int = 2) -> Iterator[LocalCluster]:
    """A started cluster under ``root`` (a new temp dir when None, removed afterwards)."""
    # Short paths: Ray's Unix socket names under the temp dir are limited to ~107 bytes.
    owned = root is None
    root = Path(tempfile.mkdtemp(prefix="sbc-", dir="/tmp")) if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(root)
    try:
        cluster.start(workers)
        yield cluster
    finally:
        cluster.stop()
        if owned:
            shutil.rmtree(root, ignore_errors=True)


@dataclass
class JobRun:
    """What one submitted job did; times in seconds from the submission."""

    submission_id: str
    status: str
    elapsed_s: float
    # (actor id, node id) of every placement of this job's inference actors: a restarted actor
    # appears once per node it ran on.
    placements: set[tuple[str, str]]
    logs: str
    killed_node: str | None = None
    killed_at_s: float | None = None
    killed_at_masks: int | None = None

    @property
    def actors(self) -> set[str]:
        return {actor for actor, _ in self.placements}

    @property
    def actor_nodes(self) -> set[str]:
        return {node for _, node in self.placements}


def entrypoint(inputs: Path, out: Path, workers: str) -> str:
    """The job's command line: segbatch attached to the cluster the job runs on."""
    return shlex.join(
        [
            sys.executable,
            "-m",
            "segbatch",
            "run",
            "--input",
            str(inputs),
            "--output",
            str(out),
            "--model",
            "lraspp_mobilenet_v3_large",
            "--weights",
            "none",
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--set",
            "preprocess.resize=128",
            "--set",
            f"inference.workers={workers}",
            "--address",
            "auto",
        ]
    )


def run_job(
    cluster: LocalCluster,
    inputs: Path,
    out: Path,
    workers: str = "[2,3]",
    kill_after_masks: int | None = None,
) -> JobRun:
    """Submit one job and follow it to the end; with ``kill_after_masks``, once that many masks
    exist, SIGKILL a worker node on which an inference actor is alive."""
    client = cluster.jobs()
    earlier = set(cluster.inference_actors())
    started = time.monotonic()
    submission_id = client.submit_job(
        entrypoint=entrypoint(inputs, out, workers),
        runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}},
    )
    placements: set[tuple[str, str]] = set()
    run = JobRun(submission_id, "", 0.0, placements, "")
    workers_by_id = {n.node_id: n for n in cluster.nodes if n.name != "head"}
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            break
        if time.monotonic() - started > JOB_TIMEOUT_S:
            client.stop_job(submission_id)
            raise TimeoutError(f"job {submission_id} still {status} after {JOB_TIMEOUT_S:.0f} s")
        try:
            listed = cluster.inference_actors()
        except Exception:  # the state API times out now and then on a busy two-core machine
            listed = {}
        actors = {k: v for k, v in listed.items() if k not in earlier}
        placements.update((k, node_id) for k, (node_id, _) in actors.items())
        if kill_after_masks is not None and run.killed_node is None:
            masks = sum(1 for _ in (out / "masks").rglob("*.png"))
            alive_on = [workers_by_id.get(n) for n, state in actors.values() if state == "ALIVE"]
            targets = [node for node in alive_on if node is not None]
            if masks >= kill_after_masks and targets:
                cluster.kill_node(targets[0])
                run.killed_node = targets[0].name
                run.killed_at_s = time.monotonic() - started
                run.killed_at_masks = masks
        time.sleep(POLL_S)
    run.elapsed_s = time.monotonic() - started
    run.status = str(status.value)
    with contextlib.suppress(Exception):
        final = cluster.inference_actors()
        placements.update((k, v[0]) for k, v in final.items() if k not in earlier)
    run.logs = client.get_job_logs(submission_id)
    return run


def check_output(out: Path, inputs: list[Path]) -> dict[str, Any]:
    """Every input exactly once, ok, with its mask; raises AssertionError otherwise."""
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for p in sorted((out / "results").glob("*.parquet"))]
    rows = [row for t in tables for row in t.to_pylist()]
    indices = sorted(r["index"] for r in rows)
    assert indices == list(range(len(inputs))), f"indices {indices[:10]}... of {len(rows)} rows"
    paths = [r["path"] for r in rows]
    assert sorted(Path(p).name for p in paths) == [p.name for p in inputs], "paths differ"
    bad = [(r["path"], r["error"]) for r in rows if r["status"] != "ok"]
    assert not bad, f"error rows: {bad[:3]}"
    missing = [r["mask_path"] for r in rows if not Path(r["mask_path"]).is_file()]
    assert not missing, f"missing masks: {missing[:3]}"
    masks = sorted(p.name for p in (out / "masks").rglob("*.png"))
    assert masks == [p.with_suffix(".png").name for p in inputs], "mask files differ"
    summary = json.loads((out / "summary.json").read_text())
    images = summary["images"]
    assert images == {"total": len(inputs), "ok": len(inputs), "error": 0, "not_run": 0}, images
    return {"rows": len(rows), "wall_time_s": summary["wall_time_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600, help="inputs per job")
    parser.add_argument("--no-kill", action="store_true", help="skip the killed-node job")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {}
    t0 = time.monotonic()
    with local_cluster(args.keep) as cluster:
        report["cluster_start_s"] = round(time.monotonic() - t0, 1)
        inputs = make_images(cluster.root / "inputs", args.images)
        scenarios = [("multi_node", None)]
        if not args.no_kill:
            scenarios.append(("worker_killed", KILL_AFTER_MASKS))
        failed = False
        for name, kill_after in scenarios:
            out = cluster.root / f"out-{name}"
            workers = "[2,3]" if kill_after is None else "2"
            run = run_job(cluster, cluster.root / "inputs", out, workers, kill_after)
            (cluster.root / f"job-{name}.log").write_text(run.logs)
            entry: dict[str, Any] = {
                "status": run.status,
                "submit_to_end_s": round(run.elapsed_s, 1),
                "inference_actors": len(run.actors),
                "actor_nodes": len(run.actor_nodes),
                "progress_lines": sum("progress:" in line for line in run.logs.splitlines()),
            }
            if kill_after is not None:
                entry.update(
                    killed_node=run.killed_node,
                    killed_at_s=None if run.killed_at_s is None else round(run.killed_at_s, 1),
                    killed_at_masks=run.killed_at_masks,
                )
            try:
                assert run.status == "SUCCEEDED", run.logs[-3000:]
                assert len(run.actor_nodes) > 1, f"actor placements: {run.placements}"
                if kill_after is not None:
                    assert run.killed_node is not None, "no worker node was killed"
                entry.update(check_output(out, inputs))
            except AssertionError as exc:
                entry["failed"] = str(exc)[-3000:]
                failed = True
            report[name] = entry
    report["total_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
