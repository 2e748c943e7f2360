"""The cluster configs in cluster/ agree with Ray's launcher schema, KubeRay and the job files."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import ValidationError

REPO = Path(__file__).resolve().parent.parent
LAUNCHER_CONFIG = REPO / "cluster" / "aws-gpu.yaml"
RAYJOB = REPO / "cluster" / "kuberay-rayjob.yaml"
DOCKERFILE = REPO / "cluster" / "Dockerfile"
JOB_FILE_PATTERN = re.compile(r"(?<![\w/.-])(jobs/[\w./-]+\.ya?ml)\b")
CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _launcher_check(config: dict[str, Any]) -> None:
    """What `ray up` does to a config before it talks to AWS: fill defaults, then validate.

    validate_config checks the result against ray/autoscaler/ray-schema.json (jsonschema) and
    adds Ray's own cross-field checks (head_node_type, min/max workers).
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def _job_files(entrypoint: str) -> list[str]:
    return JOB_FILE_PATTERN.findall(entrypoint)


def _gpu_worker_groups(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return [g for g in groups if _pod_gpus(g) > 0]


def _pod_gpus(group: dict[str, Any]) -> int:
    containers = group["template"]["spec"]["containers"]
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in containers
    )


def _fits_whole(gpus: float, gpus_per_worker: float) -> bool:
    """Whether ``gpus`` hold one or more inference actors of ``gpus_per_worker`` with none left."""
    actors = gpus / gpus_per_worker
    return actors >= 1 and math.isclose(actors, round(actors), abs_tol=1e-9)


def _env_entries(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    spec = rayjob["spec"]["rayClusterSpec"]
    templates = [spec["headGroupSpec"]["template"]]
    templates += [g["template"] for g in spec["workerGroupSpecs"]]
    return [
        env
        for template in templates
        for container in template["spec"]["containers"]
        for env in container.get("env", [])
    ]


# Ray cluster launcher (ray up)


def test_launcher_config_validates_against_rays_schema() -> None:
    _launcher_check(_load(LAUNCHER_CONFIG))


@pytest.mark.parametrize(
    ("breakage", "error", "message"),
    [
        ("typo_in_top_level_key", ValidationError, "'max_worker' was unexpected"),
        ("fractional_gpu_resource", ValidationError, "0.5 is not of type 'integer'"),
        ("head_type_missing", ValueError, "head_node_type"),
        ("min_workers_above_max", ValueError, "smaller than the sum of `min_workers`"),
    ],
)
def test_launcher_schema_check_rejects_broken_copies(
    breakage: str, error: type[Exception], message: str
) -> None:
    config = _load(LAUNCHER_CONFIG)
    gpu_type = next(
        name
        for name, node in config["available_node_types"].items()
        if node["resources"].get("GPU", 0) > 0
    )
    if breakage == "typo_in_top_level_key":
        config["max_worker"] = config.pop("max_workers")
    elif breakage == "fractional_gpu_resource":
        config["available_node_types"][gpu_type]["resources"]["GPU"] = 0.5
    elif breakage == "head_type_missing":
        config["head_node_type"] = "no.such.type"
    elif breakage == "min_workers_above_max":
        config["available_node_types"][gpu_type]["min_workers"] = config["max_workers"] + 1
    with pytest.raises(error, match=re.escape(message)):
        _launcher_check(config)


def test_launcher_head_has_cpus_and_no_gpu() -> None:
    config = _load(LAUNCHER_CONFIG)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["CPU"] >= 1


def test_launcher_gpu_group_autoscales_and_fits_the_job() -> None:
    from segbatch.config import load_job

    config = _load(LAUNCHER_CONFIG)
    inference = load_job(REPO / "jobs" / "satellite-s3.yaml").inference
    gpu_types = [n for n in config["available_node_types"].values() if n["resources"].get("GPU")]
    assert gpu_types, "no GPU node type in the launcher config"
    max_workers = (
        inference.workers[1] if isinstance(inference.workers, tuple) else inference.workers
    )
    assert max_workers is not None
    for node in gpu_types:
        assert node["min_workers"] == 0
        gpus = node["resources"]["GPU"]
        assert _fits_whole(gpus, inference.gpus_per_worker), (gpus, inference.gpus_per_worker)
        actors_per_node = round(gpus / inference.gpus_per_worker)
        assert node["max_workers"] * actors_per_node >= max_workers


def test_launcher_installs_the_project_on_every_node() -> None:
    config = _load(LAUNCHER_CONFIG)
    assert "." in config["file_mounts"].values()
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    mount_name = mount.removeprefix("~/")
    installs = [c for c in config["setup_commands"] if "pip install" in c and mount_name in c]
    assert installs, "setup_commands do not pip install the mounted repo"
    assert any("[s3" in c for c in installs)


# KubeRay RayJob


def test_rayjob_is_a_rayjob_with_an_autoscaling_gpu_group() -> None:
    rayjob = _load(RAYJOB)
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert "headGroupSpec" in spec
    groups = _gpu_worker_groups(rayjob)
    assert groups, "no worker group with an nvidia.com/gpu limit"
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]


