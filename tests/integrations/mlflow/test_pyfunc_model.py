"""The registered `geoloc` model is `geoloc predict`: the champion, loaded through MLflow or
served by MLflow's scoring server, answers a photo as the CLI does on the same file."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
from fixtures.mlflow_server import free_port
from mlflow.exceptions import MlflowException

from geoloc.cli import main
from geoloc.data.imagestore import ImageLocations
from geoloc.integrations import mlflow as tracking
from geoloc.integrations.mlflow.pyfunc_model import FILES_DIR_ENV
from geoloc.paths import DataPaths

CHAMPION = f"models:/{tracking.MODEL_NAME}@{tracking.CHAMPION_ALIAS}"
SERVE_TIMEOUT_S = 240  # importing torch + mlflow on a loaded 2-core machine


@pytest.fixture
def registered_run(reranked_run: Path, tmp_path: Path) -> Path:
    """A copy of the tiny reranked run, synced: its pyfunc is `geoloc@champion`."""
    run_dir = tmp_path / "runs" / reranked_run.name
    shutil.copytree(reranked_run, run_dir)
    result = tracking.sync_run(run_dir, register=True)
    assert result.model_version == "1"
    return run_dir


@pytest.fixture
def photos(demo_index: DataPaths, tmp_path: Path) -> list[Path]:
    manifest = pd.read_parquet(demo_index.processed_manifest).sort_values("sha256")
    stored = ImageLocations(manifest.reset_index(drop=True), demo_index.root)
    out = []
    for i in range(3):
        path = tmp_path / f"photo{i}.jpg"
        path.write_bytes(stored.read(i))
        out.append(path)
    return out


def cli_predictions(run_dir: Path, photos: list[Path], tmp_path: Path) -> pd.DataFrame:
    out = tmp_path / "cli.json"
    assert main(["predict", "--run", str(run_dir), *map(str, photos), "--out", str(out)]) == 0
    return pd.DataFrame(json.loads(out.read_text()))


def assert_same_answers(served: pd.DataFrame, cli: pd.DataFrame) -> None:
    assert len(served) == len(cli)
    assert served["error"].isna().all()
    assert list(served["cell"]) == list(cli["cell"])
    for col in ("lat", "lon", "prob"):
        assert served[col].tolist() == pytest.approx(cli[col].tolist(), abs=1e-5), col
    assert [list(c) for c in served["topk_cells"]] == [list(c) for c in cli["topk_cells"]]
    radius = cli["radius_km"].tolist()
    assert served["radius_km"].tolist() == pytest.approx(radius, abs=1e-3)
    # the out-of-distribution score and flag travel with the answer
    assert served["ood_score"].tolist() == pytest.approx(cli["ood_score"].tolist(), abs=1e-6)
    assert [bool(f) for f in served["ood_flag"]] == [bool(f) for f in cli["ood_flag"]]
    assert set(served["variant"]) == set(cli["variant"]) != {"base"}  # rerank is packed too


def test_champion_pyfunc_answers_bytes_and_paths_like_geoloc_predict(
    registered_run: Path, photos: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = cli_predictions(registered_run, photos, tmp_path)
    monkeypatch.setenv(FILES_DIR_ENV, str(tmp_path))  # files: opt-in
    model = mlflow.pyfunc.load_model(CHAMPION)
    # the model carries its run: answers stay the same with the run folder gone
    shutil.rmtree(registered_run)
    by_bytes = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in photos]}))
    assert_same_answers(by_bytes, cli)
    by_path = model.predict(pd.DataFrame({"path": [str(p) for p in photos]}))
    assert_same_answers(by_path, cli)
    assert list(by_path["path"]) == [str(p) for p in photos]

    top2 = model.predict(pd.DataFrame({"image": [photos[0].read_bytes()]}), params={"top_k": 2})
    assert len(top2["topk_cells"].iloc[0]) == 2
    broken = model.predict(pd.DataFrame({"image": [b"not a photo", photos[0].read_bytes()]}))
    assert "not a readable image" in broken["error"].iloc[0]
    assert broken["cell"].iloc[1] == cli["cell"].iloc[0]
    with pytest.raises(MlflowException, match="needs a column 'image'"):
        model.unwrap_python_model().predict(None, pd.DataFrame({"photo": [b"x"]}))


def test_a_rerank_after_registration_is_a_new_model_version(
    registered_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tracking.sync_run(registered_run).model_version is None  # unchanged: not re-logged
    params = registered_run / "artifacts/data/rerank_params.json"
    data = json.loads(params.read_text())
    data["neighbours"] = int(data["neighbours"]) + 1
    params.write_text(json.dumps(data))
    assert tracking.sync_run(registered_run).model_version == "2"


@pytest.mark.server
def test_mlflow_models_serve_of_the_champion_answers_like_geoloc_predict(
    registered_run: Path, photos: list[Path], tmp_path: Path
) -> None:
    cli = cli_predictions(registered_run, photos, tmp_path)
    port = free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log_path = tmp_path / "serve.log"
    cmd = [str(mlflow_bin), "models", "serve", "-m", CHAMPION, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    # as from an activated venv: the server execs `uvicorn` from PATH
    env = {**os.environ, "PATH": f"{mlflow_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log_path)
        body = {"dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(p.read_bytes()).decode()] for p in photos],
        }}  # fmt: skip
        answer = requests.post(f"{url}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text[:2000]
        served = pd.DataFrame(answer.json()["predictions"])
        assert_same_answers(served, cli)

        body["params"] = {"top_k": 2}
        short = requests.post(f"{url}/invocations", json=body, timeout=120).json()["predictions"]
        assert [len(r["topk_cells"]) for r in short] == [2] * len(photos)

        bad = requests.post(f"{url}/invocations", json={"dataframe_split": {
            "columns": ["photo"], "data": [["x"]]}}, timeout=60)  # fmt: skip
        assert bad.status_code >= 400
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the server this test started (its own process group: uvicorn runs under it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow models serve exited:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"mlflow models serve not ready:\n{log_path.read_text()[-3000:]}")
