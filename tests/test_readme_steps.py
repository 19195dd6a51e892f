"""The README's commands work in the order written, in a new shell: nothing but the repository and
the `.venv` that `make` built, no variable exported by hand beyond what the README says."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from fixtures.mlflow_server import free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ACTIVATE = "source infra/activate.sh"
STEPS = ("make up", ACTIVATE, "prefect deployment run train/geosoft", "make down")
"""What a newcomer types, in the README's order (the test fails when the README changes it)."""

needs_venv = pytest.mark.skipif(
    not (ROOT / ".venv" / "bin" / "activate").is_file(),
    reason="no .venv in this checkout (make venv builds it)",
)


def fresh_shell(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """bash without the test's environment: a new terminal in the repository root."""
    base = {"HOME": str(tmp_path / "home"), "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8", **env}  # fmt: skip
    (tmp_path / "home").mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", f"set -e\ncd {ROOT}\n{script}"],
        env=base, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def test_the_readme_lists_the_steps_in_the_order_a_newcomer_runs_them() -> None:
    positions = [README.find(step) for step in STEPS]
    assert -1 not in positions, dict(zip(STEPS, positions, strict=True))
    assert positions == sorted(positions) or README.count(ACTIVATE) > 1
    around = README[README.find("make up"):]
    assert around.find(ACTIVATE) < around.find("prefect deployment run")


@needs_venv
def test_the_activation_step_finds_the_tools_and_the_local_prefect_server(tmp_path) -> None:
    port = str(free_port())
    out = fresh_shell(
        f"{ACTIVATE}\ncommand -v geoloc prefect mlflow\necho \"api=$PREFECT_API_URL\"",
        tmp_path, GEOLOC_PREFECT_PORT=port,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    tools = out.stdout.splitlines()[:3]
    venv_bin = (ROOT / ".venv" / "bin").resolve()
    assert all(Path(t).resolve().parent == venv_bin for t in tools), tools
    assert f"api=http://127.0.0.1:{port}/api" in out.stdout


@needs_venv
@pytest.mark.slow
@pytest.mark.server
def test_readme_prefect_steps_in_a_new_shell(tmp_path) -> None:
    """`make up`, then in a new shell the activation step and a deployment run, then `make
    down`: the run is created on the stack's server (no 'Deployment not found')."""
    env = {
        "GEOLOC_PREFECT_PORT": str(free_port()),
        "GEOLOC_DASHBOARD_PORT": str(free_port()),
        "GEOLOC_STACK_DIR": str(tmp_path / "stack"),
        "GEOLOC_RUNS_DIR": str(tmp_path / "runs"),
        "GEOLOC_DATA_DIR": str(tmp_path / "data"),
    }
    try:
        up = fresh_shell("make up", tmp_path, **env)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        run = fresh_shell(
            f"{ACTIVATE}\nprefect deployment run train/geosoft --param epochs=1", tmp_path, **env
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert "Created flow run" in run.stdout
        assert "Traceback" not in run.stdout + run.stderr
    finally:
        down = fresh_shell("make down", tmp_path, **env)
        assert down.returncode == 0, down.stderr[-2000:]
    assert os.listdir(tmp_path / "stack")  # logs stay for whoever looks
