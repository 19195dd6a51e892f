"""The production stack files in infra/ are valid and consistent with each other."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module")
def compose_config() -> dict:
    cmd = _compose_cmd()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    # the defaults, not a developer's own dashboard address
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEOLOC_DASHBOARD_")}
    out = subprocess.run(
        [*cmd, "-f", str(INFRA / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_file_validates_and_has_the_whole_stack(compose_config: dict) -> None:
    services = compose_config["services"]
    assert {"postgres", "minio", "minio-init", "prefect-server", "mlflow", "worker"} <= set(
        services
    )
    prefect_db = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("/prefect")
    mlflow_cmd = (
        " ".join(services["mlflow"]["command"])
        if isinstance(services["mlflow"]["command"], list)
        else services["mlflow"]["command"]
    )
    assert "/mlflow" in mlflow_cmd and "--artifacts-destination s3://" in mlflow_cmd


def test_workers_reach_every_service_by_its_compose_name(compose_config: dict) -> None:
    env = compose_config["services"]["worker"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["GEOLOC_OPTUNA_STORAGE"].endswith("@postgres:5432/optuna")


def _volume(spec: str | dict) -> tuple[str, str, bool]:
    """(source, target, read-only) of a service volume, short (`a:b:ro`) or long form."""
    if isinstance(spec, dict):
        return spec["source"], spec["target"], bool(spec.get("read_only"))
    source, target, *mode = spec.split(":")
    return source, target, mode == ["ro"]


def test_dashboards_serve_what_the_workers_write_at_the_url_their_artifacts_link(
    compose_config: dict,
) -> None:
    services = compose_config["services"]
    dashboards, worker = services["dashboards"], services["worker"]
    assert dashboards["image"] == worker["image"]
    runs_dir = worker["environment"]["GEOLOC_RUNS_DIR"]
    (source, target, read_only), *_ = [_volume(v) for v in dashboards["volumes"]]
    assert read_only and (source, target) in [_volume(v)[:2] for v in worker["volumes"]]
    assert runs_dir.startswith(target + "/")
    command = " ".join([*dashboards["entrypoint"], *dashboards["command"]])
    serve = re.search(r"geoloc serve --host (\S+) --port (\d+) --dir (\S+)", command)
    assert serve and serve[1] == "0.0.0.0" and serve[3] == runs_dir
    (port,) = dashboards["ports"]
    published, container = (
        (int(port["published"]), int(port["target"]))
        if isinstance(port, dict)
        else map(int, port.rsplit(":", 2)[-2:])
    )
    assert container == int(serve[2])
    assert worker["environment"]["GEOLOC_DASHBOARD_URL"] == f"http://localhost:{published}"


def test_every_database_the_stack_uses_is_created() -> None:
    created = set(
        re.findall(r"CREATE DATABASE (\w+)", (INFRA / "postgres/init-databases.sql").read_text())
    )
    compose = (INFRA / "docker-compose.yml").read_text()
    used = set(re.findall(r"@postgres:5432/(\w+)", compose))
    assert used and used <= created


def test_kubernetes_gpu_template_defines_every_variable_it_uses() -> None:
    template = json.loads((INFRA / "k8s/gpu-base-job-template.json").read_text())
    defined = set(template["variables"]["properties"])
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= defined, used - defined
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"


def test_images_pin_the_same_torch_pair_as_the_project() -> None:
    pins = set(re.findall(r"(torch(?:vision)?==[\d.]+)", (ROOT / "pyproject.toml").read_text()))
    assert pins == {"torch==2.14.1", "torchvision==0.29.1"}
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (INFRA / dockerfile).read_text()
        assert pins <= set(re.findall(r"(torch(?:vision)?==[\d.]+)", text)), dockerfile