def test_rayjob_gpu_limits_fit_the_jobs_gpus_per_worker() -> None:
    from segbatch.config import load_job

    rayjob = _load(RAYJOB)
    job_files = _job_files(rayjob["spec"]["entrypoint"])
    assert job_files
    for job_file in job_files:
        inference = load_job(REPO / job_file).inference
        for group in _gpu_worker_groups(rayjob):
            gpus = _pod_gpus(group)
            assert _fits_whole(gpus, inference.gpus_per_worker), (
                f"{group['groupName']}: {gpus} GPUs per pod do not hold a whole number of "
                f"actors of {inference.gpus_per_worker} GPU"
            )


def test_fractional_gpu_fit_rule() -> None:
    # The rule the two tests above rely on, on values where it must say no.
    assert _fits_whole(1, 0.5)
    assert _fits_whole(2, 0.25)
    assert _fits_whole(4, 2)
    assert not _fits_whole(1, 0.3)
    assert not _fits_whole(1, 2)
    assert not _fits_whole(3, 2)


def test_rayjob_entrypoint_names_job_files_that_exist_and_load() -> None:
    from segbatch.config import load_job

    entrypoint = _load(RAYJOB)["spec"]["entrypoint"]
    assert "segbatch run" in entrypoint
    job_files = _job_files(entrypoint)
    assert job_files, f"no jobs/*.yaml in the entrypoint {entrypoint!r}"
    for job_file in job_files:
        assert (REPO / job_file).is_file(), job_file
        cfg = load_job(REPO / job_file)
        assert cfg.inference.device in ("cuda", "auto")


def test_rayjob_takes_credentials_from_a_secret() -> None:
    rayjob = _load(RAYJOB)
    entries = _env_entries(rayjob)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for env in entries:
        by_name.setdefault(env["name"], []).append(env)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert name in by_name, f"{name} is not passed to the pods"
    for env in entries:
        if env["name"] in (*CREDENTIAL_NAMES, "AWS_ENDPOINT_URL"):
            assert "value" not in env, f"{env['name']} has a literal value"
            assert env["valueFrom"]["secretKeyRef"]["key"]
    # Every pod that reads or writes S3 gets the credentials, the head and each worker group.
    spec = rayjob["spec"]["rayClusterSpec"]
    for template in [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]
    ]:
        names = {e["name"] for c in template["spec"]["containers"] for e in c.get("env", [])}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names


def test_no_literal_credentials_in_cluster_files() -> None:
    access_key = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")
    for path in (REPO / "cluster").iterdir():
        if path.is_file():
            assert not access_key.search(path.read_text()), path


# Dockerfile


def test_dockerfile_installs_the_project_on_the_ray_version_of_the_rayjob() -> None:
    text = DOCKERFILE.read_text()
    ray_version = _load(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"]
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray_version)}$", text, re.M)
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py3\d+-gpu$", text, re.M)
    assert re.search(r"^COPY \. /app$", text, re.M)
    install = re.search(r'pip install [^\n]*"\.\[([\w,]+)\]"', text)
    assert install, "the Dockerfile does not pip install the project"
    assert "s3" in install.group(1).split(",")
    launcher = LAUNCHER_CONFIG.read_text()
    assert f"ray[default,data]=={ray_version}" in launcher
